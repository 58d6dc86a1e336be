"""Running a plugin job in its own process, with a wall-clock timeout and a memory limit.

Each job gets a fresh process from a fork server (the node's heavy imports
are preloaded there once, so a start costs milliseconds, not the seconds of
importing numpy and highdicom). A plugin that raises, segfaults, aborts,
hangs or allocates past its limit ends only that process: the job fails
with the reason, and the node carries on receiving. At most
``[plugins] workers`` plugin processes run at once.

Whatever a plugin starts ends with it: the plugin process leads its own
process group and is a child subreaper (see ``_forkserver.contain``), so a
timeout or a cancel kills its whole tree, even a grandchild that left the
group with setsid; and the fork server does the same to every plugin process
when the node stops or dies.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing as mp
import os
import signal
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import psutil

from node.plugins.worker import WorkResult, WorkSpec

if TYPE_CHECKING:
    from node.config import Config

log = logging.getLogger(__name__)

# Everything worker.run imports, so that a plugin process starts with it (and under its memory limit imports
# nothing of the node's). _forkserver last: it ties the fork server's life to the node's and warms caches.
_PRELOAD = [
    "node.plugins.worker",
    "node.plugins.series",
    "node.plugins.registry",
    "node.derive.common",
    "node.derive.errors",
    "node.derive.seg",
    "node.derive.sc",
    "node.derive.image",
    "node.derive.template",
    "node.derive.validate",
    "numpy",
    "highdicom",
    "node.plugins._forkserver",
]
_lock = threading.Lock()
_ctx: mp.context.ForkServerContext | None = None
_slots: threading.BoundedSemaphore | None = None
_slot_count = 0


class PluginRunError(Exception):
    """The plugin's process failed; ``retryable`` when another attempt may succeed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36


def prctl(option: int, value: int) -> bool:
    """prctl(2); False where there is none (not Linux): the timeout still bounds a plugin run."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(option, value, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def die_with_parent(sig: int, parent: int) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent ends (Linux).

    The fork server and its plugin processes use it, and the node's receiver processes
    (``[node] processes``). The "parent" is the thread that started this process: the starter must
    keep that thread alive for as long as the child should live. If the parent is not ``parent`` any
    more, it ended before the request took effect: exit now. (Not "the parent is pid 1": in a
    container without an init, the node itself is pid 1.)
    """
    if prctl(PR_SET_PDEATHSIG, sig) and os.getppid() != parent:
        os._exit(1)


def _context() -> mp.context.ForkServerContext:
    global _ctx
    with _lock:
        if _ctx is None:
            ctx = mp.get_context("forkserver")
            ctx.set_forkserver_preload(_PRELOAD)
            _ctx = ctx
        return _ctx


def start_fork_server() -> None:
    """Start the fork server now, from the calling (main) thread.

    Its parent-death signal (see _forkserver) fires when the *thread* that
    started it ends; started from a job worker thread, a clean stop that ends
    that thread first would kill every plugin running for the other workers.
    """
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _slot(workers: int) -> threading.BoundedSemaphore:
    global _slots, _slot_count
    with _lock:
        if _slots is None or _slot_count != workers:
            _slots, _slot_count = threading.BoundedSemaphore(workers), workers
        return _slots


def _living(procs: list[psutil.Process]) -> list[psutil.Process]:
    alive = []
    for p in procs:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive


def kill_descendants(root: psutil.Process, rounds: int = 200) -> None:
    """SIGKILL every descendant of ``root`` (found through /proc's parent links), until none is left.

    ``root`` must be a child subreaper (or stopped): an orphan of a killed descendant is re-parented to
    it and found in the next round, and a process that forks meanwhile is caught the same way.
    """
    for _ in range(rounds):
        try:
            alive = _living(root.children(recursive=True))
        except psutil.NoSuchProcess:
            return
        if not alive:
            return
        for p in alive:
            try:
                p.kill()  # psutil checks the pid still names the same process
            except psutil.NoSuchProcess:
                pass
        time.sleep(0.01)
    log.warning("process %d: descendants still alive after %d rounds of SIGKILL", root.pid, rounds)


def kill_tree(pid: int) -> None:
    """SIGKILL a plugin process with everything it started, also what left its process group (setsid).

    The plugin process is stopped first (it can neither fork nor reap then, and as a child subreaper
    it still adopts the orphans of what is killed under it), its descendants are killed, then its
    process group (it leads one, see ``_forkserver.contain``), which ends it too.
    """
    try:
        root = psutil.Process(pid)
        root.suspend()
        group = os.getpgid(pid)
    except (psutil.NoSuchProcess, ProcessLookupError):
        return  # ended already; what it left is the fork server's (a subreaper) until the node stops
    kill_descendants(root)
    try:
        if group == pid:
            os.killpg(group, signal.SIGKILL)
        else:  # just started: it does not lead a group of its own yet
            root.kill()
    except (psutil.NoSuchProcess, ProcessLookupError):
        pass


def _death(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not end"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        hint = " (out of memory? the kernel's OOM killer sends SIGKILL)" if -exitcode == signal.SIGKILL else ""
        return f"crashed with {name}{hint}"
    return f"exited with code {exitcode} without a result"


def _end(proc: mp.process.BaseProcess) -> None:
    """Kill the plugin process's whole tree and wait for the process itself."""
    if proc.is_alive() and proc.pid is not None:
        kill_tree(proc.pid)
    proc.join(5)


def _kill_orphaned_group(pgid: int | None) -> None:
    """After a plugin process died without cleaning up (a crash, the OOM killer), kill what is left of its group.

    Only while no process has the leader's pid: then the group id cannot have been given to anyone else
    (Linux does not reuse a pid that is still a process group's id). A descendant that called setsid is
    not in the group; it stays under the fork server until the node stops (see _forkserver).
    """
    if pgid is None or psutil.pid_exists(pgid):
        return
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):  # nothing left (the usual case), or not ours
        pass


def plugin_slot(workers: int) -> threading.BoundedSemaphore:
    """One of the ``[plugins] workers`` plugin process slots (a context manager), for a caller that must hold
    it before taking anything else a job needs (a GPU, warm workers)."""
    return _slot(workers)


def run_in_process(
    spec: WorkSpec,
    *,
    timeout: float,
    workers: int | None = None,
    cancelled: object = None,
    watch: Callable[[], str | None] | None = None,
) -> WorkResult:
    """Run ``spec`` in a child process; raises PluginRunError for a crash or a timeout.

    ``workers``: take one of that many process slots first (None: the caller holds one, see plugin_slot).
    ``watch``, called a few times a second while the process runs, returns a reason to stop it (a warm
    worker of the job died or went over its memory limit), or None.
    """
    with _slot(workers) if workers is not None else contextlib.nullcontext():
        ctx = _context()
        receiver, sender = ctx.Pipe(duplex=False)
        from node.plugins import worker

        proc = ctx.Process(target=worker.main, args=(spec, sender), name="dicom-node-plugin", daemon=True)
        t0 = time.monotonic()
        try:
            proc.start()
        except BaseException:
            receiver.close()
            sender.close()
            raise
        sender.close()
        try:
            deadline = t0 + timeout
            result: WorkResult | None = None
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                ready = receiver.poll(min(left, 1.0 if watch is None else 0.2))
                if not ready and not proc.is_alive():
                    # It may have sent its result and ended just after that poll timed out.
                    ready = receiver.poll(0)
                    if not ready:
                        break
                if ready:
                    try:
                        result = receiver.recv()
                    except EOFError:  # the process ended without sending
                        result = None
                    break
                if callable(cancelled) and cancelled():
                    _end(proc)
                    raise PluginRunError("cancelled while the plugin ran")
                why = watch() if watch is not None else None
                if why:
                    _end(proc)
                    raise PluginRunError(why)
            if result is None and proc.is_alive() and time.monotonic() >= deadline:
                _end(proc)
                raise PluginRunError(
                    f"the plugin did not finish within its timeout of {timeout:g} s and was "
                    "stopped (raise timeout for this plugin if the series needs longer)"
                )
            proc.join(10)
            if result is None:
                raise PluginRunError(f"the plugin process {_death(proc.exitcode)}")
            return result
        finally:
            if proc.is_alive():
                _end(proc)
            _kill_orphaned_group(proc.pid)
            receiver.close()


def _report_baseline(conn: Any) -> None:
    """Plugin process entry point for measure_baseline_mb: start as a job's process does, report its size."""
    from node.plugins import worker
    from node.plugins._forkserver import contain

    contain()
    conn.send(worker.address_space_mb())
    conn.close()


def measure_baseline_mb(timeout: float = 60) -> float:
    """The address space (MiB) a plugin process takes before it loads anything, from a real one.

    That is the floor under any memory_limit_mb. It depends on the installed numpy, highdicom and
    their libraries, so it is measured here rather than written down (about 400 MiB with the test
    environment's versions).
    """
    ctx = _context()
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_report_baseline, args=(sender,), name="dicom-node-plugin-probe", daemon=True)
    proc.start()
    sender.close()
    try:
        if not receiver.poll(timeout):
            raise PluginRunError(f"a plugin process did not report its size within {timeout:g} s")
        return float(receiver.recv())
    finally:
        receiver.close()
        _end(proc)


#: A limit this high is never below what a plugin process takes after its imports (about 0.4 GB measured),
#: so ``rules check`` does not start one to measure it (the default limit, 8192 MB, is above it).
_NEVER_BELOW_BASELINE_MB = 2048


def memory_limit_warnings(cfg: Config) -> list[str]:
    """A warning for each plugin action whose memory_limit_mb (its own or [plugins]') is below the baseline.

    Such a job cannot even start its plugin; the warning names where the limit is set. Nothing is
    measured when no plugin action has a limit.
    """
    limits: list[tuple[int, str]] = []
    for rule in cfg.ruleset:
        for n, action in enumerate(rule.model.actions):
            if action.type != "plugin":
                continue
            own = action.memory_limit_mb
            if own is not None:
                limits.append((own, f'rules[{rule.index}] ("{rule.name}").actions[{n}].memory_limit_mb = {own}'))
            else:
                mb = cfg.plugins.memory_limit_mb
                limits.append((mb, f'[plugins] memory_limit_mb = {mb} (used by rule "{rule.name}")'))
    # Only limits that could be near the baseline (a few hundred MB here) are worth starting a process for.
    limits = [(mb, where) for mb, where in limits if 0 < mb < _NEVER_BELOW_BASELINE_MB]
    if not limits:
        return []
    try:
        baseline = measure_baseline_mb()
    except (PluginRunError, OSError) as e:  # a check that cannot measure says so, and checks nothing
        return [
            f"could not measure what a plugin process takes, so memory_limit_mb values below "
            f"{_NEVER_BELOW_BASELINE_MB} MB were not checked: {e}"
        ]
    return [
        f"{where} is below the {baseline:.0f} MB a plugin process takes before it loads a series: its jobs "
        'will fail with "ran out of memory"; raise it (0 means no limit)'
        for mb, where in limits
        if mb <= baseline
    ]
