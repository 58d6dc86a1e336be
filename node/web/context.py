"""What every request handler needs (the node's config, engines, authenticator) and who is asking."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBasic, HTTPBasicCredentials, HTTPBearer
from sqlalchemy import Engine

from node.config import Config
from node.receive.ingest import Ingest
from node.storage.layout import Storage
from node.storage.retention import Retention
from node.web.auth import COOKIE, Authenticator
from node.web.data import RateSampler


def _nothing() -> None:
    pass


@dataclass
class WebContext:
    cfg: Config
    #: Changes (retry, cancel) go through the writing engine; everything shown is read through ``reader``.
    engine: Engine
    reader: Engine
    auth: Authenticator
    sampler: RateSampler | None = None
    #: Readiness checks by name: each returns "" when fine, else what is wrong.
    checks: dict[str, Callable[[], str]] = field(default_factory=dict)
    wake_jobs: Callable[[], None] = _nothing
    wake_senders: Callable[[], None] = _nothing
    #: The node's scheduled clean-up, when [retention] enabled.
    retention: Retention | None = None
    #: STOW-RS stores through the same path as C-STORE (None: this server does not take instances).
    ingest: Ingest | None = None
    #: Where WADO-RS reads stored files from.
    storage: Storage | None = None


def context(request: Request) -> WebContext:
    ctx: WebContext = request.app.state.ctx  # set by create_app
    return ctx


_bearer = HTTPBearer(auto_error=False, description="the token from [web] token or <data_dir>/web-token")
_basic = HTTPBasic(auto_error=False, description='a local user from [[web.users]] (auth = "users")')


def _same_origin(request: Request) -> bool:
    """A browser's form post carries Origin (or Referer); it must name this server."""
    source = request.headers.get("origin") or request.headers.get("referer")
    if not source or source == "null":
        return source is None
    return urlsplit(source).netloc == request.headers.get("host", "")


def identify(request: Request) -> str | None:
    """The authenticated user of a request, or None.

    A change (anything but GET/HEAD) that a browser could have been made to send, by a cookie or
    with authentication off, must come from this server's own pages: a form on another site gets 403.
    """
    ctx = context(request)
    header = request.headers.get("authorization")
    if header and not ctx.auth.open:
        return ctx.auth.from_header(header)  # a script: nothing a browser sends by itself
    if ctx.auth.open:
        user: str | None = "anonymous"
    else:
        sid = request.cookies.get(COOKIE)
        user = ctx.auth.session_user(sid) if sid else None
    if user and request.method not in ("GET", "HEAD") and not _same_origin(request):
        raise HTTPException(403, "this request comes from another site; it is refused")
    return user


def api_user(
    request: Request,
    _b: HTTPAuthorizationCredentials | None = Depends(_bearer),
    _u: HTTPBasicCredentials | None = Depends(_basic),
) -> str:
    user = identify(request)
    if user is None:
        raise HTTPException(
            401,
            "authentication required: send 'Authorization: Bearer <token>' (the token is in [web] token or "
            "<data_dir>/web-token), HTTP Basic for a local user, or log in at /login",
            headers={"WWW-Authenticate": 'Bearer realm="dicom-node"'},
        )
    return user


class LoginRequired(Exception):
    def __init__(self, target: str) -> None:
        self.target = target


def page_user(request: Request) -> str:
    user = identify(request)
    if user is None:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        raise LoginRequired("/login?next=" + quote(target, safe=""))
    return user
