"""The running node: wires storage, index, recovery and the SCP, and stops them in order."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from sqlalchemy import select

from node import __version__, metrics
from node.config import Config
from node.decide.compile import compile_rules
from node.decide.tracker import SeriesTracker
from node.derive.store import OutputStore
from node.index.cluster import RUN_DIR, Membership
from node.index.db import WalCheckpointer, make_engine, migrate, session_factory
from node.index.models import Instance
from node.index.writer import IndexWriter
from node.jobs.runner import JobRunner
from node.logs import set_redaction
from node.receive.ingest import Ingest
from node.receive.scp import StorageSCP
from node.send.dispatch import Dispatcher
from node.storage import Storage
from node.storage.recovery import mark_clean, recover
from node.storage.retention import Retention

if TYPE_CHECKING:
    from node.web.server import WebServer

log = logging.getLogger(__name__)


class Node:
    def __init__(self, cfg: Config) -> None:
        if cfg.ruleset is None:  # a config loaded without its rules (node.config.load_config): compile them now
            cfg.ruleset = compile_rules(cfg)
        self.cfg = cfg
        set_redaction(cfg.logging.redact_phi)
        self.storage = Storage(cfg.data_dir)
        self.engine = make_engine(cfg.database_url)
        # Reads by the tracker and the job workers' polls: on SQLite they then need no write lock,
        # which the receive path's index writer holds for every commit.
        self.reader = make_engine(cfg.database_url, write=False)
        self.sessions = session_factory(self.engine)
        #: This process in the index: the owner of what it claims, its heartbeat (node.index.cluster).
        self.membership = Membership(
            self.engine, cfg.data_dir.resolve() / RUN_DIR, lease=cfg.node.lease, version=__version__
        )
        self.writer = IndexWriter(self.engine, on_failure=lambda: self.ingest.recorder.forget())
        self.checkpointer = WalCheckpointer(self.engine)
        self.runner = JobRunner(cfg, self.engine, self.storage, reader=self.reader, owner=self.membership.id)
        self.membership.on_beat.append(self.runner.take_over)
        self.dispatcher = Dispatcher(cfg, self.engine, self.storage, reader=self.reader)
        self.runner.wake_senders = self.dispatcher.wake
        self.tracker = SeriesTracker(cfg, self.engine, on_jobs=self.runner.wake, reader=self.reader)
        self.ingest = Ingest(
            self.storage,
            self.writer,
            duplicates=cfg.node.duplicates,
            min_free_bytes=cfg.node.min_free_mb * 2**20,
            on_recorded=self.tracker.arrived,
        )
        # Derived objects go through the same index writer and duplicate rules as received ones.
        self.runner.outputs = OutputStore(self.storage, self.writer, self.ingest.recorder, cfg.node.ae_title)
        self.retention = (
            Retention(cfg, self.engine, self.storage, reader=self.reader) if cfg.retention.enabled else None
        )
        self.scp: StorageSCP | None = None
        self.web = self._web() if cfg.web.enabled else None
        self._stop = threading.Event()

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

        return {"index": index, "storage": storage, "dicom": scp}

    def start(self) -> None:
        log.info("dicom-node %s starting (config: %s)", __version__, self.cfg.source)
        log.info("data directory %s, index %s", self.storage.root, self.engine.url.render_as_string(hide_password=True))
        new_dir = self.storage.prepare()
        migrate(self.engine)
        self.membership.register()
        if new_dir and self._index_is_empty():
            mark_clean(self.storage)  # nothing to reconcile: no files and no rows
        self.writer.start()
        self.checkpointer.start()
        metrics.install(self.reader, self.storage.root)
        recover(self.storage, self.sessions, self.writer)
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
        self.scp = StorageSCP(self.cfg, self.ingest, self.dispatcher.commitment_report if commitment else None)
        self.scp.start()

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

    def _index_is_empty(self) -> bool:
        with self.sessions() as s:
            return s.execute(select(Instance.id).limit(1)).first() is None

    def stop(self) -> None:
        if self.retention is not None:
            self.retention.stop()  # a run going on ends after its current series
        log.info("stopping: finishing open associations")
        clean = True
        if self.web is not None:
            self.web.stop()
        if self.scp is not None:
            clean = self.scp.stop()
        self.tracker.stop()
        self.runner.stop()
        from node.plugins.pool import close_pool

        close_pool()  # after the jobs: a job still running gave its worker back or was stopped
        self.dispatcher.stop()
        clean = self.writer.stop() and clean
        self.checkpointer.stop()
        metrics.uninstall()
        self.membership.stop(clean=clean)
        self.engine.dispose()
        self.reader.dispose()
        if clean:
            mark_clean(self.storage)
            log.info("stopped cleanly")
        else:
            # Something may have been stored but not indexed: the next start scans.
            log.warning("stopped, but not cleanly (associations aborted or index writes unfinished)")

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
