"""GPU slots on a machine without a GPU: which device a job's worker is given, waiting, urgent first, cancelling.

The allocator hands out device ids and the environment a worker sees; nothing here needs a GPU. Jobs are
real threads; every wait is bounded and every thread is joined.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from node.decide.rules import URGENT
from node.plugins.gpus import GpuLease, GpuSlots, GpuWaitCancelled, slots_for

NORMAL = 0


class Job:
    """A job thread: acquires a lease, then holds it until ``done`` is set (or gives up when ``cancel`` is)."""

    def __init__(self, slots: GpuSlots, need: str, priority: int = NORMAL, label: str = "") -> None:
        self.slots, self.need, self.priority, self.label = slots, need, priority, label
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.got = threading.Event()
        self.lease: GpuLease | None = None
        self.env: dict[str, str] | None = None
        self.error: BaseException | None = None
        self.messages: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with self.slots.acquire(
                self.need,
                priority=self.priority,
                cancelled=self.cancel.is_set,
                on_wait=self.messages.append,
                poll=0.05,
                label=self.label,
            ) as lease:
                self.lease, self.env = lease, lease.env
                self.got.set()
                self.done.wait(20)
        except BaseException as e:  # noqa: BLE001 - the test looks at it
            self.error = e
            self.got.set()

    def start(self) -> Job:
        self.thread.start()
        return self

    def finish(self) -> None:
        self.done.set()
        self.thread.join(10)
        assert not self.thread.is_alive()


def until(check: Callable[[], Any], what: str, timeout: float = 10) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def waiting(slots: GpuSlots) -> list[str]:
    return [w["lease"] for w in slots.state()["waiting"]]


def test_two_concurrent_jobs_get_different_devices_and_see_only_their_own():
    slots = GpuSlots(["0", "1"])
    a, b = Job(slots, "required", label="job 1").start(), Job(slots, "optional", label="job 2").start()
    a.got.wait(10), b.got.wait(10)
    assert a.error is None and b.error is None
    assert {a.lease.device, b.lease.device} == {"0", "1"}
    for job in (a, b):
        assert job.env == {"CUDA_VISIBLE_DEVICES": job.lease.device, "DICOM_NODE_DEVICE": "cuda"}
    busy = slots.state()["busy"]
    assert {d: h["lease"] for d, h in busy.items()} == {a.lease.device: "job 1", b.lease.device: "job 2"}
    # A third job that can run on the CPU does so at once; it is told to use no GPU at all.
    with slots.acquire("optional", priority=NORMAL, cancelled=lambda: False) as cpu:
        assert cpu.device is None
        assert cpu.env == {"CUDA_VISIBLE_DEVICES": "", "DICOM_NODE_DEVICE": "cpu"}
    a.finish(), b.finish()
    assert slots.state()["busy"] == {} and waiting(slots) == []


def test_a_job_that_needs_no_gpu_never_takes_one():
    slots = GpuSlots(["0"])
    lease = slots.acquire("none", priority=URGENT, cancelled=lambda: False)
    assert lease.device is None and lease.env["DICOM_NODE_DEVICE"] == "cpu"
    assert slots.state()["busy"] == {}


def test_a_required_job_waits_with_its_place_then_gets_the_released_device():
    slots = GpuSlots(["0"])
    holder = Job(slots, "required", label="job 1").start()
    holder.got.wait(10)
    waiter = Job(slots, "required", label="job 2").start()
    until(lambda: waiting(slots) == ["job 2"], "job 2 to wait")
    assert not waiter.got.is_set()
    until(lambda: waiter.messages, "the waiting message")
    assert waiter.messages == ["waiting for a GPU: all of [plugins] gpus (0) are busy; 0 job(s) ahead"]
    holder.finish()
    assert waiter.got.wait(10) and waiter.error is None
    assert waiter.lease.device == "0" and waiter.env["CUDA_VISIBLE_DEVICES"] == "0"
    assert slots.state()["busy"]["0"]["lease"] == "job 2" and waiting(slots) == []
    waiter.finish()


def test_an_urgent_waiter_overtakes_a_normal_one_that_waited_longer():
    slots = GpuSlots(["0"])
    holder = Job(slots, "required", label="holder").start()
    holder.got.wait(10)
    normal = Job(slots, "required", priority=10, label="normal").start()
    until(lambda: waiting(slots) == ["normal"], "the normal job to wait")
    urgent = Job(slots, "required", priority=URGENT, label="urgent").start()
    until(lambda: waiting(slots) == ["urgent", "normal"], "the urgent job to queue first")
    # The normal job is told it has one job ahead of it now.
    until(
        lambda: normal.messages[-1:] == ["waiting for a GPU: all of [plugins] gpus (0) are busy; 1 job(s) ahead"],
        "the normal job's message to change",
    )
    holder.finish()
    assert urgent.got.wait(10) and urgent.lease.device == "0"
    time.sleep(0.2)  # several of the normal job's polls: it must still be waiting
    assert not normal.got.is_set() and waiting(slots) == ["normal"]
    urgent.finish()
    assert normal.got.wait(10) and normal.lease.device == "0"
    normal.finish()


def test_equal_priorities_are_served_in_arrival_order():
    slots = GpuSlots(["7"])
    holder = Job(slots, "required", label="holder").start()
    holder.got.wait(10)
    first = Job(slots, "required", label="first").start()
    until(lambda: waiting(slots) == ["first"], "first to wait")
    second = Job(slots, "required", label="second").start()
    until(lambda: waiting(slots) == ["first", "second"], "second to wait")
    holder.finish()
    assert first.got.wait(10) and first.lease.device == "7" and not second.got.is_set()
    first.finish()
    assert second.got.wait(10) and second.lease.device == "7"
    second.finish()


def test_without_gpus_optional_runs_on_the_cpu_at_once_and_required_waits_visibly_until_cancelled():
    slots = GpuSlots([])
    lease = slots.acquire("optional", priority=URGENT, cancelled=lambda: False)
    assert lease.device is None and lease.env == {"CUDA_VISIBLE_DEVICES": "", "DICOM_NODE_DEVICE": "cpu"}
    job = Job(slots, "required", label="job 9").start()
    until(lambda: job.messages, "the waiting message")
    assert job.messages == ["waiting for a GPU: this plugin requires one and [plugins] gpus is empty"]
    time.sleep(0.2)
    assert not job.got.is_set() and waiting(slots) == ["job 9"]
    assert slots.state()["waiting"][0]["priority"] == NORMAL and slots.state()["waiting"][0]["since"]
    job.cancel.set()
    assert job.got.wait(5), "a cancelled job must stop waiting"
    assert isinstance(job.error, GpuWaitCancelled)
    assert waiting(slots) == []
    job.thread.join(5)


def test_a_cancelled_waiter_leaves_the_queue_and_the_next_one_gets_the_device():
    slots = GpuSlots(["0"])
    holder = Job(slots, "required", label="holder").start()
    holder.got.wait(10)
    doomed = Job(slots, "required", priority=URGENT, label="doomed").start()
    until(lambda: waiting(slots) == ["doomed"], "doomed to wait")
    nxt = Job(slots, "required", label="next").start()
    until(lambda: waiting(slots) == ["doomed", "next"], "next to wait")
    doomed.cancel.set()
    until(lambda: waiting(slots) == ["next"], "the cancelled job to leave the queue")
    assert isinstance(doomed.error, GpuWaitCancelled)
    until(
        lambda: nxt.messages[-1:] == ["waiting for a GPU: all of [plugins] gpus (0) are busy; 0 job(s) ahead"],
        "next to move up",
    )
    holder.finish()
    assert nxt.got.wait(10) and nxt.lease.device == "0"
    nxt.finish()
    assert slots.state()["busy"] == {}


def test_optional_does_not_queue_behind_waiters_and_release_is_idempotent():
    slots = GpuSlots(["0"])
    lease = slots.acquire("required", priority=NORMAL, cancelled=lambda: False, label="a")
    waiter = Job(slots, "required", label="b").start()
    until(lambda: waiting(slots) == ["b"], "b to wait")
    assert slots.acquire("optional", priority=URGENT, cancelled=lambda: False).device is None
    lease.release()
    assert waiter.got.wait(10) and waiter.lease.device == "0"
    lease.release()  # again: must not free the device b now holds
    assert slots.state()["busy"]["0"]["lease"] == "b"
    with pytest.raises(GpuWaitCancelled):
        slots.acquire("required", priority=URGENT, cancelled=lambda: True)
    assert waiting(slots) == []
    waiter.finish()


def test_bad_requests_and_device_lists_are_refused_with_the_key():
    with pytest.raises(ValueError, match="gpu must be one of none, optional, required, not 'always'"):
        GpuSlots(["0"]).acquire("always", priority=0, cancelled=lambda: False)
    with pytest.raises(ValueError, match=r"\[plugins\] gpus lists a device twice"):
        GpuSlots(["0", "0"])
    with pytest.raises(ValueError, match=r"\[plugins\] gpus: a device id must not be empty"):
        GpuSlots([""])


def test_one_shared_allocator_per_device_list():
    assert slots_for(["0", "1"]) is slots_for(("0", "1"))
    assert slots_for(["0", "1"]) is not slots_for(["1"])
    lease = slots_for(["5"]).acquire("required", priority=0, cancelled=lambda: False)
    try:
        assert slots_for(["5"]).state()["busy"].keys() == {"5"}
    finally:
        lease.release()
