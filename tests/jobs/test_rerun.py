"""An operator's rerun of a job (node.jobs.store.rerun), on SQLite and PostgreSQL.

What an operator relies on: a finished job runs again as a job of its own (the next ``run`` of the same
series revision, rule and action), the earlier run keeps its state and result, a job about to run anyway
is refused with a reason, and the audit trail says who asked.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session

from node import audit
from node.index.db import make_engine, migrate
from node.index.models import Job, Patient, Series, Study
from node.jobs import store
from node.jobs.store import NewJob, create_jobs


@pytest.fixture
def engine(any_index_url: str) -> Iterator[Engine]:
    engine = make_engine(any_index_url)
    migrate(engine)
    with Session(engine) as s:
        s.add(
            Series(
                series_instance_uid="1.2.3.1",
                state="triggered",
                study=Study(study_instance_uid="1.2.3", patient=Patient()),
            )
        )
        s.commit()
    try:
        yield engine
    finally:
        engine.dispose()


def _make(engine: Engine) -> int:
    with engine.begin() as conn:
        (job_id,) = create_jobs(conn, 1, 1, [NewJob("seg", 0, "plugin", {"plugin": "threshold-seg"}, 5, 2)])
    return job_id


def _finish(engine: Engine, job_id: int, state: str, result: str = "") -> None:
    with engine.begin() as conn:
        conn.execute(update(Job).where(Job.id == job_id).values(state=state, result=result))


def _job(engine: Engine, job_id: int) -> Job:
    with Session(engine) as s:
        job = s.get(Job, job_id)
        assert job is not None
        s.expunge(job)
        return job


def test_a_succeeded_job_runs_again_as_the_next_run_and_the_first_is_kept(engine: Engine) -> None:
    first = _make(engine)
    _finish(engine, first, "succeeded", "1 SEG")
    second = store.rerun(engine, first, actor="alice")
    claimed = store.claim_next(engine, "p1")
    assert claimed is not None and (claimed.id, claimed.run) == (second, 2)
    assert store.finish(engine, second, "p1", ok=True, result="1 SEG").recorded
    third = store.rerun(engine, first, actor="bob")
    old, new, newer = _job(engine, first), _job(engine, second), _job(engine, third)
    assert (old.state, old.result, old.run) == ("succeeded", "1 SEG", 1)
    assert (new.state, new.run, newer.state, newer.run) == ("succeeded", 2, "pending", 3)
    # The same match, the action as the first job stored it, its priority and attempts allowed.
    for j in (new, newer):
        assert (j.series_fk, j.revision, j.rule, j.action_index, j.kind) == (1, 1, "seg", 0, "plugin")
        assert (j.action, j.priority, j.max_attempts) == (old.action, 5, 2)
    assert newer.attempts == 0
    events = audit.query(engine, kind=["job_rerun"])  # newest first
    assert [(e["actor"], e["job_id"], e["detail"]) for e in events] == [
        ("bob", first, f"was succeeded; runs again as job {third}"),
        ("alice", first, f"was succeeded; runs again as job {second}"),
    ]
    created = {e["job_id"]: (e["actor"], e["detail"]) for e in audit.query(engine, kind=["job_created"])}
    assert created[second] == ("alice", "revision 1, action 0 (plugin), run 2")


@pytest.mark.parametrize("state", ["failed", "cancelled"])
def test_a_failed_or_cancelled_job_also_runs_again_as_a_new_job(engine: Engine, state: str) -> None:
    first = _make(engine)
    _finish(engine, first, state)
    second = store.rerun(engine, first)
    assert _job(engine, first).state == state
    assert _job(engine, second).state == "pending"


@pytest.mark.parametrize("state", ["pending", "running"])
def test_a_job_about_to_run_is_not_run_twice(engine: Engine, state: str) -> None:
    first = _make(engine)
    _finish(engine, first, state)
    with pytest.raises(store.JobStateError, match=f"job {first} is {state}; it runs anyway"):
        store.rerun(engine, first)
    with engine.connect() as conn:
        assert conn.execute(select(Job.id)).scalars().all() == [first]
    assert audit.query(engine, kind=["job_rerun"]) == []


def test_an_unknown_job_is_named(engine: Engine) -> None:
    with pytest.raises(store.JobStateError, match="there is no job 99"):
        store.rerun(engine, 99)


def test_the_trackers_second_evaluation_still_makes_nothing_after_a_rerun(engine: Engine) -> None:
    """Exactly once per revision stays true for the tracker: a rerun does not open the door to duplicates."""
    first = _make(engine)
    _finish(engine, first, "succeeded")
    store.rerun(engine, first)
    with engine.begin() as conn:
        assert create_jobs(conn, 1, 1, [NewJob("seg", 0, "plugin", {"plugin": "threshold-seg"})]) == []


def test_a_job_whose_rerun_has_not_run_yet_is_not_run_again(engine: Engine) -> None:
    """Asking twice (a double click, two operators) makes one more run, not two: the second is refused,
    naming the run that is about to happen."""
    first = _make(engine)
    _finish(engine, first, "succeeded")
    second = store.rerun(engine, first)
    for state in ("pending", "running"):
        _finish(engine, second, state)
        with pytest.raises(store.JobStateError) as refused:
            store.rerun(engine, first)
        assert str(refused.value).startswith(f"job {second} is {state}; it runs anyway (cancel it first")
        assert "run 2 of rule seg, action 0 on revision 1" in str(refused.value)
    with engine.connect() as conn:
        assert conn.execute(select(Job.id).order_by(Job.id)).scalars().all() == [first, second]
    _finish(engine, second, "failed")
    assert _job(engine, store.rerun(engine, first)).run == 3  # once it has run, it may run again


def test_two_operators_rerunning_one_job_at_once_get_one_run(engine: Engine) -> None:
    """On PostgreSQL both could read "no run pending" at once; the series row's lock makes the second wait
    and then see the first one's run: one is made, the other refused, naming it."""
    import threading

    first = _make(engine)
    _finish(engine, first, "succeeded")
    start = threading.Barrier(2)
    made: list[int] = []
    refused: list[str] = []

    def rerun(actor: str) -> None:
        start.wait()
        try:
            made.append(store.rerun(engine, first, actor=actor))
        except store.JobStateError as e:
            refused.append(str(e))

    threads = [threading.Thread(target=rerun, args=(who,)) for who in ("alice", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(made) == 1 and _job(engine, made[0]).run == 2
    assert len(refused) == 1 and refused[0].startswith(f"job {made[0]} is pending; it runs anyway")


def test_a_deferred_job_is_pending_and_not_finished(engine: Engine) -> None:
    """A job waiting for a source PACS (store.defer) has not finished: no finish time, its attempt not counted."""
    import datetime as dt

    from node.index.models import utcnow

    job = _make(engine)
    claimed = store.claim_next(engine, "p1")
    assert claimed is not None and claimed.id == job
    until = utcnow() + dt.timedelta(seconds=30)
    assert store.defer(engine, job, "p1", note="retrieving priors", until=until).recorded
    got = _job(engine, job)
    assert (got.state, got.finished_at, got.attempts, got.last_error) == ("pending", None, 0, "retrieving priors")


def _stored_series(engine: Engine, data_dir: Path, shared_data: Path) -> None:
    """Series 1 with a real CT image stored and its first revision evaluated (what rerun_rules reads)."""
    import shutil

    from node.index.models import Instance, SeriesRevision, utcnow

    rel = "storage/1/ct.dcm"
    (data_dir / "storage/1").mkdir(parents=True)
    shutil.copy(next(iter(sorted((shared_data / "series/ct-head-philips-5mm").glob("I*")))), data_dir / rel)
    now = utcnow()
    with Session(engine) as s:
        s.add(
            Instance(
                sop_instance_uid="1.2.3.1.1",
                series_fk=1,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path=rel,
                file_size=(data_dir / rel).stat().st_size,
                checksum="0" * 64,
            )
        )
        s.add(
            SeriesRevision(
                series_fk=1,
                revision=1,
                instance_count=1,
                started_at=now,
                last_received_at=now,
                stable_at=now,
                triggered_at=now,
            )
        )
        s.commit()


def _forward_rules() -> Any:
    from node.decide.rules import RuleSet

    return RuleSet.compile(
        [{"name": "keep", "match": {}, "actions": [{"type": "forward", "to": ["pacs"]}]}], destinations=["pacs"]
    )


def test_rules_run_again_only_once_their_earlier_run_has_run(engine: Engine, tmp_path: Path, shared_data: Path) -> None:
    from node.decide.rerun import RerunRefused, rerun_rules

    data_dir = tmp_path / "data"
    _stored_series(engine, data_dir, shared_data)
    rules = _forward_rules()
    done = rerun_rules(engine, data_dir, rules, "1.2.3.1", actor="alice")
    assert done.matched == ["keep"] and len(done.job_ids) == 1
    with pytest.raises(RerunRefused, match=rf"revision 1: job {done.job_ids[0]} is pending; it runs anyway"):
        rerun_rules(engine, data_dir, rules, "1.2.3.1", actor="bob")
    with engine.connect() as conn:
        assert conn.execute(select(Job.id)).scalars().all() == done.job_ids
    assert len(audit.query(engine, kind=["rules_rerun"])) == 1


def test_rules_are_not_run_on_a_prior_study(engine: Engine, tmp_path: Path, shared_data: Path) -> None:
    """A prior the node retrieved for a job is the PACS's own study: no rule acts on it (no forward back)."""
    from node.decide.rerun import RerunRefused, rerun_rules
    from node.index.models import PriorFetch

    data_dir = tmp_path / "data"
    _stored_series(engine, data_dir, shared_data)
    job = _make(engine)
    with Session(engine) as s:
        s.add(PriorFetch(job_fk=job, source="pacs", study_uid="1.2.3", state="retrieved"))
        s.commit()
    with pytest.raises(RerunRefused, match=f"series 1.2.3.1 is of a prior study retrieved for job {job}; no rule acts"):
        rerun_rules(engine, data_dir, _forward_rules(), "1.2.3.1", actor="alice")
    with engine.connect() as conn:
        assert conn.execute(select(Job.id)).scalars().all() == [job]


@pytest.mark.parametrize("rerun_state, discarded", [("succeeded", True), ("failed", False)])
def test_a_discard_goes_ahead_once_a_rerun_of_the_failed_job_succeeded(
    engine: Engine, tmp_path: Path, rerun_state: str, discarded: bool
) -> None:
    """ "Forward, then discard" keeps the series while the forward failed; a successful rerun of the forward
    counts as the forward having succeeded, a failed one does not."""
    from node.config import Config
    from node.index.models import Instance
    from node.jobs.actions import JobContext, JobFailed, discard
    from node.storage import Storage

    storage = Storage(tmp_path / "data")
    stored = storage.absolute("storage/1/one.dcm")
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"DICM")
    with Session(engine) as s:
        s.add(
            Instance(
                sop_instance_uid="1.2.3.1.1",
                series_fk=1,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                file_path="storage/1/one.dcm",
                file_size=4,
                checksum="0" * 64,
            )
        )
        s.commit()
    with engine.begin() as conn:
        forward, drop = create_jobs(
            conn, 1, 1, [NewJob("keep", 0, "forward", {"to": ["pacs"]}), NewJob("keep", 1, "discard", {})]
        )
    _finish(engine, forward, "failed")
    again = store.rerun(engine, forward)
    _finish(engine, again, rerun_state)
    claimed = store.ClaimedJob(drop, 1, 1, "keep", 1, "discard", {}, 1, 3)
    ctx = JobContext(claimed, Config(), engine, storage, cancelled=lambda: False)
    if discarded:
        assert discard(ctx) == "discarded 1 instances (1 files removed)"
        assert not stored.exists()
    else:
        with pytest.raises(JobFailed, match=f"not discarding: job {forward} is failed, job {again} is failed"):
            discard(ctx)
        assert stored.exists()
