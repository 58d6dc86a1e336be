"""The FastAPI application: API, pages, health and metrics, with authentication in front."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from node import __version__
from node.web import api, dicomweb, pages
from node.web.context import LoginRequired, WebContext, identify

STATIC = Path(__file__).parent / "static"

DESCRIPTION = """\
The REST API of a dicom-node: what it received, what its rules and plugins made of it, and where it was
delivered; retry and cancel jobs and deliveries. Authenticate with `Authorization: Bearer <token>` (the
token is `[web] token`, or the one generated into `<data_dir>/web-token`), or HTTP Basic for a local user.
"""


def create_app(ctx: WebContext) -> FastAPI:
    app = FastAPI(
        title="dicom-node",
        version=__version__,
        description=DESCRIPTION,
        docs_url="/api/docs",
        redoc_url=None,
        openapi_url="/openapi.json",
    )
    app.state.ctx = ctx

    @app.exception_handler(LoginRequired)
    async def _login(_request: Request, exc: LoginRequired) -> Response:
        return RedirectResponse(exc.target, status_code=303)

    @app.middleware("http")
    async def _headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        response = await call_next(request)
        # Pages hold patient data: never cached by a shared proxy, never framed, no inline scripts.
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers["Content-Security-Policy"] = (
            "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; frame-ancestors 'none'"
        )
        return response

    @app.get("/healthz", tags=["health"], summary="The process is up")
    def healthz() -> dict[str, str]:
        return {"status": "ok", "version": __version__}

    @app.get(
        "/readyz",
        tags=["health"],
        summary="The node can take work: index, storage, SCP and workers",
        responses={503: {"description": "not ready; the body says what is wrong"}},
    )
    def readyz() -> Response:
        problems = {}
        for name, check in ctx.checks.items():
            try:
                why = check()
            except Exception as e:  # a check that cannot run is a failed check
                why = f"{type(e).__name__}: {e}"
            if why:
                problems[name] = why
        body = {
            "status": "not ready" if problems else "ready",
            "checks": {n: problems.get(n, "ok") for n in ctx.checks},
        }
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get(
        "/metrics",
        tags=["health"],
        summary="Prometheus metrics",
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}, 401: {"description": "authentication required"}},
    )
    def metrics(request: Request) -> Response:
        if not ctx.cfg.web.public_metrics and identify(request) is None:
            return JSONResponse(
                {"detail": "authentication required"},
                status_code=401,
                headers={"WWW-Authenticate": 'Bearer realm="dicom-node"'},
            )
        try:
            from node.metrics import exposition
        except ImportError:
            return Response("# metrics are not available in this build\n", media_type="text/plain")
        body, content_type = exposition()
        return Response(body, media_type=content_type)

    app.include_router(api.router, tags=["api"])
    app.include_router(dicomweb.router)
    app.include_router(pages.router, include_in_schema=False)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
