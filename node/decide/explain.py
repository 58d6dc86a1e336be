"""Answers for people: why a series did or did not trigger, what rules would do with files or past series.

Everything here only reads; the functions return lines of text for the CLI.
"""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from node.decide.conditions import Facts
from node.decide.facts import FileSeries, series_snapshot
from node.decide.rules import RuleResult, RuleSet, StudyResult
from node.decide.study import study_series
from node.index.models import Job, Patient, Series, SeriesRevision, Study, StudyTrigger, aware, utcnow
from node.index.states import JobState, SeriesState
from node.qr.priors import is_prior_study


def _when(value: dt.datetime | None) -> str:
    return aware(value).strftime("%Y-%m-%d %H:%M:%S UTC") if value else "-"


def rule_lines(results: list[RuleResult], indent: str = "  ") -> Iterator[str]:
    if not results:
        yield f"{indent}(no rules are configured)"
    for n, r in enumerate(results, 1):
        m = r.rule.model
        head = f"{indent}{n}. {r.rule.name} (priority {m.priority}): "
        if r.fired:
            actions = "; ".join(a.summary() for a in m.actions)
            stop = " -- and stops lower-priority rules" if m.stop else ""
            yield head + f"MATCHED -> {actions}{stop}"
        else:
            yield head + f"{r.status.upper()} -- {r.why}"


def _facts_line(facts: Facts) -> str:
    parts = [f"{k}={facts.get(k)}" for k in ("calling_ae", "called_ae", "orientation") if facts.get(k)]
    return ", ".join(parts)


def explain_series(engine: Engine, data_dir: Path, ruleset: RuleSet, series_uid: str) -> list[str]:
    with Session(engine) as s:
        series = s.execute(select(Series).where(Series.series_instance_uid == series_uid)).scalars().first()
        if series is None:
            like = (
                s.execute(
                    select(Series.series_instance_uid)
                    .where(Series.series_instance_uid.startswith(series_uid, autoescape=True))
                    .limit(2)
                )
                .scalars()
                .all()
            )
            if len(like) == 1:
                series = s.execute(select(Series).where(Series.series_instance_uid == like[0])).scalars().one()
            elif like:
                raise LookupError(f"{series_uid} is the start of several series' UIDs; give more of it")
            else:
                raise LookupError(f"no series {series_uid} in the index (nor one whose UID starts with it)")
        study, patient = s.execute(
            select(Study, Patient).join(Patient, Patient.id == Study.patient_fk).where(Study.id == series.study_fk)
        ).one()
        snap = series_snapshot(s, data_dir, series.id)
        revisions = (
            s.execute(
                select(SeriesRevision).where(SeriesRevision.series_fk == series.id).order_by(SeriesRevision.revision)
            )
            .scalars()
            .all()
        )
        jobs = s.execute(select(Job).where(Job.series_fk == series.id).order_by(Job.id)).scalars().all()
        study_lines = study_rule_lines(s, data_dir, ruleset, study.id)
    lines = [
        f'Series {series.series_instance_uid} ({series.modality} "{series.series_description}", '
        f"{series.instance_count} instances)",
        f'  patient "{patient.patient_name}" ({patient.patient_id}), study {study.study_instance_uid} '
        f"of {study.study_date or 'unknown date'}",
        f"  received {_when(series.first_received_at)} to {_when(series.last_received_at)}",
    ]
    meaning: dict[str, str] = {
        SeriesState.RECEIVING: "receiving: waiting until no instance arrives for stable_after seconds",
        SeriesState.STABLE: "stable: its rules are being evaluated",
        SeriesState.TRIGGERED: "triggered: its rules were evaluated",
    }
    state = meaning.get(series.state, series.state)
    lines.append(f"  now revision {series.revision} ({series.revision_instances} instances), {state}")
    for r in revisions:
        matched = r.matched_rules.replace(",", ", ") or "no rule"
        outcome = f"error: {r.error}" if r.error else f"matched {matched}"
        lines.append(
            f"  revision {r.revision}: {r.instance_count} instances, stable {_when(r.stable_at)} "
            f"({r.stable_reason}), {outcome}"
        )
    if snap is None:
        lines.append("  (no instance of the series is stored, so the rules cannot be evaluated)")
        return lines
    if is_prior_study(engine, study.study_instance_uid):
        lines.append(
            "  its study is a prior retrieved from a [[sources]] PACS for a job (docs/priors.md): the node "
            "evaluates no rule for it (below: what they would say otherwise)"
        )
    extra = _facts_line(snap.facts)
    lines.append(f"Rules, evaluated now for revision {snap.revision}" + (f" ({extra})" if extra else "") + ":")
    results = ruleset.evaluate(snap.facts)
    lines.extend(rule_lines(results) if results or not ruleset.study_rules else ["  (no series rules are configured)"])
    lines.extend(study_lines)
    if jobs:
        lines.append("Jobs:")
        for j in jobs:
            lines.append("  " + job_line(j))
    else:
        lines.append("Jobs: none")
    return lines


def study_rule_lines(session: Session, data_dir: Path, ruleset: RuleSet, study_id: int) -> list[str]:
    """The study rules' answers for a study now, and each time one fired (empty without study rules)."""
    if not ruleset.study_rules:
        return []
    results = ruleset.evaluate_study(study_series(session, data_dir, study_id), utcnow())
    fired = (
        session.execute(select(StudyTrigger).where(StudyTrigger.study_fk == study_id).order_by(StudyTrigger.id))
        .scalars()
        .all()
    )
    lines = ["Study rules, evaluated now for the series' study:"]
    for n, r in enumerate(results, 1):
        lines.append(f"  {n}. {r.rule.name} (priority {r.rule.model.priority}): {_study_status(r, fired)}")
    for t in fired:
        inputs = json.loads(t.inputs)
        names = ", ".join(f"{k}=series {v['series_uid']} revision {v['revision']}" for k, v in inputs["inputs"].items())
        lines.append(
            f"  fired: {t.rule} study revision {t.revision} at {_when(t.created_at)} ({t.reason}), "
            f"primary {inputs['primary']}: {names}"
        )
    return lines


def _study_status(r: StudyResult, fired: Sequence[StudyTrigger]) -> str:
    m = r.rule.model
    if r.status != "ready":
        return f"{r.status.upper()} -- {r.why}"
    mine = [t for t in fired if t.rule == r.rule.name]
    same = next((t for t in mine if t.inputs_key == r.key), None)
    if same is not None:
        return f"FIRED for these inputs (study revision {same.revision})"
    if mine and m.on_revision == "ignore":
        return 'NOT FOR REVISIONS -- it fired for earlier inputs and has on_revision = "ignore"'
    actions = "; ".join(a.summary() for a in m.actions)
    return f"READY ({r.why}) -> {actions} (fires when the tracker evaluates the study)"


def job_line(j: Job) -> str:
    detail = (
        j.last_error
        if j.state in (JobState.FAILED, JobState.CANCELLED, JobState.PENDING) and j.last_error
        else j.result
    )
    return (
        f"#{j.id} revision {j.revision} rule {j.rule} action {j.action_index}"
        + (f" run {j.run}" if j.run > 1 else "")
        + f" ({j.kind}): {j.state}, "
        f"attempt {j.attempts} of {j.max_attempts}" + (f" -- {detail}" if detail else "")
    )


def dry_run_files(ruleset: RuleSet, groups: list[FileSeries], calling_ae: str, called_ae: str) -> list[str]:
    lines = []
    for g in groups:
        facts = g.facts(calling_ae=calling_ae or None, called_ae=called_ae or None)
        desc = facts.get("SeriesDescription") or ""
        lines.append(
            f'Series {g.series_uid} ({facts.get("Modality")} "{desc}", {len(g.files)} files, {g.frames} frames)'
        )
        stable_after, expected, rule = ruleset.timing(facts)
        if rule:
            lines.append(f"  timing from rule {rule}: stable_after={stable_after}, expected_instances={expected}")
        lines.extend(rule_lines(ruleset.evaluate(facts)))
    return lines


def replay(
    engine: Engine, data_dir: Path, ruleset: RuleSet, since: dt.datetime, until: dt.datetime | None = None
) -> tuple[list[str], Counter[str]]:
    """What the rules would fire now for each series received in [since, until]; nothing is written."""
    lines: list[str] = []
    fired: Counter[str] = Counter()
    with Session(engine) as s:
        q = select(Series.id).where(Series.last_received_at >= since).order_by(Series.last_received_at)
        if until is not None:
            q = q.where(Series.last_received_at <= until)
        ids = s.execute(q).scalars().all()
        for sid in ids:
            try:
                snap = series_snapshot(s, data_dir, sid)
            except Exception as e:
                lines.append(f"series #{sid}: cannot read its first instance: {e}")
                fired["(unreadable)"] += 1
                continue
            if snap is None:
                continue
            if is_prior_study(s.connection(), snap.study_uid):  # the tracker evaluates no rule for a retrieved prior
                fired["(prior study)"] += 1
                lines.append(f"series {snap.series_uid}: a prior study retrieved for a job (docs/priors.md): no rule")
                continue
            results = [r for r in ruleset.evaluate(snap.facts) if r.fired]
            head = (
                f'{_when(snap.last_received_at)}  {snap.modality:<3} "{snap.description}" '
                f"({snap.instance_count} inst.) {snap.series_uid}"
            )
            if not results:
                fired["(no rule)"] += 1
                lines.append(f"{head}: no rule")
            for r in results:
                fired[r.rule.name] += 1
                lines.append(f"{head}: {r.rule.name} -> " + "; ".join(a.summary() for a in r.rule.model.actions))
        if ruleset.study_rules:
            lines += _replay_studies(s, data_dir, ruleset, ids, fired)
    return lines, fired


def _replay_studies(
    session: Session, data_dir: Path, ruleset: RuleSet, series_ids: Sequence[int], fired: Counter[str]
) -> list[str]:
    """What the study rules would fire now for the studies of ``series_ids`` (each study once)."""
    lines = []
    studies = session.execute(
        select(Study.id, Study.study_instance_uid)
        .where(Study.id.in_(select(Series.study_fk).where(Series.id.in_(series_ids))))
        .order_by(Study.id)
    ).all()
    for study_id, study_uid in studies:
        for r in ruleset.evaluate_study(study_series(session, data_dir, study_id), utcnow()):
            if r.status != "ready":
                if r.status == "waiting":
                    lines.append(f"study {study_uid}: {r.rule.name} {r.why}")
                continue
            fired[r.rule.name] += 1
            inputs = ", ".join(f"{name}={s.series_uid}" for name, s in r.inputs.items())
            actions = "; ".join(a.summary() for a in r.rule.model.actions)
            lines.append(f"study {study_uid}: {r.rule.name} ({inputs}; primary {r.primary}) -> {actions}")
    return lines
