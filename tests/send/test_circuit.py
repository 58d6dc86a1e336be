"""A destination's circuit breaker: one probe at a time, released however it ends, and the same outage
counted once (in a running node: tests/e2e/send/test_circuit_outage.py)."""

from __future__ import annotations

import threading
import time

import pytest

from node.config import RetrySection
from node.send.dispatch import Breaker

#: Label Map Segmentation Storage (2023): DCMTK 3.6.7 storescp and Orthanc 1.10 do not know it and refuse it.
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
CT = "ct-head-philips-5mm"  # 28 real axial CT images
BATCH = 32  # node.send.dispatch.BATCH: what one worker claims at a time


# --- the breaker on its own -------------------------------------------------------


def _half_open(delay: float = 0.05) -> Breaker:
    b = Breaker(RetrySection(initial_delay=delay, max_delay=delay, multiplier=1, jitter=0))
    b.failure()
    time.sleep(delay * 1.5)
    assert b.state == "half-open"
    return b


def test_breaker_lets_one_probe_through_after_the_backoff_and_closes_on_success():
    b = Breaker(RetrySection(initial_delay=0.2, max_delay=1, jitter=0))
    with b.turn() as t:
        assert t.wait == 0 and not t.probe and b.state == "closed"
    counted, delay, _ = b.failure()
    assert counted and delay == pytest.approx(0.2) and b.state == "open"
    with b.turn() as t:
        assert 0 < t.wait <= 0.2
    time.sleep(0.25)
    with b.turn() as probe:
        assert probe.wait == 0 and probe.probe, "one worker probes"
        with b.turn() as other:
            assert other.wait > 0 and not other.probe, "the others wait while it probes"
        b.failure()
    assert b.failures == 2 and b.delay(2) == pytest.approx(0.4)
    assert b.success() is True, "closing an open circuit is a change to record"
    assert b.state == "closed" and b.success() is False
    with b.turn() as t:
        assert t.wait == 0


class _Crash(Exception):
    pass


def _probe_ends(b: Breaker, how: str) -> None:
    """One probe, ending as a worker's turn can end."""
    with b.turn() as t:
        assert t.probe
        if how == "delivered":
            b.success()
        elif how == "transient":
            b.failure()
        elif how == "exception":
            raise _Crash()
        # "permanent" (the PACS refused the batch for good), "nothing to send", "stopped" and
        # "cancelled" (an operator cancelled the claimed rows) leave the circuit as it is.


@pytest.mark.parametrize(
    "how", ["delivered", "transient", "permanent", "exception", "nothing to send", "stopped", "cancelled"]
)
def test_every_end_of_a_probe_releases_it(how):
    b = _half_open()
    try:
        _probe_ends(b, how)
    except _Crash:
        assert how == "exception"
    if how == "delivered":
        assert b.state == "closed"
        return
    if how == "transient":
        assert b.state == "open" and b.failures == 2
        time.sleep(0.08)
    with b.turn() as t:
        assert t.wait == 0 and t.probe, f"after a probe that ended by {how!r}, the next worker probes"


def _all_ask_at_once(b: Breaker, workers: int) -> list[str]:
    """``workers`` threads take a turn at the same moment; returns the names of those that probed."""
    start, turns_taken = threading.Barrier(workers), threading.Barrier(workers, timeout=5)
    probes: list[str] = []

    def worker() -> None:
        start.wait()
        with b.turn() as t:
            if t.probe:
                probes.append(threading.current_thread().name)
                turns_taken.wait()  # still sending while every other worker takes its turn
        if not t.probe:
            turns_taken.wait()

    threads = [threading.Thread(target=worker, name=f"w{i}") for i in range(workers)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    return probes


def test_exactly_one_of_many_workers_probes_when_they_all_ask_at_once():
    b = _half_open()
    for _ in range(20):
        probes = _all_ask_at_once(b, 8)
        assert len(probes) == 1, probes


def test_a_failure_reported_while_the_circuit_is_open_is_the_same_outage():
    b = Breaker(RetrySection(initial_delay=5, max_delay=60, jitter=0))
    first = b.failure()
    late = b.failure()  # another worker's batch, in flight when the first failed
    assert first[0] and not late[0]
    assert b.failures == 1 and late[2] == first[2], "neither counted again nor pushed back"


def test_a_batch_that_began_before_the_outage_and_fails_after_the_backoff_is_the_same_outage():
    """A hung PACS answers the other association's batch only after the back-off has ended."""
    import threading

    b = Breaker(RetrySection(initial_delay=0.1, max_delay=60, jitter=0))
    admitted = threading.Event()
    first_counted = threading.Event()
    late: list[tuple] = []

    def slow_batch() -> None:
        with b.turn():  # admitted while the circuit is closed
            admitted.set()
            first_counted.wait(5)
            time.sleep(0.3)  # fails after the 0.1 s back-off has passed
            late.append(b.failure())

    t = threading.Thread(target=slow_batch)
    t.start()
    admitted.wait(5)
    with b.turn():
        first = b.failure()
    first_counted.set()
    t.join(5)
    assert first[0] and not late[0][0], (first, late)
    assert b.failures == 1, "the late failure of a batch from before the outage counted again"
    with b.turn() as probe:  # the probe, admitted after the outage began, counts
        assert probe.probe
        assert b.failure()[0] and b.failures == 2
