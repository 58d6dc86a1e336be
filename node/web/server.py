"""uvicorn in a thread of the node's process, started and stopped with the node."""

from __future__ import annotations

import asyncio
import logging
import threading

import uvicorn

from node.web.app import create_app
from node.web.context import WebContext

log = logging.getLogger(__name__)


class WebServer:
    def __init__(self, ctx: WebContext) -> None:
        web = ctx.cfg.web
        self.ctx = ctx
        self.app = create_app(ctx)
        config = uvicorn.Config(
            self.app,
            host=web.host,
            port=web.port,
            log_level="warning",
            access_log=False,
            lifespan="off",
            server_header=False,
        )
        # Served from its own thread, where uvicorn installs no signal handlers: the node owns those.
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._run, name="web", daemon=True)
        self._error: BaseException | None = None
        self.port = web.port

    def _run(self) -> None:
        try:
            asyncio.run(self.server.serve())
        except BaseException as e:  # SystemExit from uvicorn when it cannot bind
            self._error = e

    def start(self, timeout: float = 15.0) -> None:
        if self.ctx.sampler is not None:
            self.ctx.sampler.start()
        self._thread.start()
        for _ in range(int(timeout / 0.05)):
            if self.server.started or not self._thread.is_alive():
                break
            self._thread.join(0.05)
        if not self.server.started:
            web = self.ctx.cfg.web
            raise OSError(
                f"the web server cannot listen on {web.host}:{web.port} ([web] host/port): "
                f"{self._error or 'it did not start in time'}"
            )
        self.port = self.server.servers[0].sockets[0].getsockname()[1]

    def stop(self) -> None:
        if self.ctx.sampler is not None:
            self.ctx.sampler.stop()
        self.server.should_exit = True
        self._thread.join(10)
        # uvicorn runs without its lifespan here (lifespan="off"): the STOW-RS store threads end with the server.
        pool = getattr(self.app.state, "stow_pool", None)
        if pool is not None:
            pool.shutdown()
