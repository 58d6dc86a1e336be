"""A destination's circuit breaker: one probe at a time, released however it ends, and the same outage
counted once; across node processes sharing one index (SQLite and PostgreSQL) an outage one sees stops
the others, one probes, and a delivery anywhere closes it for all (in a running node:
tests/e2e/send/test_circuit_outage.py)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from helpers import free_port, series_files, wait_for
from queue_index import Index

from node.config import RetrySection, load_config
from node.send import queue
from node.send.dispatch import Breaker, DestinationSender
from node.storage import Storage

Make = Callable[..., Breaker]

#: Label Map Segmentation Storage (2023): DCMTK 3.6.7 storescp and Orthanc 1.10 do not know it and refuse it.
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
CT = "ct-head-philips-5mm"  # 28 real axial CT images
BATCH = 32  # node.send.dispatch.BATCH: what one worker claims at a time


@pytest.fixture
def breaker(index: Index) -> Make:
    """A breaker of destination "pacs" as one more node process sees it (an engine of its own)."""

    def make(policy: RetrySection, hold: float = 30.0) -> Breaker:
        engine = index.connect()
        b = Breaker(policy, engine, "pacs", hold=hold)
        b.restore(queue.load_circuits(engine, ["pacs"])["pacs"])
        return b

    return make


# --- the breaker in one process -------------------------------------------------------


def _half_open(breaker: Make, delay: float = 0.05) -> Breaker:
    b = breaker(RetrySection(initial_delay=delay, max_delay=delay, multiplier=1, jitter=0))
    b.failure()
    time.sleep(delay * 1.5)
    assert b.state == "half-open"
    return b


def test_breaker_lets_one_probe_through_after_the_backoff_and_closes_on_success(breaker: Make):
    b = breaker(RetrySection(initial_delay=0.2, max_delay=1, jitter=0))
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
def test_every_end_of_a_probe_releases_it(breaker: Make, how):
    b = _half_open(breaker)
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


def _all_ask_at_once(breakers: list[Breaker], workers: int) -> list[str]:
    """``workers`` threads of each breaker take a turn at the same moment; returns the names of those that probed."""
    n = workers * len(breakers)
    start, turns_taken = threading.Barrier(n), threading.Barrier(n, timeout=5)
    probes: list[str] = []

    def worker(b: Breaker) -> None:
        start.wait()
        with b.turn() as t:
            if t.probe:
                probes.append(threading.current_thread().name)
                turns_taken.wait()  # still sending while every other worker takes its turn
        if not t.probe:
            turns_taken.wait()

    threads = [
        threading.Thread(target=worker, args=(b,), name=f"p{k}w{i}")
        for k, b in enumerate(breakers)
        for i in range(workers)
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(5)
    return probes


def test_exactly_one_of_many_workers_probes_when_they_all_ask_at_once(breaker: Make):
    b = _half_open(breaker)
    for _ in range(20):
        probes = _all_ask_at_once([b], 8)
        assert len(probes) == 1, probes


def test_a_failure_reported_while_the_circuit_is_open_is_the_same_outage(breaker: Make):
    b = breaker(RetrySection(initial_delay=5, max_delay=60, jitter=0))
    first = b.failure()
    late = b.failure()  # another worker's batch, in flight when the first failed
    assert first[0] and not late[0]
    assert b.failures == 1 and late[2] == first[2], "neither counted again nor pushed back"


def test_a_batch_that_began_before_the_outage_and_fails_after_the_backoff_is_the_same_outage(breaker: Make):
    """A hung PACS answers the other association's batch only after the back-off has ended."""
    b = breaker(RetrySection(initial_delay=0.1, max_delay=60, jitter=0))
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


# --- several node processes, one circuit --------------------------------------------


def test_an_outage_one_process_sees_stops_the_others_until_the_backoff_ends(breaker: Make):
    """The other process was never told: it reads the shared row at its next turn, and waits."""
    policy = RetrySection(initial_delay=5, max_delay=60, jitter=0)
    a, b = breaker(policy), breaker(policy)
    with b.turn() as under_way:  # a batch of the other process, admitted while the circuit was closed
        assert under_way.wait == 0
        with a.turn():
            counted, _, retry_at = a.failure("connection refused")
        assert counted
        late = b.failure("connection refused")  # the same outage, seen by the other process
    assert not late[0] and late[2] == retry_at, "counted once across the processes, the back-off not lengthened"
    with b.turn() as t:
        assert 4 < t.wait <= 5 and not t.probe, "the other process sends before the back-off ends"
    assert b.state == "open" and b.failures == 1 and b.retry_at == retry_at


def test_exactly_one_worker_of_all_processes_probes_a_half_open_circuit(breaker: Make):
    first = _half_open(breaker)
    others = [breaker(first.policy) for _ in range(2)]
    for _ in range(10):
        probes = _all_ask_at_once([first, *others], 4)
        assert len(probes) == 1, probes


def test_a_delivery_in_one_process_closes_the_circuit_for_all(breaker: Make):
    a = _half_open(breaker)
    b = breaker(a.policy)
    with a.turn() as probe:
        assert probe.probe
        with b.turn() as t:
            assert t.wait > 0 and not t.probe, "the other process waits for the probe"
        assert a.success()
    with b.turn() as t:
        assert t.wait == 0 and not t.probe and b.state == "closed", "the other process sends again"
    assert b.success() is False, "nothing left to close"


def test_the_probe_of_a_process_that_died_is_given_up_after_the_hold(breaker: Make):
    a = _half_open(breaker)
    b = breaker(a.policy, hold=0.3)
    taken = a.turn()
    assert taken.__enter__().probe  # and the process dies: the turn never ends
    with b.turn() as t:
        assert t.wait > 0 and not t.probe
    time.sleep(0.35)
    with b.turn() as t:
        assert t.probe, "nobody probes again after the dead process's probe"


def test_an_operators_retry_ends_the_backoff_for_all_processes_once(index: Index, breaker: Make):
    """``dicom-node queue retry`` during an outage: the next turn, in any process, probes; then the new back-off holds."""
    index.queue(1)
    policy = RetrySection(initial_delay=60, max_delay=60, jitter=0)
    a, b = breaker(policy), breaker(policy)
    with a.turn():
        a.failure("connection refused")
    assert b.probe_now() is False, "nothing was asked for: the back-off holds"
    queue.retry_now(index.engine, "pacs")
    assert b.probe_now(), "the operator's retry ended the back-off"
    with a.turn() as t:
        assert t.probe, "the next turn, in the other process, probes"
        a.failure("connection refused")
    assert b.probe_now() is False and b.state == "open", "the retry had its try: it waits for the back-off"
    assert b.failures == 2, "counted on"
    queue.retry_now(index.engine, "pacs")
    assert b.probe_now(), "a second retry ends the next back-off"


def test_two_processes_sending_to_a_dead_pacs_probe_it_one_batch_at_a_time(index: Index, tmp_path):
    """Two node processes' senders (two associations each), a PACS that is down, more than two batches queued.

    Each probe, whichever process takes it, is the first batch and counts once; the other batches were
    tried at most once, when the circuit was still closed: no process sent while another's outage was
    in its back-off, and no two probed at the same time.

    (The circuit is counted before the failed batch's rows are written back: a back-off shorter than that
    gap lets the next probe find them still "sending" and take the next batch; 0.3 s did, under load in CI.)
    """
    (tmp_path / "node.toml").write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
lease = 30
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {free_port()}
max_associations = 2
retry = {{ initial_delay = 1.0, max_delay = 1.0, multiplier = 1, jitter = 0 }}
"""
    )
    cfg = load_config(tmp_path / "node.toml")
    index.queue(2 * BATCH + 6, files=series_files(CT))
    storage = Storage(tmp_path / "data")
    stop = threading.Event()
    senders = []
    for _ in range(2):
        engine = index.connect()
        s = DestinationSender(cfg, cfg.destinations[0], engine, storage, engine, stop, index.process().id)
        s.restore(queue.load_circuits(engine, ["pacs"])["pacs"])
        senders.append(s)
    threads = [t for s in senders for t in s.threads]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: queue.read_circuit(index.engine, "pacs").failures >= 6, 60, "six failures of the dead PACS")
    finally:
        stop.set()
        for s in senders:
            s.wake()
        for t in threads:
            t.join(20)
    failures = queue.read_circuit(index.engine, "pacs").failures
    attempts = [a for _, _, _, a, _ in index.deliveries()]
    assert attempts[:BATCH] == [failures] * BATCH, (failures, attempts)
    assert max(attempts[BATCH:]) <= 1, attempts
