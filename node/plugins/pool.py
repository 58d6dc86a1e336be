"""Warm workers: long-lived plugin processes in their own Python environments, leased to one job at a time.

A plugin in an environment (``[plugins.environments.NAME]``) runs in a worker process started as
``PYTHON -m dicom_node_sdk.worker``: it imports the plugin and runs its ``setup()`` (loading weights)
once, then serves job after job over a Unix socket (node.plugins.worker talks to it from the job's own
process). A worker belongs to one (environment, plugin, GPU device): ``CUDA_VISIBLE_DEVICES`` is fixed
when it starts.

Lifetimes: ``keep_warm`` workers per plugin stay started even idle (started with the node and replaced
when one dies); others stop after ``idle_timeout`` s idle; a worker is replaced after
``max_jobs_per_worker`` jobs. A job that times out, is cancelled or exceeds its memory limit kills the
worker it leased (its state is unknown); the next job gets a fresh one. Workers die with the node
(the SDK worker asks the kernel for a parent-death signal; they are started from one long-lived thread
here, since that signal follows the *thread* that started a process).
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import psutil

from node.plugins.registry import PROTOCOL, neutral_cwd, worker_environ
from node.plugins.runtime import kill_tree

if TYPE_CHECKING:
    from node.config import WarmSettings

log = logging.getLogger(__name__)

#: How often idle workers are looked at (stopped after idle_timeout, keep_warm ones restarted).
REAP_INTERVAL = 5.0


class WorkerStartError(Exception):
    """A worker could not be started or did not finish its setup; the message says why (with its log's end)."""


@dataclass(frozen=True)
class WorkerKey:
    environment: str
    plugin: str
    target: str
    #: The GPU it was given (CUDA_VISIBLE_DEVICES), None for CPU.
    device: str | None = None

    def __str__(self) -> str:
        on = f"GPU {self.device}" if self.device is not None else "CPU"
        return f"{self.plugin} ({self.environment}, {on})"


@dataclass(frozen=True)
class WorkerSpec:
    """How to start a worker of a key: its interpreter, extra variables and lifetime settings."""

    python: str
    env: Mapping[str, str]
    settings: WarmSettings


@dataclass(eq=False)
class Worker:
    key: WorkerKey
    proc: subprocess.Popen[bytes]
    socket: str
    log_path: Path
    started: float
    setup_seconds: float = 0.0
    jobs: int = 0
    last_used: float = field(default_factory=time.monotonic)
    busy: bool = False
    #: What the worker said about its plugin when it was ready (dicom_node_sdk's plugin info).
    plugin: Mapping[str, Any] = field(default_factory=dict)
    #: Its lifetime settings, and the pool it belongs to (a job gives it back there, even after a new pool).
    settings: WarmSettings | None = None
    pool: WorkerPool | None = field(default=None, repr=False)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def give_back(self, healthy: bool) -> None:
        """End a job's lease: back to the pool it was leased from (kept warm if healthy)."""
        if self.pool is not None:
            self.pool.release(self, healthy=healthy)

    def throw_away(self, why: str) -> None:
        """End a job's lease on a worker whose state is unknown: its pool stops it (``why`` goes to its log)."""
        if self.pool is not None:
            self.pool.discard(self, why)

    def alive(self) -> bool:
        """Running (not ended, not a zombie: poll() cannot reap while another thread waits on the process)."""
        if self.proc.poll() is not None:
            return False
        try:
            return psutil.Process(self.pid).status() != psutil.STATUS_ZOMBIE  # still ours: not reaped yet
        except psutil.NoSuchProcess:
            return False

    def rss_mb(self) -> float:
        """Memory of the worker and everything it started, MiB (0 when it has ended).

        The worker's resident set, plus what each child has of its own (USS): a forked child (a data
        loader) shares the worker's pages, and counting its RSS would count the model once per child.
        """
        try:
            root = psutil.Process(self.pid)
            total = root.memory_info().rss
            children = root.children(recursive=True)
        except psutil.NoSuchProcess:
            return 0.0
        for p in children:
            try:
                total += p.memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return total / 2**20

    def log_tail(self, lines: int = 8) -> str:
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def death(self) -> str:
        """Why the worker ended, for a job's error: its exit status and the end of its log."""
        from node.plugins.runtime import _death

        code = self.proc.poll()
        tail = self.log_tail()
        return f"the worker of {self.key} (pid {self.pid}) {_death(code)}" + (f"; its log ends: {tail}" if tail else "")


class WorkerPool:
    """The node's warm workers (one pool per node process; see :func:`pool`)."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        _prune_logs(log_dir)
        self._sockets = Path(tempfile.mkdtemp(prefix="dicom-node-workers-"))  # short: socket paths are <108 bytes
        self._cond = threading.Condition()
        self._workers: list[Worker] = []
        self._specs: dict[WorkerKey, WorkerSpec] = {}
        self._counter = itertools.count(1)
        self._starting: dict[WorkerKey, int] = {}
        #: Keys whose keep_warm start failed: (consecutive failures, not again before this monotonic time).
        self._backoff: dict[WorkerKey, tuple[int, float]] = {}
        # One long-lived thread starts every worker: their parent-death signal follows it (see the module doc).
        self._spawner = ThreadPoolExecutor(1, thread_name_prefix="plugin-worker-spawner")
        self._closed = False
        self._reaper: threading.Thread | None = None

    # -- leasing ---------------------------------------------------------------------------------------

    def lease(
        self,
        key: WorkerKey,
        spec: WorkerSpec,
        cancelled: Callable[[], bool] = lambda: False,
        on_wait: Callable[[str], None] | None = None,
    ) -> Worker:
        """An idle worker of ``key`` (marked busy), else a new one once its setup is done.

        Raises WorkerStartError when a new worker fails to start or set up.
        """
        told = False
        with self._cond:
            self._specs[key] = spec
            self._ensure_reaper()
            while True:
                for w in list(self._workers):
                    if w.key == key and not w.busy:
                        if not w.alive():
                            self._forget(w, f"ended while idle: {w.death()}")
                            continue
                        w.busy = True
                        return w
                # A keep_warm worker of this key is being started (the node just started): wait for it rather
                # than pay a second setup.
                if not self._starting.get(key) or self._closed:
                    break
                if cancelled():
                    raise WorkerStartError(f"cancelled while the worker for {key} was starting")
                if on_wait is not None and not told:
                    told = True
                    self._cond.release()
                    try:
                        on_wait(f"waiting for the worker for {key} that is starting (its setup loads the model)")
                    finally:
                        self._cond.acquire()
                    continue
                self._cond.wait(0.5)
        if on_wait is not None:
            on_wait(f"starting a worker for {key} (its setup loads the model)")
        w = self._start(key, spec, cancelled)
        with self._cond:
            w.busy = True
            if self._closed:  # the node stopped while it started
                closed = True
            else:
                closed = False
                self._workers.append(w)
        if closed:
            self._stop(w, "the node is stopping", logging.INFO)
            raise WorkerStartError(f"the node stopped while the worker for {key} started")
        return w

    def release(self, w: Worker, *, healthy: bool = True) -> None:
        """The job is done with ``w``: back to idle, or stopped if it is unhealthy, ended, or used up."""
        w.jobs += 1
        w.last_used = time.monotonic()
        limit = w.settings.max_jobs_per_worker if w.settings is not None else 0
        if not healthy or not w.alive() or self._closed:
            self._stop(w, "it failed its job" if w.alive() else w.death())
        elif limit and w.jobs >= limit:
            self._stop(w, f"it served max_jobs_per_worker = {limit} jobs", level=logging.INFO)
        else:
            with self._cond:
                w.busy = False
                self._cond.notify_all()

    def discard(self, w: Worker, why: str) -> None:
        """Kill ``w`` (a job that timed out, was cancelled or used too much memory while it ran)."""
        self._stop(w, why)

    # -- starting and stopping -------------------------------------------------------------------------

    def _start(self, key: WorkerKey, spec: WorkerSpec, cancelled: Callable[[], bool]) -> Worker:
        n = next(self._counter)
        sock = str(self._sockets / f"w{n}.sock")
        try:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise WorkerStartError(f"cannot make the worker log folder {self.log_dir}: {e.strerror or e}") from None
        log_path = self.log_dir / f"{key.environment}-{key.plugin}-{time.strftime('%Y%m%d-%H%M%S')}-{n}.log"
        gpu = {"CUDA_VISIBLE_DEVICES": key.device or "", "DICOM_NODE_DEVICE": "cuda" if key.device else "cpu"}
        env = worker_environ({**spec.env, **gpu})
        argv = [spec.python, "-m", "dicom_node_sdk.worker", "--socket", sock, "--plugin", f"{key.plugin}={key.target}"]
        t0 = time.monotonic()
        with open(log_path, "ab") as errors:
            try:
                proc = self._spawner.submit(
                    subprocess.Popen,
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=errors,
                    env=env,
                    cwd=neutral_cwd(spec.python),
                    start_new_session=True,
                ).result()
            except (OSError, RuntimeError) as e:  # RuntimeError: the pool closed meanwhile
                raise WorkerStartError(
                    f"cannot start a worker for {key} with {spec.python}: {getattr(e, 'strerror', None) or e}"
                ) from None
        w = Worker(key, proc, sock, log_path, t0, settings=spec.settings, pool=self)
        log.info("starting a worker for %s: pid %d, log %s", key, proc.pid, log_path)
        try:
            ready = self._ready_line(w, spec.settings.setup_timeout, cancelled)
        except BaseException:
            kill_tree(proc.pid)
            proc.wait(5)
            _kill_group(proc.pid)
            raise
        w.setup_seconds = float(ready.get("setup_seconds") or (time.monotonic() - t0))
        w.plugin = ready.get("plugin") or {}
        threading.Thread(
            target=_drain, args=(proc.stdout, log_path), name=f"worker-{proc.pid}-stdout", daemon=True
        ).start()
        log.info("worker for %s ready: pid %d, setup took %.1f s", key, proc.pid, w.setup_seconds)
        return w

    def _ready_line(self, w: Worker, timeout: float, cancelled: Callable[[], bool]) -> dict[str, Any]:
        """Wait for the worker's one JSON line saying it is ready (after its setup) or why not."""
        assert w.proc.stdout is not None
        fd = w.proc.stdout.fileno()
        buf = b""
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise WorkerStartError(
                    f"the worker for {w.key} did not finish its setup within setup_timeout = "
                    f"{timeout:g} s; its log ends: {w.log_tail() or '(empty)'}"
                )
            if cancelled():
                raise WorkerStartError(f"cancelled while the worker for {w.key} was starting")
            readable, _, _ = select.select([fd], [], [], min(left, 0.5))
            if not readable:
                continue
            chunk = os.read(fd, 65536)
            if not chunk:  # ended without a word
                w.proc.wait(5)
                raise WorkerStartError(w.death().replace("the worker", "the worker, while starting,", 1))
            buf += chunk
        line = buf.split(b"\n", 1)[0]
        try:
            msg = json.loads(line)
        except json.JSONDecodeError:
            msg = None
        if not isinstance(msg, dict):  # not JSON, or JSON but not the ready object
            raise WorkerStartError(
                f"the worker for {w.key} printed {line[:200]!r} instead of its ready line "
                "(is dicom-node-sdk installed in that environment?)"
            ) from None
        if msg.get("protocol") != PROTOCOL:
            raise WorkerStartError(
                f"the worker for {w.key} speaks protocol {msg.get('protocol')}, this node "
                f"{PROTOCOL}: install this node's dicom-node-sdk in that environment"
            )
        if not msg.get("ready"):
            raise WorkerStartError(f"the worker for {w.key} could not set up its plugin: {msg.get('error', '?')}")
        return msg

    def _stop(self, w: Worker, why: str, level: int = logging.WARNING) -> None:
        with self._cond:
            if w in self._workers:
                self._workers.remove(w)
            self._cond.notify_all()
        if w.alive():
            log.log(level, "stopping the worker for %s (pid %d): %s", w.key, w.pid, why)
            kill_tree(w.pid)
        try:
            w.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.warning("the worker for %s (pid %d) did not end after SIGKILL", w.key, w.pid)
        _kill_group(w.pid)  # what it started and left (it led its own process group), also after a crash
        Path(w.socket).unlink(missing_ok=True)

    def _forget(self, w: Worker, why: str) -> None:
        """Drop a worker that ended by itself (called with the lock held), with whatever it left running."""
        log.warning("the worker for %s (pid %d) %s", w.key, w.pid, why)
        self._workers.remove(w)
        _kill_group(w.pid)
        Path(w.socket).unlink(missing_ok=True)

    # -- keeping warm ----------------------------------------------------------------------------------

    def keep_warm(self, wanted: Mapping[WorkerKey, WorkerSpec]) -> None:
        """Remember what to keep warm and start the missing workers in the background."""
        with self._cond:
            self._specs.update(wanted)
            self._ensure_reaper()
        self._top_up()

    def _top_up(self) -> None:
        with self._cond:
            todo = []
            for key, spec in self._specs.items():
                if self._backoff.get(key, (0, 0.0))[1] > time.monotonic():
                    continue  # its setup failed lately: not again at every reap
                have = sum(1 for w in self._workers if w.key == key) + self._starting.get(key, 0)
                for _ in range(spec.settings.keep_warm - have):
                    self._starting[key] = self._starting.get(key, 0) + 1
                    todo.append((key, spec))
        for key, spec in todo:
            threading.Thread(target=self._warm_one, args=(key, spec), name="plugin-worker-warm", daemon=True).start()

    def _warm_one(self, key: WorkerKey, spec: WorkerSpec) -> None:
        try:
            w = self._start(key, spec, lambda: self._closed)
        except Exception as e:  # a thread of its own: say why, never die with a traceback
            with self._cond:
                self._starting[key] -= 1
                failures = self._backoff.get(key, (0, 0.0))[0] + 1
                wait = min(600.0, REAP_INTERVAL * 2**failures)
                self._backoff[key] = (failures, time.monotonic() + wait)
                self._cond.notify_all()  # a job waiting for this worker starts its own
            log.error("could not keep a worker warm (trying again in %.0f s): %s", wait, e)
            return
        with self._cond:  # one step: a job waiting for it never sees it neither starting nor there
            self._starting[key] -= 1
            self._backoff.pop(key, None)
            closed = self._closed
            if not closed:
                self._workers.append(w)
            self._cond.notify_all()
        if closed:
            self._stop(w, "the node is stopping", logging.INFO)

    def _ensure_reaper(self) -> None:
        if self._reaper is None and not self._closed:
            self._reaper = threading.Thread(target=self._reap_loop, name="plugin-worker-reaper", daemon=True)
            self._reaper.start()

    def _reap_loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait(REAP_INTERVAL)
                if self._closed:
                    return
            try:
                self.reap()
            except Exception:  # never let the reaper die: idle workers would live forever
                log.exception("reaping idle plugin workers failed")

    def reap(self) -> None:
        """Stop idle workers past their idle_timeout (beyond keep_warm), forget dead ones, top up keep_warm."""
        now = time.monotonic()
        stop: list[Worker] = []
        with self._cond:
            for w in list(self._workers):
                if w.busy:
                    continue
                if not w.alive():
                    self._forget(w, f"ended while idle: {w.death()}")
                    continue
            for key, spec in self._specs.items():
                idle = sorted((w for w in self._workers if w.key == key and not w.busy), key=lambda w: w.last_used)
                total = sum(1 for w in self._workers if w.key == key)
                for w in idle:
                    if total <= spec.settings.keep_warm:
                        break
                    if now - w.last_used >= spec.settings.idle_timeout:
                        stop.append(w)
                        self._workers.remove(w)  # under the lock: no lease can take it from here on
                        total -= 1
        for w in stop:
            idle_timeout = w.settings.idle_timeout if w.settings is not None else 0
            self._stop(w, f"idle for idle_timeout = {idle_timeout:g} s", logging.INFO)
        self._top_up()

    # -- the whole pool --------------------------------------------------------------------------------

    def state(self, memory: bool = True) -> list[dict[str, Any]]:
        """Each worker as a dict (``memory``: with its resident memory, measured outside the pool's lock)."""
        now = time.monotonic()
        with self._cond:
            workers = list(self._workers)
            out = [
                {
                    "environment": w.key.environment,
                    "plugin": w.key.plugin,
                    "device": w.key.device,
                    "pid": w.pid,
                    "busy": w.busy,
                    "jobs": w.jobs,
                    "setup_seconds": round(w.setup_seconds, 3),
                    "idle_seconds": 0.0 if w.busy else round(now - w.last_used, 1),
                }
                for w in workers
            ]
        if memory:
            for item, w in zip(out, workers, strict=True):
                item["rss_mb"] = round(w.rss_mb(), 1)
        return out

    def close(self) -> None:
        with self._cond:
            self._closed = True
            workers, self._workers = list(self._workers), []
            self._cond.notify_all()
        for w in workers:
            if w.alive():
                kill_tree(w.pid)
        for w in workers:
            try:
                w.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        self._spawner.shutdown(wait=False)
        shutil.rmtree(self._sockets, ignore_errors=True)


def _kill_group(pgid: int) -> None:
    """SIGKILL what is left of a worker's process group (it leads one: start_new_session) once it has ended."""
    from node.plugins.runtime import _kill_orphaned_group

    _kill_orphaned_group(pgid)


#: Worker logs kept in the log folder (the oldest go first, when a pool starts).
KEEP_LOGS = 200


def _prune_logs(folder: Path) -> None:
    try:
        logs = sorted(folder.glob("*.log"), key=lambda p: p.stat().st_mtime)
    except OSError:
        return
    for old in logs[:-KEEP_LOGS] if len(logs) > KEEP_LOGS else []:
        old.unlink(missing_ok=True)


def _drain(stream: IO[bytes] | None, log_path: Path) -> None:
    """Copy what a worker prints after its ready line into its log (a full pipe would stall it)."""
    if stream is None:
        return
    with open(log_path, "ab") as f:
        for chunk in iter(lambda: stream.read1(65536) if hasattr(stream, "read1") else stream.read(65536), b""):
            f.write(chunk)
            f.flush()


_pool: WorkerPool | None = None
_pool_lock = threading.Lock()


def pool(log_dir: Path | None = None) -> WorkerPool:
    """The node's worker pool (made on first use; ``log_dir`` is where worker logs go)."""
    global _pool
    with _pool_lock:
        if _pool is None or _pool._closed:
            _pool = WorkerPool(log_dir or Path(tempfile.gettempdir()) / "dicom-node-worker-logs")
        return _pool


def close_pool() -> None:
    global _pool
    with _pool_lock:
        p, _pool = _pool, None
    if p is not None:
        p.close()
