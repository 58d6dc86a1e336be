"""The FastAPI application: API, pages, health and metrics, with authentication in front."""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Awaitable, Callable
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles

from node import __version__
from node.web import api, dicomweb, pages
from node.web.context import LoginRequired, WebContext, identify

STATIC = Path(__file__).parent / "static"
# Swagger UI's JS, CSS and icon as the fastapi-offline package ships them: /api/docs works without a CDN.
SWAGGER_ASSETS = "/static/swagger-ui"
DOCS_URL = "/api/docs"

# Pages hold patient data: no script, style or image from another host, no inline scripts.
CSP = "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src {scripts}; frame-ancestors 'none'"

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
        docs_url=None,  # served by docs_page below, from packaged assets
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
        # Pages hold patient data: never cached by a shared proxy, never framed, no inline scripts
        # (only the API docs page sets its own policy, allowing its one inline script by hash).
        response.headers.setdefault("Cache-Control", "no-store")
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "same-origin"
        response.headers.setdefault("Content-Security-Policy", CSP.format(scripts="'self'"))
        return response

    docs_html, docs_csp = docs_page(app.title, app.openapi_url or "/openapi.json")

    @app.get(DOCS_URL, include_in_schema=False)
    def api_docs() -> HTMLResponse:
        return HTMLResponse(docs_html, headers={"Content-Security-Policy": docs_csp})

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
    # Before /static, which would otherwise take these paths.
    app.mount(SWAGGER_ASSETS, StaticFiles(packages=[("fastapi_offline", "static")]), name="swagger-ui")
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def docs_page(title: str, openapi_url: str) -> tuple[str, str]:
    """FastAPI's Swagger UI page on the node's own copy of Swagger UI, and a CSP that lets its one
    inline script (the SwaggerUIBundle call FastAPI writes) run by its SHA-256 and nothing else inline.

    The hash is taken from the page FastAPI generates, so a FastAPI upgrade that changes the script
    changes the hash with it, and no copy of FastAPI's Swagger UI set-up is kept here.
    """
    page = get_swagger_ui_html(
        openapi_url=openapi_url,
        title=f"{title} - API",
        swagger_js_url=f"{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{SWAGGER_ASSETS}/favicon.png",
        oauth2_redirect_url=None,  # the API takes a bearer token or Basic, not OAuth2
    )
    html = bytes(page.body).decode()
    hashes = " ".join(
        f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in re.findall(r"<script>(.*?)</script>", html, flags=re.DOTALL)
    )
    return html, CSP.format(scripts=f"'self' {hashes}")
