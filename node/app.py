"""The running node: wires storage, index, recovery and the SCP, and stops them in order."""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import select

from node import __version__, metrics
from node.config import Config
from node.decide.compile import compile_rules
from node.decide.tracker import SeriesTracker
from node.derive.store import OutputStore
from node.index.cluster import NODE, RECEIVER, RUN_DIR, Membership
from node.index.db import WalCheckpointer, make_engine, migrate, session_factory
from node.index.writer import IndexWriter
from node.jobs.runner import JobRunner
from node.logs import set_redaction
from node.qr.service import QueryRetrieve
from node.receive.ingest import Ingest
from node.receive.scp import StorageSCP
from node.send.dispatch import Dispatcher
from node.storage import Storage
from node.storage.recovery import Recovery
from node.storage.retention import Retention

if TYPE_CHECKING:
    from node.web.server import WebServer

log = logging.getLogger(__name__)


class Node:
    """One node process: the whole node (``role`` NODE), or one of its extra receivers (RECEIVER).

    With ``[node] processes = N`` the first process starts N-1 receiver processes on the same config
    (:class:`Receivers`): they only take the DICOM port (SO_REUSEPORT: the kernel spreads the
    associations), store, index and track series; jobs, sending, retention and the web stay here.
    ``config_path``: the file the receivers are started with (None: the default lookup, as
    ``dicom-node run`` without ``--config``). ``parent``: a receiver's line to the process that started it.
    """

    def __init__(
        self,
        cfg: Config,
        *,
        role: str = NODE,
        config_path: Path | None = None,
        parent: ParentLink | None = None,
    ) -> None:
        if cfg.ruleset is None:  # a config loaded without its rules (node.config.load_config): compile them now
            cfg.ruleset = compile_rules(cfg)
        self.cfg = cfg
        self.role = role
        self.parent = parent
        set_redaction(cfg.logging.redact_phi)
        self.engine = make_engine(cfg.database_url)
        # Reads by the tracker and the job workers' polls: on SQLite they then need no write lock,
        # which the receive path's index writer holds for every commit.
        self.reader = make_engine(cfg.database_url, write=False)
        self.sessions = session_factory(self.engine)
        #: This process in the index: the owner of what it claims, its heartbeat (node.index.cluster).
        self.membership = Membership(
            self.engine, cfg.data_dir.resolve() / RUN_DIR, lease=cfg.node.lease, role=role, version=__version__
        )
        #: Temp and quarantine directories of this process's own (node.storage.layout).
        self.storage = Storage(cfg.data_dir, self.membership.id)
        self.writer = IndexWriter(self.engine)
        self.checkpointer = WalCheckpointer(self.engine)
        self.recovery = Recovery(self.storage, self.writer, self.membership)
        self.membership.on_beat.append(self.recovery.sweep)  # files that crashed processes left
        self.runner = JobRunner(cfg, self.engine, self.storage, reader=self.reader, owner=self.membership.id)
        self.dispatcher = Dispatcher(cfg, self.engine, self.storage, reader=self.reader, owner=self.membership.id)
        if role == NODE:  # a receiver runs no jobs and sends nothing: what it would take over would wait
            self.membership.on_beat += [self.runner.take_over, self.dispatcher.take_over]
        self.runner.wake_senders = self.dispatcher.wake
        self.tracker = SeriesTracker(
            cfg, self.engine, on_jobs=self._jobs_made, reader=self.reader, lease=self.membership.lease
        )
        self.membership.on_beat.append(self.tracker.sweep)  # series and revisions a dead process left
        self.ingest = Ingest(
            self.storage,
            self.writer,
            duplicates=cfg.node.duplicates,
            min_free_bytes=cfg.node.min_free_mb * 2**20,
            on_recorded=self.tracker.arrived,
        )
        # Derived objects go through the same index writer and duplicate rules as received ones.
        self.runner.outputs = OutputStore(self.storage, self.writer, self.ingest.recorder, cfg.node.ae_title)
        self.runner.ingest = self.ingest  # priors retrieved by C-GET (node.qr.priors) are stored as received
        self.retention = (
            Retention(cfg, self.engine, self.storage, reader=self.reader, owner=self.membership.id)
            if cfg.retention.enabled
            else None
        )
        self.scp: StorageSCP | None = None
        self.receivers = (
            Receivers(cfg.node.processes - 1, config_path, on_jobs=self.runner.wake, on_senders=self.dispatcher.wake)
            if role == NODE and cfg.node.processes > 1
            else None
        )
        self.qr = self._qr() if cfg.qr.enabled else None
        self.web = self._web() if cfg.web.enabled and role == NODE else None
        self._stop = threading.Event()

    def _qr(self) -> QueryRetrieve:
        """The Query/Retrieve SCP's service (C-FIND, C-MOVE, C-GET), in a receiver process too: it shares the index."""
        return QueryRetrieve(self.cfg, self.reader, self.engine, self.storage, self._wake_senders, writer=self.writer)

    def _wake_senders(self, destinations: list[str]) -> None:
        """Deliveries are due for ``destinations``: the dispatcher sends them now, not at its next poll."""
        if self.parent is not None:
            self.parent.tell(SENDERS)
        else:
            self.dispatcher.wake(destinations)

    def _web(self) -> WebServer:
        """The dashboard, REST API, /metrics and health checks (node.web), served from this process."""
        from node.web.auth import Authenticator, load_token
        from node.web.context import WebContext
        from node.web.data import RateSampler
        from node.web.server import WebServer

        token, self._token_source = load_token(self.cfg.web, self.cfg.data_dir)
        ctx = WebContext(
            self.cfg,
            self.engine,
            self.reader,
            Authenticator(self.cfg.web, token, self.engine, self.reader),
            sampler=RateSampler(self.reader),
            checks=self._readiness(),
            wake_jobs=self.runner.wake,
            wake_senders=self.dispatcher.wake,
            retention=self.retention,
            ingest=self.ingest,
            storage=self.storage,
        )
        return WebServer(ctx)

    def _readiness(self) -> dict[str, Callable[[], str]]:
        def index() -> str:
            with self.reader.connect() as conn:
                conn.execute(select(1))
            return "" if self.writer.alive else "the index writer has stopped"

        def storage() -> str:
            if not os.access(self.storage.files, os.W_OK):
                return f"{self.storage.files} is not writable"
            free = shutil.disk_usage(self.storage.root).free
            low = self.cfg.node.min_free_mb * 2**20
            return f"only {free // 2**20} MiB free (min_free_mb is {self.cfg.node.min_free_mb})" if free < low else ""

        def scp() -> str:
            return "" if self.scp is not None and self.scp.listening else "the DICOM port is not listening"

        checks = {"index": index, "storage": storage, "dicom": scp, "heartbeat": self.membership.problem}
        if self.receivers is not None:
            checks["receivers"] = self.receivers.problems
        return checks

    def _jobs_made(self) -> None:
        """The tracker made jobs: wake the job runner, which in a receiver is the parent's."""
        if self.parent is not None:
            self.parent.tell(JOBS)
        else:
            self.runner.wake()

    def start(self) -> None:
        if self.role == RECEIVER:
            self._start_receiver()
            return
        log.info("dicom-node %s starting (config: %s)", __version__, self.cfg.source)
        log.info("data directory %s, index %s", self.storage.root, self.engine.url.render_as_string(hide_password=True))
        migrate(self.engine)
        self.membership.register()
        self.membership.heartbeat()  # from now on: a long start must not let the lease run out
        self.storage.prepare()  # after registering: see Storage.prepare
        self.writer.start()
        self.checkpointer.start()
        metrics.install(self.reader, self.storage.root)
        self.recovery.at_start()
        if any(a.type == "plugin" for r in self.tracker.ruleset for a in r.model.actions):
            from node.plugins.runtime import start_fork_server

            start_fork_server()  # from this (main) thread: see start_fork_server
            self._keep_workers_warm()
            from node.plugins.gpus import gpu_warnings

            for warning in gpu_warnings(self.cfg):
                log.warning("%s", warning)
        self.dispatcher.start()
        self.runner.start()
        if self.retention is not None:
            self.retention.start()
        self.tracker.start()
        self.membership.start()
        log.info(
            "%d rule(s) loaded; series are stable after %g s without a new instance (unless a rule says otherwise)",
            len(self.tracker.ruleset),
            self.cfg.tracker.stable_after,
        )
        commitment = any(d.storage_commitment for d in self.cfg.destinations)
        # The web side first: once the DICOM port answers, /healthz and the API do too (/readyz tells the
        # DICOM port's state).
        if self.web is not None:
            self.web.start()
            web = self.cfg.web
            auth = {
                "none": 'no authentication ([web] auth = "none")',
                "token": f"token from {self._token_source}",
                "users": f"local users, or the token from {self._token_source}",
            }[web.auth]
            log.info(
                "dashboard and REST API on http://%s:%d/ (%s); OpenAPI at /openapi.json, metrics at /metrics",
                web.host,
                self.web.port,
                auth,
            )
        self.scp = StorageSCP(
            self.cfg, self.ingest, self.dispatcher.commitment_report if commitment else None, qr=self.qr
        )
        self.scp.start()
        if self.receivers is not None:  # after this process holds the port (and has migrated and recovered)
            self.receivers.start(self.scp.acceptor.port)

    def _start_receiver(self) -> None:
        """A receiver: the DICOM port, storage, the index writer and the series tracker; nothing else.

        The first process has migrated the index and reconciled the data directory before starting it;
        what a receiver that crashed left is reconciled by the holder of the "recovery" duty.
        """
        log.info("dicom-node %s receiver process starting (config: %s)", __version__, self.cfg.source)
        self.membership.register()
        self.membership.heartbeat()  # from now on: a long start must not let the lease run out
        self.storage.prepare()  # after registering: see Storage.prepare
        self.writer.start()
        self.tracker.start()
        self.membership.start()
        commitment = any(d.storage_commitment for d in self.cfg.destinations)
        self.scp = StorageSCP(
            self.cfg, self.ingest, self.dispatcher.commitment_report if commitment else None, qr=self.qr
        )
        self.scp.start()
        if self.parent is not None:
            self.parent.tell(READY)

    def _keep_workers_warm(self) -> None:
        """Start the keep_warm workers of the environment plugins the rules use (in the background)."""
        from node.plugins.pool import WorkerKey, WorkerSpec, pool
        from node.plugins.registry import discover

        plugins = self.cfg.plugins
        used = {st.name for r in self.tracker.ruleset for a in r.model.actions if a.type == "plugin" for st in a.steps}
        wanted = {}
        for name, ref in discover(plugins).items():
            if ref.kind != "environment" or name not in used or ref.remote is None:
                continue
            env = plugins.environments[ref.environment or ""]
            settings = env.warm(name)
            if not settings.keep_warm:
                continue
            gpu = str(ref.remote.get("gpu") or "none")
            # A worker's GPU is fixed when it starts: warm one per device when the plugin would be given one.
            devices: list[str | None] = list(plugins.gpus) if plugins.gpus and gpu != "none" else [None]
            for device in devices:
                wanted[WorkerKey(ref.environment or "", name, ref.target, device)] = WorkerSpec(
                    env.python, dict(env.env), settings
                )
        if wanted:
            pool(self.cfg.data_dir / "logs" / "workers").keep_warm(wanted)

    def stop(self) -> None:
        if self.receivers is not None:
            self.receivers.stop_begin()  # they finish their associations while this process does
        if self.retention is not None and self.role == NODE:
            self.retention.stop()  # a run going on ends after its current series
        log.info("stopping: finishing open associations")
        clean = True
        if self.web is not None:
            self.web.stop()
        if self.qr is not None:
            self.qr.stop()  # a C-MOVE waiting for its deliveries answers now: its association can end
        if self.scp is not None:
            clean = self.scp.stop()
        if self.receivers is not None:
            self.receivers.join()  # their jobs still reach this process's runner meanwhile
        self.tracker.stop()
        if self.role == NODE:  # a receiver did not start them
            # A job still running would leave its outputs' temp files and perhaps a stored but unindexed output.
            clean = self.runner.stop() and clean
            from node.plugins.pool import close_pool

            close_pool()  # after the jobs: a job still running gave its worker back or was stopped
            self.dispatcher.stop()
        self.recovery.stop()  # a reconciliation in progress ends before the index writer does
        clean = self.writer.stop() and clean
        self.checkpointer.stop()
        metrics.uninstall()
        if clean:  # nothing in flight any more; an unclean stop's temp files go when it is reconciled
            self.storage.clear_temp(self.storage.tmp)
        self.membership.stop(clean=clean)  # stopped_at: nothing for anyone to reconcile
        self.engine.dispose()
        self.reader.dispose()
        if clean:
            log.info("stopped cleanly")
        else:
            # Something may have been stored but not indexed: it is reconciled (node.storage.recovery).
            log.warning(
                "stopped, but not cleanly (associations aborted, jobs still running or index writes unfinished)"
            )

    def run_forever(self) -> None:
        """Run until SIGINT/SIGTERM, then stop cleanly."""

        def _signal(signum: int, _frame: object) -> None:
            log.info("received %s", signal.Signals(signum).name)
            self._stop.set()

        signal.signal(signal.SIGINT, _signal)
        signal.signal(signal.SIGTERM, _signal)
        self.start()
        try:
            while not self._stop.wait(1.0):
                pass
        finally:
            self.stop()


# -- several receivers on one host ([node] processes) ----------------------------------------------

#: What a receiver tells the process that started it, one byte each over a pipe: it listens; it made
#: jobs (wake the job runner); it queued deliveries (a C-MOVE: wake the dispatcher).
READY = b"R"
JOBS = b"J"
SENDERS = b"S"
#: A receiver that died is started again after RESTART_MIN s, doubling up to RESTART_MAX while it keeps
#: dying; one that ran STEADY s before dying counts as healthy again.
RESTART_MIN = 1.0
RESTART_MAX = 60.0
STEADY = 60.0
#: How long a stopping receiver may take (it finishes its associations like the node: StorageSCP.stop).
STOP_TIMEOUT = 45.0


class ParentLink:
    """A receiver process's line to the node process that started it.

    It dies with that process (the kernel's parent-death signal: SIGTERM, a clean stop), and tells it
    what the parent's threads must hear at once: that it listens, that its tracker made jobs and that
    a C-MOVE queued deliveries (the parent's job runner and dispatcher would otherwise find them at
    their next poll, up to 2 s later).
    """

    def __init__(self, parent_pid: int, fd: int) -> None:
        from node.plugins.runtime import die_with_parent

        die_with_parent(signal.SIGTERM, parent_pid)
        self.fd = fd
        os.set_blocking(fd, False)

    def tag_logs(self) -> None:
        """Mark this process's log lines: they go to the same output as the node process's."""
        tag = _ReceiverTag(f"[receiver pid {os.getpid()}] ")
        for handler in logging.getLogger().handlers:
            handler.addFilter(tag)

    def tell(self, message: bytes) -> None:
        try:
            os.write(self.fd, message)
        except BlockingIOError:  # the pipe is full of wake-ups the parent has still to read: one more adds nothing
            pass
        except OSError as e:  # the parent is gone: its death signal stops this process
            log.debug("cannot tell the node process %r: %s", message, e)


class _ReceiverTag(logging.Filter):
    """Puts ``prefix`` before each message of a receiver process (once, whatever the handlers)."""

    def __init__(self, prefix: str) -> None:
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "receiver_tagged", False):
            record.msg = self.prefix + str(record.msg)
            record.receiver_tagged = True
        return True


@dataclass
class _Child:
    """One receiver slot: its process (None while waiting to be started again) and what it said."""

    number: int
    proc: subprocess.Popen[bytes] | None = None
    pipe: int | None = None
    ready: bool = False
    started: float = 0.0
    restart_at: float = 0.0
    delay: float = RESTART_MIN
    last_exit: str = ""


class Receivers:
    """The first process's supervisor of its ``count`` receiver processes.

    One thread starts them, reads what they tell (readiness, new jobs), starts one again that died
    (with back-off, logged), and on stop sends them SIGTERM and waits until they stopped cleanly. The
    same thread does all of it because the kernel's parent-death signal follows the *thread* that
    started a child: it must live as long as the children do.
    """

    def __init__(
        self,
        count: int,
        config_path: Path | None,
        *,
        on_jobs: Callable[[], None],
        on_senders: Callable[[], None] = lambda: None,
    ) -> None:
        self.config_path = config_path
        self.on_jobs = on_jobs
        self.on_senders = on_senders
        self.children = [_Child(i + 1) for i in range(count)]
        self.port = 0
        self._stopping = threading.Event()
        self._sel = selectors.DefaultSelector()
        self._thread = threading.Thread(target=self._run, name="receivers", daemon=True)

    def start(self, port: int) -> None:
        """Start the receivers on ``port`` (the port this process listens on, also when configured as 0)."""
        self.port = port
        self._thread.start()

    def stop_begin(self) -> None:
        self._stopping.set()

    def join(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(STOP_TIMEOUT + 10)

    def problems(self) -> str:
        """For /readyz: which receivers are not listening now (empty when all are)."""
        bad = []
        for c in self.children:
            if c.ready and c.proc is not None:
                continue
            if c.proc is not None:
                bad.append(f"receiver {c.number} (pid {c.proc.pid}) is starting")
            else:
                bad.append(f"receiver {c.number} {c.last_exit or 'is not started'}")
        return "; ".join(bad)

    def command(self, fd: int) -> list[str]:
        config = ["--config", str(self.config_path)] if self.config_path is not None else []
        return [sys.executable, "-m", "node", "run", *config, "--receiver-of", str(os.getpid()), "--notify-fd", str(fd)]

    # -- the supervisor thread ------------------------------------------------

    def _run(self) -> None:
        try:
            while not self._stopping.is_set():
                now = time.monotonic()
                for c in self.children:
                    if c.proc is None and now >= c.restart_at:
                        self._spawn(c)
                self._read(0.25)
                for c in self.children:
                    if c.proc is not None and c.proc.poll() is not None:
                        self._ended(c)
        except Exception:  # the receivers must still be stopped below
            log.exception("the receiver supervisor failed; stopping the receiver processes")
        finally:
            self._stop_all()

    def _spawn(self, c: _Child) -> None:
        r, w = os.pipe()
        env = {**os.environ, "DICOM_NODE_NODE__PORT": str(self.port)}
        try:
            c.proc = subprocess.Popen(self.command(w), pass_fds=(w,), stdin=subprocess.DEVNULL, env=env)
        except OSError as e:
            os.close(r)
            c.last_exit = f"could not be started ({e}); trying again in {c.delay:g} s"
            log.error("receiver process %d %s", c.number, c.last_exit)
            c.restart_at = time.monotonic() + c.delay
            c.delay = min(c.delay * 2, RESTART_MAX)
            return
        finally:
            os.close(w)
        os.set_blocking(r, False)
        c.pipe, c.ready, c.started = r, False, time.monotonic()
        self._sel.register(r, selectors.EVENT_READ, c)
        log.info("started receiver process %d (pid %d) on port %d", c.number, c.proc.pid, self.port)

    def _read(self, timeout: float) -> None:
        """Handle what the receivers said within ``timeout`` s."""
        said = b""
        for key, _ in self._sel.select(timeout):
            c: _Child = key.data
            data = self._drain(c)
            if READY in data and not c.ready:
                c.ready = True
                log.info("receiver process %d (pid %d) is listening", c.number, c.proc.pid if c.proc else 0)
            said += data
        self._wake(said)

    def _wake(self, said: bytes) -> None:
        """Wake what the receivers' messages ask for (each once, however often it was asked)."""
        if JOBS in said:
            self.on_jobs()
        if SENDERS in said:
            self.on_senders()

    def _drain(self, c: _Child) -> bytes:
        """Everything ``c`` wrote so far; closes the pipe at its end (the child exited)."""
        if c.pipe is None:
            return b""
        chunks = []
        while True:
            try:
                chunk = os.read(c.pipe, 4096)
            except BlockingIOError:
                break
            if not chunk:
                self._sel.unregister(c.pipe)
                os.close(c.pipe)
                c.pipe = None
                break
            chunks.append(chunk)
        return b"".join(chunks)

    def _ended(self, c: _Child) -> None:
        """``c`` exited while the node runs: log how, and start it again after its back-off."""
        assert c.proc is not None
        self._forget(c)
        code = c.proc.returncode
        how = f"was killed by {_signal_name(-code)}" if code < 0 else f"exited with status {code}"
        ran = time.monotonic() - c.started
        c.delay = RESTART_MIN if ran >= STEADY else c.delay
        c.last_exit = f"(pid {c.proc.pid}) {how} after {ran:.0f} s; starting it again in {c.delay:g} s"
        log.error("receiver process %d %s", c.number, c.last_exit)
        c.restart_at = time.monotonic() + c.delay
        c.delay = min(c.delay * 2, RESTART_MAX)
        c.proc, c.ready = None, False

    def _forget(self, c: _Child) -> None:
        self._wake(self._drain(c))  # its last jobs and deliveries count too
        if c.pipe is not None:
            self._sel.unregister(c.pipe)
            os.close(c.pipe)
            c.pipe = None

    def _stop_all(self) -> None:
        """SIGTERM to every receiver, then wait (reading their last wake-ups) until they stopped; SIGKILL after STOP_TIMEOUT."""
        running = [c for c in self.children if c.proc is not None and c.proc.poll() is None]
        for c in running:
            assert c.proc is not None
            c.proc.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT
        while any(c.proc.poll() is None for c in running if c.proc is not None):
            if time.monotonic() > deadline:
                for c in running:
                    if c.proc is not None and c.proc.poll() is None:
                        log.error(
                            "receiver process %d (pid %d) did not stop in %g s: killed",
                            c.number,
                            c.proc.pid,
                            STOP_TIMEOUT,
                        )
                        c.proc.kill()
                        with contextlib.suppress(subprocess.TimeoutExpired):
                            c.proc.wait(10)
                break
            self._read(0.1)
        for c in self.children:
            if c.proc is not None:
                self._forget(c)
                if c.proc.returncode != 0:
                    log.warning(
                        "receiver process %d (pid %d) stopped with status %s", c.number, c.proc.pid, c.proc.returncode
                    )
                c.proc, c.ready = None, False
                c.last_exit = "is stopped"
        self._sel.close()


def _signal_name(number: int) -> str:
    """SIGKILL etc.; a real-time signal has no name in the enum."""
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"
