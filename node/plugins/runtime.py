"""Running a plugin job in its own process, with a wall-clock timeout and a memory limit.

Each job gets a fresh process from a fork server (the node's heavy imports
are preloaded there once, so a start costs milliseconds, not the seconds of
importing numpy and highdicom). A plugin that raises, segfaults, aborts,
hangs or allocates past its limit ends only that process: the job fails
with the reason, and the node carries on receiving. At most
``[plugins] workers`` plugin processes run at once.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
import threading
import time

from node.plugins.worker import WorkResult, WorkSpec

log = logging.getLogger(__name__)

# _forkserver last: it ties the fork server's life to the node's and warms caches after the imports.
_PRELOAD = ["node.plugins.worker", "node.plugins.series", "node.derive.seg", "node.derive.sc", "numpy", "highdicom",
            "node.plugins._forkserver"]
_lock = threading.Lock()
_ctx: mp.context.BaseContext | None = None
_slots: threading.BoundedSemaphore | None = None
_slot_count = 0


class PluginRunError(Exception):
    """The plugin's process failed; ``retryable`` when another attempt may succeed."""

    def __init__(self, message: str, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


def _context() -> mp.context.BaseContext:
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


def run_in_process(spec: WorkSpec, *, timeout: float, workers: int = 2,
                   cancelled: object = None) -> WorkResult:  # fmt: skip
    """Run ``spec`` in a child process; raises PluginRunError for a crash or a timeout."""
    slots = _slot(workers)
    with slots:
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
                if receiver.poll(min(left, 1.0)):
                    try:
                        result = receiver.recv()
                    except EOFError:  # the process ended without sending
                        result = None
                    break
                if not proc.is_alive():
                    break
                if callable(cancelled) and cancelled():
                    proc.kill()
                    proc.join(5)
                    raise PluginRunError("cancelled while the plugin ran")
            if result is None and proc.is_alive() and time.monotonic() >= deadline:
                proc.kill()
                proc.join(5)
                raise PluginRunError(f"the plugin did not finish within its timeout of {timeout:g} s and was "
                                     "stopped (raise timeout for this plugin if the series needs longer)")  # fmt: skip
            proc.join(10)
            if result is None:
                raise PluginRunError(f"the plugin process {_death(proc.exitcode)}")
            return result
        finally:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
            receiver.close()
