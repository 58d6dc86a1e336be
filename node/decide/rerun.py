"""An operator's "run the rules again" on a stored series: the current rules, the latest stable revision.

The tracker evaluates a revision's rules once, when it becomes stable. After a rule was added or changed,
or a plugin was upgraded, an operator may want the series processed again without re-sending it: this
evaluates the rules now on the revision's facts and makes the jobs of every rule that matches, each as
the next run of its (revision, rule, action) (:func:`node.jobs.store.rerun_jobs`), so the jobs of the
first evaluation, and their outputs, are kept. Series rules only: a study rule fires from its study.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Engine, func, select
from sqlalchemy.orm import Session

from node import audit
from node.decide.facts import series_snapshot
from node.decide.rules import RuleResult, RuleSet
from node.index.models import PriorFetch, Series, SeriesRevision, Study
from node.jobs.store import JobStateError, NewJob, rerun_jobs


def rule_jobs(results: list[RuleResult]) -> tuple[list[str], list[NewJob]]:
    """The rules that fired among ``results`` and the jobs their actions make (one per action, in order)."""
    matched, jobs = [], []
    for r in results:
        if not r.fired:
            continue
        matched.append(r.rule.name)
        m = r.rule.model
        for i, action in enumerate(m.actions):
            jobs.append(
                NewJob(m.name, i, action.type, action.model_dump(mode="json"), m.job_priority(action), m.max_attempts)
            )
    return matched, jobs


class RerunRefused(LookupError):
    """The rules cannot be run again on this series; the message says why and what to do."""


@dataclass(frozen=True)
class RulesRerun:
    series_uid: str
    revision: int
    matched: list[str]
    job_ids: list[int]

    def message(self) -> str:
        if not self.matched:
            return f"series {self.series_uid} revision {self.revision}: no rule matches now; no job made"
        ids = ", ".join(f"#{i}" for i in self.job_ids)
        return (
            f"series {self.series_uid} revision {self.revision}: rule(s) {', '.join(self.matched)} matched; "
            f"{len(self.job_ids)} job(s) made: {ids}"
        )


def rerun_rules(engine: Engine, data_dir: Path, ruleset: RuleSet, series_uid: str, *, actor: str) -> RulesRerun:
    """Evaluate ``ruleset`` on the series' latest stable revision and make the matching rules' jobs again.

    Audited (``rules_rerun``) with the jobs made, in one transaction; refused (:class:`RerunRefused`) for
    an unknown series, a series of a prior study (retrieved for a job: the tracker runs no rule on it, and
    a rerun must not either, or it would forward a PACS's own study back), one with no stable revision
    yet, one whose files cannot be read, or when a run of a matching rule's action is still pending or
    running (nothing is made then).
    """
    with Session(engine) as s:
        row = s.execute(
            select(Series.id, Study.study_instance_uid)
            .join(Study, Study.id == Series.study_fk)
            .where(Series.series_instance_uid == series_uid)
        ).first()
        if row is None:
            raise RerunRefused(f"no series {series_uid} in the index")
        sid, study_uid = row
        prior = s.execute(select(PriorFetch.job_fk).where(PriorFetch.study_uid == study_uid).limit(1)).first()
        if prior is not None:
            raise RerunRefused(
                f"series {series_uid} is of a prior study retrieved for "
                + (f"job {prior.job_fk}" if prior.job_fk is not None else "a job (since deleted)")
                + "; no rule acts on it"
            )
        revision = s.execute(select(func.max(SeriesRevision.revision)).where(SeriesRevision.series_fk == sid)).scalar()
        if revision is None:
            raise RerunRefused(
                f"series {series_uid} has no stable revision yet: its rules run once it is stable (see rules explain)"
            )
        try:
            snap = series_snapshot(s, data_dir, sid, revision)
        except Exception as e:
            raise RerunRefused(f"cannot read series {series_uid}'s first instance: {type(e).__name__}: {e}") from None
    if snap is None:
        raise RerunRefused(f"series {series_uid} has no stored instances (discarded?); there is nothing to run on")
    matched, jobs = rule_jobs(ruleset.evaluate(snap.facts))
    with engine.begin() as conn:
        try:
            ids = rerun_jobs(conn, sid, revision, jobs, actor=actor, series_uid=series_uid, study_uid=study_uid)
        except JobStateError as e:  # a run of one of them is still pending or running: nothing is made
            raise RerunRefused(f"series {series_uid} revision {revision}: {e}") from None
        done = RulesRerun(series_uid, revision, matched, ids)
        audit.record(
            conn, "rules_rerun", actor=actor, series_uid=series_uid, study_uid=study_uid, detail=done.message()
        )
    return done
