"""GPU slots: which plugin job may use which of the devices in ``[plugins] gpus``, and who waits.

One node process owns its devices: a job is given a whole device (its worker
sees only that one through ``CUDA_VISIBLE_DEVICES``) for as long as it holds
the lease, so two models never share a GPU's memory by accident.

What a step asks for (``need``):

- ``"none"``: no device; the lease is a CPU lease, given at once.
- ``"optional"``: a free device if one is free *now*, else the CPU at once. A
  plugin that declares it can run on the CPU is better served running there
  now than queueing behind jobs that cannot (and a CPU fallback never waits),
  so an optional job never joins the queue.
- ``"required"``: a free device, else it waits. Waiters are served by
  priority (higher first: urgent jobs carry ``URGENT`` added to their
  priority, see node/decide/rules.py), then by arrival. A released device
  is handed straight to the first waiter, so a device is only ever free
  while nobody waits. With no devices configured at all, a required job
  waits until it is cancelled, visibly, with a message saying why: the
  operator either adds a device or cancels it.

Waiting is a loop of short waits that asks ``cancelled()`` each time, so a
cancelled job leaves the queue within ``poll`` seconds and the next waiter
moves up.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

Need = Literal["none", "optional", "required"]
NEEDS: tuple[str, ...] = ("none", "optional", "required")


class GpuWaitCancelled(Exception):
    """The job was cancelled while it waited for a GPU; it holds no device."""


@dataclass(eq=False)
class _Waiter:
    priority: int
    seq: int
    label: str
    since: dt.datetime
    device: str | None = None

    @property
    def order(self) -> tuple[int, int]:
        return (-self.priority, self.seq)


@dataclass
class _Holder:
    label: str
    priority: int
    since: dt.datetime


class GpuLease:
    """A device held for one job (``device`` None: the job runs on the CPU). Release it when the job ends."""

    def __init__(self, slots: GpuSlots | None, device: str | None) -> None:
        self._slots = slots
        self.device = device
        self._released = device is None

    @property
    def env(self) -> dict[str, str]:
        """What the job's worker sees: only its own device, or none (an empty list hides every GPU)."""
        return {"CUDA_VISIBLE_DEVICES": self.device or "", "DICOM_NODE_DEVICE": "cuda" if self.device else "cpu"}

    def release(self) -> None:
        """Give the device back (to the first waiter, if any); calling it again does nothing."""
        if self._slots is not None and self.device is not None:
            self._slots._release(self)

    def __enter__(self) -> GpuLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"GpuLease(device={self.device!r})"


class GpuSlots:
    """A thread-safe allocator of the GPU devices of one node process (see the module docstring)."""

    def __init__(self, devices: Sequence[str]) -> None:
        self.devices = [str(d) for d in devices]
        if any(not d for d in self.devices):
            raise ValueError('[plugins] gpus: a device id must not be empty (use e.g. "0", "1")')
        if len(set(self.devices)) != len(self.devices):
            raise ValueError(f"[plugins] gpus lists a device twice: {self.devices}")
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._busy: dict[str, _Holder] = {}
        #: In the order devices are given: priority desc, then arrival.
        self._waiting: list[_Waiter] = []
        self._seq = itertools.count()

    # -- taking and giving back ---------------------------------------------

    def acquire(
        self,
        need: str,
        *,
        priority: int,
        cancelled: Callable[[], bool],
        on_wait: Callable[[str], None] | None = None,
        poll: float = 0.2,
        label: str = "",
    ) -> GpuLease:
        """A lease for a job step that needs ``need``; blocks only for ``"required"`` (see the module docstring).

        ``label`` names the holder in :meth:`state` (e.g. "job 12"). ``on_wait(message)`` is called when
        the job starts waiting and whenever its place in the queue changes (never under the lock).
        Raises :class:`GpuWaitCancelled` within ``poll`` seconds of ``cancelled()`` turning true.
        """
        if need not in NEEDS:
            raise ValueError(f"gpu must be one of {', '.join(NEEDS)}, not {need!r}")
        if need == "none":
            return GpuLease(None, None)
        with self._lock:
            device = self._free() if not self._waiting else None
            if device is not None or need == "optional":
                return self._grant(device, label, priority)
            me = _Waiter(priority, next(self._seq), label, _now())
            self._waiting.append(me)
            self._waiting.sort(key=lambda w: w.order)
        told, granted = "", False
        try:
            while True:
                with self._lock:
                    if me.device is not None:
                        granted = True
                        return GpuLease(self, me.device)
                    message = self._wait_message(me)
                if message != told and on_wait is not None:
                    on_wait(message)
                told = message
                if cancelled():
                    raise GpuWaitCancelled("cancelled while waiting for a GPU")
                with self._lock:
                    if me.device is None:
                        self._changed.wait(poll)
        finally:
            if not granted:
                with self._lock:
                    if me in self._waiting:
                        self._waiting.remove(me)
                        self._changed.notify_all()  # the ones behind moved up: their messages change
                if me.device is not None:  # given a device just as it left: pass it on
                    self._release(GpuLease(self, me.device))

    def _free(self) -> str | None:
        return next((d for d in self.devices if d not in self._busy), None)

    def _grant(self, device: str | None, label: str, priority: int) -> GpuLease:
        if device is None:
            return GpuLease(None, None)
        self._busy[device] = _Holder(label, priority, _now())
        return GpuLease(self, device)

    def _release(self, lease: GpuLease) -> None:
        with self._lock:
            if lease._released:
                return
            lease._released = True
            device = lease.device
            assert device is not None
            self._busy.pop(device, None)
            if self._waiting:
                first = self._waiting.pop(0)
                first.device = device
                self._busy[device] = _Holder(first.label, first.priority, _now())
            self._changed.notify_all()

    def _wait_message(self, me: _Waiter) -> str:
        if not self.devices:
            return "waiting for a GPU: this plugin requires one and [plugins] gpus is empty"
        ahead = self._waiting.index(me)
        return f"waiting for a GPU: all of [plugins] gpus ({', '.join(self.devices)}) are busy; {ahead} job(s) ahead"

    # -- for the API and metrics ---------------------------------------------

    def state(self) -> dict[str, Any]:
        """``{"devices": [...], "busy": {device: {"lease", "priority", "since"}}, "waiting": [{...}, ...]}``.

        ``waiting`` is in the order the devices will be given; times are ISO 8601 UTC.
        """
        with self._lock:
            return {
                "devices": list(self.devices),
                "busy": {
                    d: {"lease": h.label, "priority": h.priority, "since": h.since.isoformat()}
                    for d, h in self._busy.items()
                },
                "waiting": [
                    {"lease": w.label, "priority": w.priority, "since": w.since.isoformat()} for w in self._waiting
                ],
            }


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


_shared: dict[tuple[str, ...], GpuSlots] = {}
_shared_lock = threading.Lock()


def slots_for(devices: Sequence[str]) -> GpuSlots:
    """The process's one allocator for this device list (a config reload with the same list keeps its leases)."""
    key = tuple(str(d) for d in devices)
    with _shared_lock:
        slots = _shared.get(key)
        if slots is None:
            slots = _shared[key] = GpuSlots(list(key))
        return slots


def job_need(action_gpu: str | None, plugin_needs: Sequence[str]) -> str:
    """What a plugin job asks for: its action's ``gpu`` if set, else the most any of its plugins asks."""
    if action_gpu is not None:
        return action_gpu
    return max(plugin_needs, key=NEEDS.index, default="none")


def gpu_warnings(cfg: Any) -> list[str]:
    """A warning for each plugin action that requires a GPU on a node whose [plugins] gpus is empty.

    Its jobs wait (each holding one of the [jobs] workers) until a device is configured.
    """
    from node.plugins.registry import PluginLoadError, describe, discover

    if cfg.plugins.gpus:
        return []
    installed = discover(cfg.plugins)
    out = []
    for rule in cfg.ruleset or []:
        for n, action in enumerate(rule.model.actions):
            if action.type != "plugin":
                continue
            needs = []
            for st in action.steps:
                try:
                    needs.append(describe(installed[st.name], cfg.plugins).gpu)
                except (KeyError, PluginLoadError):
                    pass
            if job_need(action.gpu, needs) == "required":
                out.append(
                    f'rules[{rule.index}] ("{rule.name}").actions[{n}] requires a GPU and [plugins] gpus is '
                    "empty: its jobs will wait for one, each holding a job worker; list the devices in "
                    '[plugins] gpus, or set gpu = "optional" on the action to run it on the CPU'
                )
    return out
