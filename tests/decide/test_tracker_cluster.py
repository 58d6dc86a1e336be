"""The series tracker with several node processes on one index, on SQLite and on PostgreSQL.

What a user relies on when a node process dies: a series it was receiving is still made stable (and
its jobs made) by another process, about a lease after it would have been; a revision made stable
but not yet evaluated is evaluated by another; and however many processes take it up, a revision's
rules fire once: one set of jobs, one ``rule_fired`` audit event per rule, one log line saying so.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import series_files, wait_for
from two_processes import DATABASES, LEASE, STABLE_AFTER, Cluster, clusters

from node.decide import tracker as tracker_module
from node.decide.tracker import SeriesTracker

CT = "ct-head-philips-5mm"
MR = "mr-t1-sag-siemens"


@pytest.fixture(params=DATABASES)
def cluster(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Cluster]:
    yield from clusters(request, tmp_path)


class DiesAfterStable(SeriesTracker):
    """A process that dies between making a revision stable and evaluating its rules."""

    def _trigger_logged(self, sid: int, revision: int, reason: str = "", attempt: int = 1) -> None:
        pass


def test_a_series_whose_receiving_process_is_gone_is_made_stable_by_another_once(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.decide.tracker")
    other = cluster.process(beat=True)  # told of neither: its heartbeat's sweep finds them
    stopped = cluster.process()  # times its series, then stops before the quiet period is over
    silent = cluster.process(told=False, start=False)  # indexes its series and dies before telling its tracker
    for path in series_files(CT)[:3]:
        stopped.receive(path)
    stopped.stop()
    for path in series_files(MR)[:2]:
        silent.receive(path)
    silent.stop()
    assert cluster.series_states() == {"CT": ("receiving", 1), "MR": ("receiving", 1)}

    wait_for(lambda: cluster.triggered() == 2, 30, "both series to be made stable by the other process")

    revisions = cluster.revisions()
    assert sorted(r.instance_count for r in revisions) == [2, 3]
    for r in revisions:  # not taken from a live process: only after the shortest quiet period + the lease
        waited = (r.stable_at - r.last_received_at).total_seconds()
        assert waited >= STABLE_AFTER + LEASE == other.tracker.adopt_after, (waited, r.stable_reason)
        assert r.matched_rules in ("ct", "mr") and r.error == ""
    assert cluster.series_states() == {"CT": ("triggered", 1), "MR": ("triggered", 1)}
    assert cluster.jobs() == [("CT", 1, "ct"), ("MR", 1, "mr")]
    assert cluster.audited("rule_fired") == 2
    assert "(their node process may have stopped): timed here too" in caplog.text


def test_two_processes_evaluating_the_same_revisions_make_their_jobs_once(
    cluster: Cluster, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="node.decide.tracker")
    a, b = cluster.process(), cluster.process()  # both running; neither received anything
    dying = cluster.process(tracker=DiesAfterStable)
    ct, mr = series_files(CT)[:3], series_files(MR)[:3]
    for revision in (1, 2, 3):  # each instance after the last became stable opens the next revision
        dying.receive(ct[revision - 1])
        dying.receive(mr[revision - 1])
        stable = {"CT": ("stable", revision), "MR": ("stable", revision)}
        wait_for(lambda: cluster.series_states() == stable, 15, f"revision {revision} to be stable")  # noqa: B023
    dying.stop()
    assert cluster.triggered() == 0

    def sweep_together() -> bool:
        """Both heartbeats at the same moment: each process takes up all six revisions at once."""
        barrier = threading.Barrier(2)

        def sweep(p: SeriesTracker) -> None:
            barrier.wait(5)
            p.sweep()

        threads = [threading.Thread(target=sweep, args=(p.tracker,)) for p in (a, b)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        return cluster.triggered() == 6

    wait_for(sweep_together, 30, "the six revisions to be evaluated", interval=0.5)
    a.stop()  # waits for what their trackers are running: a late second evaluation would show below
    b.stop()

    expected = sorted([(m, rev, m.lower()) for m in ("CT", "MR") for rev in (1, 2, 3)])
    assert cluster.jobs() == expected
    assert cluster.audited("rule_fired") == 6
    assert cluster.audited("job_created") == 6
    fired = [r for r in caplog.records if "matched ->" in r.getMessage()]
    assert len(fired) == 6, [r.getMessage() for r in fired]
    assert "evaluated here" in caplog.text


def test_a_revision_left_behind_by_a_newer_one_is_evaluated_by_the_full_sweep(
    cluster: Cluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Revision 1 made stable by a process that died; revision 2 opened and triggered by another since.

    The series no longer looks tracked (its state is ``triggered``): only the sweep that reads every
    untriggered revision (every FULL_SWEEP seconds; here: every time) finds revision 1.
    """
    a = cluster.process()
    dying = cluster.process(tracker=DiesAfterStable)
    ct = series_files(CT)[:2]
    dying.receive(ct[0])
    wait_for(lambda: cluster.series_states() == {"CT": ("stable", 1)}, 15, "revision 1 to be stable")
    dying.stop()
    a.receive(ct[1])
    wait_for(lambda: cluster.series_states() == {"CT": ("triggered", 2)}, 15, "revision 2 to be triggered")
    assert cluster.jobs() == [("CT", 2, "ct")]

    monkeypatch.setattr(tracker_module, "FULL_SWEEP", 0.0)
    wait_for(lambda: a.tracker.sweep() or cluster.triggered() == 2, 15, "revision 1 to be evaluated", interval=0.5)
    a.stop()
    assert cluster.jobs() == [("CT", 1, "ct"), ("CT", 2, "ct")]
    assert cluster.audited("rule_fired") == 2
