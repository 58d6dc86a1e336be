"""Study rules: reading a study's series for them, and firing each once per input revision set.

The series tracker (:mod:`node.decide.tracker`) calls :func:`evaluate_study` whenever a series of a study
has triggered (and again at the end of a quiet period a rule waits for); nothing here keeps state in
memory. A firing is one transaction: the ``study_trigger`` row (unique per study, rule and input revision
set, and per study, rule and revision), its audit event and its jobs. Firings of one study are ordered
by a lock on its study row: of two processes evaluating one study at once with the same inputs, the
second finds the first's row and makes nothing; with different inputs (one saw a newer series) and
``on_revision = "rerun"``, the second takes the next revision, so neither firing is lost.

A study rule's job is a job like any other: ``series_fk`` is its primary input and ``revision`` the study
trigger's revision (1, 2, ... for that study and rule), ``study_trigger_fk`` names the firing, whose
``inputs`` say which series (and which revision of each) the plugin gets.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from node import audit
from node.decide.facts import series_snapshot
from node.decide.rules import RuleSet, StudyResult, StudySeries
from node.index.models import Job, Series, SeriesRevision, Study, StudyTrigger, aware, utcnow
from node.index.states import SeriesState
from node.jobs.store import NewJob, create_jobs

log = logging.getLogger(__name__)

_series = Series.__table__
_revision = SeriesRevision.__table__
_study = Study.__table__
_trigger = StudyTrigger.__table__
_job = Job.__table__
#: Tries at inserting a firing whose revision another process took between the read and the insert (with
#: the study row locked first that cannot happen; the retry covers a database that ignores FOR UPDATE).
_FIRE_ATTEMPTS = 3


def study_series(session: Session, data_dir: Path, study_id: int) -> list[StudySeries]:
    """The series of a study that study rules consider: received ones (the node's own outputs are not).

    A series counts at its latest revision whose series rules were evaluated; it is stable when that is
    its current revision. Its facts are read from its first instance (as for series rules).
    """
    rows = session.execute(
        select(
            _series.c.id,
            _series.c.series_instance_uid,
            _series.c.series_number,
            _series.c.state,
            _series.c.revision,
            _series.c.last_received_at,
        ).where(_series.c.study_fk == study_id, _series.c.series_instance_uid != "")
    ).all()
    done = dict(
        session.execute(
            select(_revision.c.series_fk, func.max(_revision.c.revision))
            .where(_revision.c.series_fk.in_([r.id for r in rows]), _revision.c.triggered_at.is_not(None))
            .group_by(_revision.c.series_fk)
        ).all()
    )
    out = []
    for r in rows:
        triggered = done.get(r.id)
        if triggered is None and r.state == SeriesState.TRIGGERED:
            continue  # triggered without ever being stable: made by the node (a job's output), not received
        stable = triggered is not None and r.state == SeriesState.TRIGGERED and triggered == r.revision
        facts = None
        if stable:
            try:
                snap = series_snapshot(session, data_dir, r.id, triggered)
            except Exception as e:  # an unreadable first instance: the series matches no input
                log.warning("study rules: cannot read the first instance of series #%d: %s", r.id, e)
                snap = None
            facts = snap.facts if snap is not None else None
        out.append(
            StudySeries(
                r.id,
                r.series_instance_uid,
                r.series_number,
                triggered or 0,
                stable,
                aware(r.last_received_at),
                facts,
            )
        )
    return out


@dataclass
class StudyEvaluation:
    """What one evaluation of a study's rules found and did."""

    study_uid: str = ""
    results: list[StudyResult] = field(default_factory=list)
    #: (rule, study revision, job ids) for each rule that fired now.
    fired: list[tuple[str, int, list[int]]] = field(default_factory=list)
    #: What each waiting rule waits for, by rule name.
    waiting: dict[str, str] = field(default_factory=dict)
    #: When to evaluate again (the earliest end of a quiet period a rule waits for), or None.
    due: dt.datetime | None = None


def evaluate_study(
    engine: Engine, reader: Engine, data_dir: Path, ruleset: RuleSet, study_id: int, now: dt.datetime | None = None
) -> StudyEvaluation:
    """Evaluate the study rules for a study and fire each that is ready for a new input revision set.

    Then writes when to look again and what the waiting rules wait for into the study row, unless a series
    of the study triggered meanwhile (its newer ``study_rules_due`` stands: it is evaluated again anyway).
    """
    now = now or utcnow()
    with Session(reader) as s:
        row = s.execute(
            select(_study.c.study_instance_uid, _study.c.study_rules_due).where(_study.c.id == study_id)
        ).first()
        if row is None:
            return StudyEvaluation()
        series = study_series(s, data_dir, study_id)
    out = StudyEvaluation(study_uid=row.study_instance_uid)
    out.results = ruleset.evaluate_study(series, now)
    for result in out.results:
        if result.status == "ready":
            fired = _fire(engine, study_id, row.study_instance_uid, result, now)
            if fired is not None:
                out.fired.append((result.rule.name, *fired))
        elif result.status == "waiting":
            out.waiting[result.rule.name] = result.why
            if result.due is not None and (out.due is None or result.due < out.due):
                out.due = result.due
    same = (
        _study.c.study_rules_due.is_(None)
        if row.study_rules_due is None
        else _study.c.study_rules_due == row.study_rules_due
    )
    with engine.begin() as conn:
        conn.execute(
            update(_study)
            .where(_study.c.id == study_id, same)
            .values(study_rules_due=out.due, study_rules_waiting=json.dumps(out.waiting) if out.waiting else "")
        )
    return out


def _fire(
    engine: Engine, study_id: int, study_uid: str, result: StudyResult, now: dt.datetime
) -> tuple[int, list[int]] | None:
    """Record the firing and make its jobs in one transaction: (study revision, job ids), or None when this
    input revision set fired already (here or in another process), or the rule ignores later revisions."""
    rule = result.rule
    key = result.key
    primary = result.inputs[result.primary]
    inputs = {
        name: {"series_id": s.series_id, "series_uid": s.series_uid, "revision": s.revision}
        for name, s in result.inputs.items()
    }
    for attempt in range(_FIRE_ATTEMPTS):
        with engine.begin() as conn:
            # The study row's lock orders firings of one study: another process's firing (of any input set)
            # commits before this one reads the revisions, so the next revision is free when it inserts.
            # FOR NO KEY UPDATE: it excludes another firing but not the receive path inserting a series of
            # the study (its foreign key takes a key-share lock). (On SQLite every write transaction holds
            # the database's write lock from its start anyway.)
            lock = select(_study.c.id).where(_study.c.id == study_id).with_for_update(key_share=True)
            if conn.execute(lock).first() is None:
                return None  # deleted meanwhile (retention)
            earlier = conn.execute(
                select(_trigger.c.revision, _trigger.c.inputs_key).where(
                    _trigger.c.study_fk == study_id, _trigger.c.rule == rule.name
                )
            ).all()
            if any(k == key for _, k in earlier):
                return None
            if earlier and rule.model.on_revision == "ignore":
                return None
            revision = max((r for r, _ in earlier), default=0) + 1
            try:
                with conn.begin_nested():
                    trigger_id = conn.execute(
                        _trigger.insert().returning(_trigger.c.id),
                        dict(
                            study_fk=study_id,
                            rule=rule.name,
                            revision=revision,
                            inputs=json.dumps({"primary": result.primary, "inputs": inputs}, sort_keys=True),
                            inputs_key=key,
                            primary_series_fk=primary.series_id,
                            reason=result.why[:256],
                            created_at=now,
                        ),
                    ).scalar_one()
            except IntegrityError:
                # Another firing took this revision (or these inputs) after the read: read again. Only the
                # same input set firing already ends it; a different one just takes the next revision.
                log.info(
                    "study %s: study rule %s: revision %d was taken meanwhile; reading again (attempt %d)",
                    study_uid,
                    rule.name,
                    revision,
                    attempt + 1,
                )
                continue
            uids = {"series_uid": primary.series_uid, "study_uid": study_uid}
            names = ", ".join(f"{n}=series #{s.series_id} revision {s.revision}" for n, s in result.inputs.items())
            audit.record(
                conn, "rule_fired", actor="node", rule=rule.name, detail=f"study revision {revision}: {names}", **uids
            )
            m = rule.model
            jobs = [
                NewJob(m.name, i, action.type, action.model_dump(mode="json"), m.job_priority(action), m.max_attempts)
                for i, action in enumerate(m.actions)
            ]
            made = create_jobs(conn, primary.series_id, revision, jobs, **uids)
            if made:
                conn.execute(update(_job).where(_job.c.id.in_(made)).values(study_trigger_fk=trigger_id))
        log.info(
            "study %s: study rule %s fired (study revision %d, %s) with %s -> %d job(s)",
            study_uid,
            rule.name,
            revision,
            result.why,
            names,
            len(made),
            extra={"study_uid": study_uid, "rules": [rule.name], "job_ids": made},
        )
        return revision, made
    # Never silently: the study stays due (evaluate_study does not get to clear it) and is evaluated again.
    raise RuntimeError(
        f"study {study_uid}: study rule {rule.name} could not take a revision in {_FIRE_ATTEMPTS} attempts "
        "(other firings kept taking it); it is evaluated again at the next sweep"
    )


def mark_due(conn: Connection, series_id: int, when: dt.datetime) -> int | None:
    """In the transaction that triggers a series: its study's rules are due (returns the study's id)."""
    study_id = conn.execute(select(_series.c.study_fk).where(_series.c.id == series_id)).scalar()
    if study_id is not None:
        conn.execute(update(_study).where(_study.c.id == study_id).values(study_rules_due=when))
    return None if study_id is None else int(study_id)
