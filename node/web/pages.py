"""The dashboard: server-rendered pages (Jinja2, autoescaped) over the same data as the API."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

from fastapi import APIRouter, Depends, Form, HTTPException, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from markupsafe import Markup

from node import __version__
from node.index import read
from node.index.states import DeliveryState, JobState
from node.units import size
from node.web import data
from node.web.actions import JobId, Selection, delivery_change, job_change
from node.web.auth import COOKIE
from node.web.context import WebContext, context, page_user

#: The header dashboard.js sends to fetch one live region of a page again: its value names the template
#: block (the region's ``data-live`` attribute), and only that block is rendered.
LIVE_HEADER = "X-Live"
_LIVE_BLOCKS = ("live", "facts")


def _note_version(request: Request) -> None:
    """What the data looks like before a page reads it: the page compares later polls of /api/changes
    with this, so a change made while the page was read is not missed."""
    if request.method == "GET" and not request.url.path.endswith(".png"):
        request.state.version = read.changes(context(request).reader)


router = APIRouter(dependencies=[Depends(_note_version)])
templates = Jinja2Templates(directory=Path(__file__).parent / "templates")


def _when(value: str | None) -> Markup | str:
    """A time for people, in UTC and saying so (and as ISO 8601 with its offset, for machines)."""
    if not value:
        return "-"
    at = dt.datetime.fromisoformat(value).astimezone(dt.UTC)
    return Markup('<time datetime="{}">{}</time>').format(at.isoformat(), at.strftime("%Y-%m-%d %H:%M:%S UTC"))


def _date(value: str | None) -> str:
    """A DICOM date (YYYYMMDD) as ISO 8601; anything else as it is."""
    v = value or ""
    return f"{v[:4]}-{v[4:6]}-{v[6:]}" if len(v) == 8 and v.isdigit() else v


def _runs(items: list[dict[str, Any]], key: str = "series_instance_uid") -> list[list[dict[str, Any]]]:
    """Consecutive rows with the same ``key``, together: the jobs table shows their series once."""
    out: list[list[dict[str, Any]]] = []
    for item in items:
        if out and out[-1][0][key] == item[key]:
            out[-1].append(item)
        else:
            out.append([item])
    return out


templates.env.filters["size"] = size
templates.env.filters["when"] = _when
templates.env.filters["date"] = _date
templates.env.filters["runs"] = _runs
templates.env.filters["q"] = lambda s: quote(str(s), safe="")
templates.env.filters["pager"] = lambda params, offset: urlencode({**dict(params), "offset": max(offset, 0)})
templates.env.globals["version"] = __version__


def _render(request: Request, name: str, user: str, **values: Any) -> HTMLResponse:
    """The page ``name``; or, asked with :data:`LIVE_HEADER`, only that block of it (data that changes)."""
    ctx = context(request)
    values = {
        "user": user,
        "open_access": ctx.auth.open,
        "msg": request.query_params.get("msg", ""),
        "version": getattr(request.state, "version", ""),
        **values,
    }
    headers = {"Vary": LIVE_HEADER, "Cache-Control": "no-store"}
    part = request.headers.get(LIVE_HEADER)
    if part:
        template = templates.get_template(name)
        block = template.blocks.get(part) if part in _LIVE_BLOCKS else None
        if block is None:
            raise HTTPException(404, f"{request.url.path} has no live part {part!r}")
        html = "".join(block(template.new_context({"request": request, **values})))
        return HTMLResponse(html, headers=headers)
    return templates.TemplateResponse(request, name, values, headers=headers)


def _safe_next(target: str) -> str:
    """Only a path on this server: never an open redirect to another site."""
    return target if target.startswith("/") and not target.startswith("//") and "\\" not in target else "/"


def _back(target: str, message: str) -> RedirectResponse:
    sep = "&" if "?" in target else "?"
    return RedirectResponse(f"{_safe_next(target)}{sep}msg={quote(message)}", status_code=303)


@router.get("/login", response_class=HTMLResponse)
def login_page(request: Request, next: str = "/", token: str = "", ctx: WebContext = Depends(context)) -> Response:
    if ctx.auth.open:
        return RedirectResponse(_safe_next(next), status_code=303)
    if token:  # a link such as the demo prints: log in with the token, then drop it from the address bar
        if not ctx.auth.check_token(token):
            return _render(
                request,
                "login.html",
                "",
                next=_safe_next(next),
                error="that token is not valid",
                users=ctx.cfg.web.auth == "users",
            )
        return _logged_in(request, ctx, "token", next)
    return _render(request, "login.html", "", next=_safe_next(next), error="", users=ctx.cfg.web.auth == "users")


def _logged_in(request: Request, ctx: WebContext, user: str, target: str) -> Response:
    response = RedirectResponse(_safe_next(target), status_code=303)
    # Secure when the browser came over HTTPS (directly, or through a TLS-terminating proxy that says so).
    https = request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"
    response.set_cookie(
        COOKIE,
        ctx.auth.new_session(user),
        httponly=True,
        samesite="strict",
        secure=https,
        max_age=ctx.cfg.web.session_minutes * 60,
    )
    return response


@router.post("/login", response_class=HTMLResponse)
def login(
    request: Request,
    username: str = Form(""),
    password: str = Form(""),
    token: str = Form(""),
    next: str = Form("/"),
    ctx: WebContext = Depends(context),
) -> Response:
    if token and ctx.auth.check_token(token):
        return _logged_in(request, ctx, "token", next)
    if username and ctx.auth.check_user(username, password):
        return _logged_in(request, ctx, username, next)
    page = _render(
        request,
        "login.html",
        "",
        next=_safe_next(next),
        error="wrong user name, password or token",
        users=ctx.cfg.web.auth == "users",
    )
    page.status_code = 401
    return page


@router.post("/logout")
def logout(request: Request, ctx: WebContext = Depends(context)) -> Response:
    sid = request.cookies.get(COOKIE)
    if sid:
        ctx.auth.end_session(sid)
    response = RedirectResponse("/login", status_code=303)
    response.delete_cookie(COOKIE)
    return response


#: Where a list page starts.
Offset = Query(0, ge=0, le=10**9)
#: Rows on one page of the jobs and the deliveries.
_ROWS = 50


@router.get("/", response_class=HTMLResponse)
def overview(request: Request, user: str = Depends(page_user), ctx: WebContext = Depends(context)) -> Response:
    ov = data.overview(ctx.reader, ctx.cfg, ctx.sampler)
    recent = data.page_json(read.series(ctx.reader, limit=10))["items"]
    return _render(request, "overview.html", user, ov=ov, recent=recent, page="overview")


@router.get("/studies", response_class=HTMLResponse)
def studies(
    request: Request,
    q: str = Query("", max_length=256),
    offset: int = Offset,
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    found = data.studies(ctx.reader, q=q, limit=20, offset=offset)
    return _render(request, "studies.html", user, found=found, q=q, offset=offset, limit=20, page="studies")


@router.get("/series/{uid}", response_class=HTMLResponse)
def series(request: Request, uid: str, user: str = Depends(page_user), ctx: WebContext = Depends(context)) -> Response:
    try:
        s = data.series_detail(ctx.reader, ctx.cfg, uid)
    except data.NotFound as e:
        raise HTTPException(404, str(e)) from None
    recent = data.page_json(read.deliveries(ctx.reader, read.DeliveryQuery(series_uid=uid, limit=20)))["items"]
    with ctx.reader.connect() as conn:  # the study rules waiting for this series' study
        rules = [r.name for r in ctx.cfg.ruleset.study_rules if r.model.enabled] if ctx.cfg.ruleset else []
        waiting = read.study_waiting(conn, s["study_instance_uid"], rules)
    return _render(
        request,
        "series.html",
        user,
        s=s,
        study_waiting=waiting,
        deliveries=recent,
        destinations=[d.name for d in ctx.cfg.destinations],
        page="studies",
    )


@router.get("/series/{uid}/overlay.png")
def seg_overlay(
    uid: str,
    source: str = Query("", max_length=64, description="the source instance (default: the most segmented one)"),
    size: int = Query(512, ge=16, le=1024),
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    """A SEG output drawn in its segments' colours over the source slice it was made from."""
    from node.web.preview import NoPreview, seg_overlay_png

    try:
        seg_path, _ = data.instance_file(ctx.reader, ctx.cfg.data_dir, uid)
        png = seg_overlay_png(
            seg_path, lambda sop: data.sop_file(ctx.reader, ctx.cfg.data_dir, sop), source or None, size
        )
    except data.NotFound as e:
        raise HTTPException(404, str(e)) from None
    except (NoPreview, OSError, ValueError) as e:
        raise HTTPException(422, f"no overlay: {e}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _action_result(back: str, do: Any) -> Response:
    """Run an operator action of :mod:`node.web.actions`, then back to the page with what it did (or why not)."""
    from node.web.actions import Refused

    try:
        result = do()
    except Refused as e:
        return _back(back, e.message)
    return _back(back, result.message)


@router.post("/series/{uid}/rerun-rules")
def series_rerun_rules(uid: str, user: str = Depends(page_user), ctx: WebContext = Depends(context)) -> Response:
    from node.web.actions import rerun_rules

    return _action_result(f"/series/{quote(uid, safe='')}", lambda: rerun_rules(ctx, uid, user))


@router.post("/series/{uid}/forward")
def series_forward(
    uid: str,
    destination: str = Form(..., max_length=64),
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    from node.web.actions import forward_now

    return _action_result(f"/series/{quote(uid, safe='')}", lambda: forward_now(ctx, uid, destination, user))


def _list_page(
    request: Request,
    user: str,
    page: str,
    found: read.Page[Any],
    state: str,
    states: list[str],
    offset: int,
    **extra: Any,
) -> Response:
    """The jobs or the deliveries page: one page of rows, the state filter and the links to the other pages.

    ``back``: where a Retry or Cancel button returns to, this very page.
    """
    query = request.url.query
    return _render(
        request,
        f"{page}.html",
        user,
        found=data.page_json(found),
        state=state,
        states=states,
        offset=offset,
        limit=_ROWS,
        page=page,
        back=request.url.path + (f"?{query}" if query else ""),
        **extra,
    )


@router.get("/jobs", response_class=HTMLResponse)
def jobs(
    request: Request,
    state: str = Query("", max_length=16),
    offset: int = Offset,
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    found = read.jobs(ctx.reader, state=state if state in list(JobState) else "", limit=_ROWS, offset=offset)
    return _list_page(request, user, "jobs", found, state, list(JobState), offset)


@router.post("/jobs/{job_id}/{what}")
def job_action(
    request: Request,
    what: str,
    job_id: int = JobId,
    back: str = Form("/jobs"),
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    if what == "rerun":
        from node.web.actions import rerun_job

        return _action_result(back, lambda: rerun_job(ctx, job_id, user))
    if what not in ("retry", "cancel"):
        raise HTTPException(404, "no such action")
    return _action_result(back, lambda: job_change(ctx, job_id, "retry" if what == "retry" else "cancel", user))


@router.get("/deliveries", response_class=HTMLResponse)
def deliveries(
    request: Request,
    destination: str = Query("", max_length=64),
    state: str = Query("", max_length=16),
    series_uid: str = Query("", max_length=64),
    view: str = Query("", max_length=16),
    offset: int = Offset,
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    """Per series and destination, or (for one series, or with ``view=instances``) per instance."""
    per_instance = bool(series_uid) or view == "instances"
    listing = read.deliveries if per_instance else read.delivery_groups
    known = state if state in list(DeliveryState) else ""
    found = listing(ctx.reader, read.DeliveryQuery(destination, known, series_uid, _ROWS, offset))
    named = read.series(ctx.reader, q=series_uid, limit=5).items if series_uid else []
    series_row = [r for r in named if r.series_instance_uid == series_uid]
    return _list_page(
        request,
        user,
        "deliveries",
        found,
        state,
        list(DeliveryState),
        offset,
        destinations=data.destinations(ctx.reader, ctx.cfg),
        destination=destination,
        series_uid=series_uid,
        per_instance=per_instance,
        series=data.jsonable(series_row[0]) if series_row else None,
    )


@router.post("/deliveries/{what}")
def deliveries_action(
    request: Request,
    what: str,
    ids: list[int] = Form(default_factory=list),
    destination: str = Form(""),
    series_uid: str = Form(""),
    back: str = Form("/deliveries"),
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    if what not in ("retry", "cancel"):
        raise HTTPException(404, "no such action")
    try:
        sel = Selection(ids=ids, destination=destination or None, series_uid=series_uid or None)
    except ValueError as e:
        return _back(back, str(e))
    return _back(back, delivery_change(ctx, "retry" if what == "retry" else "cancel", sel, user).message)


@router.get("/rules", response_class=HTMLResponse)
def rules(request: Request, user: str = Depends(page_user), ctx: WebContext = Depends(context)) -> Response:
    return _render(request, "rules.html", user, rules=data.rules(ctx.cfg, ctx.reader), page="rules")


# -- the rule tester (node.web.tester): a rule tried on stored series; nothing in the config changes --

#: What the tester's text area holds at first: a rule to edit.
_EXAMPLE_RULE = """[[rules]]
name = "ct-chest"
[rules.match]
Modality = "CT"
SeriesDescription = { contains = "chest" }
[[rules.actions]]
type = "forward"
to = ["pacs"]
"""


def _tester(request: Request, user: str, ctx: WebContext, rule_toml: str, chosen: list[str], report: Any) -> Response:
    from node.web.tester import recent_series

    if report is None and not rule_toml:
        names = [d.name for d in ctx.cfg.destinations]
        rule_toml = _EXAMPLE_RULE.replace('"pacs"', f'"{names[0]}"') if names else _EXAMPLE_RULE
    return _render(
        request,
        "rule_tester.html",
        user,
        rule_toml=rule_toml,
        chosen=set(chosen),
        choices=recent_series(ctx.reader),
        report=report,
        page="rules",
    )


@router.get("/rules/test", response_class=HTMLResponse)
def rule_tester(request: Request, user: str = Depends(page_user), ctx: WebContext = Depends(context)) -> Response:
    return _tester(request, user, ctx, "", [], None)


@router.post("/rules/test", response_class=HTMLResponse)
def rule_tester_run(
    request: Request,
    rule_toml: str = Form("", max_length=100_000),
    series_uids: list[str] = Form(default_factory=list),
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    from node.web.tester import MAX_SERIES, RuleTest, try_rule

    chosen = series_uids[:MAX_SERIES]
    report = try_rule(ctx.cfg, ctx.reader, RuleTest(rule_toml=rule_toml, series_uids=chosen))
    return _tester(request, user, ctx, rule_toml, chosen, report)


@router.get("/plugins", response_class=HTMLResponse)
def plugins(request: Request, user: str = Depends(page_user), ctx: WebContext = Depends(context)) -> Response:
    return _render(request, "plugins.html", user, plugins=data.plugins(ctx.cfg), page="plugins")


@router.get("/lineage", response_class=HTMLResponse)
def lineage(
    request: Request,
    uid: str = Query("", max_length=64),
    plugin_version: str = Query("", max_length=128),
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    from node.index.lineage import NotFound
    from node.index.lineage import lineage as chain

    lines, error = [], ""
    if uid:
        try:
            lines = chain(ctx.reader, uid, plugin_version)
        except NotFound as e:
            error = str(e)
    return _render(
        request,
        "lineage.html",
        user,
        uid=uid,
        plugin_version=plugin_version,
        lines=lines,
        error=error,
        page="lineage",
    )


@router.get("/audit", response_class=HTMLResponse)
def audit_page(
    request: Request,
    kind: str = Query("", max_length=32),
    uid: str = Query("", max_length=64),
    offset: int = Offset,
    user: str = Depends(page_user),
    ctx: WebContext = Depends(context),
) -> Response:
    from node import audit

    which, about = (kind if kind in audit.KINDS else None), (uid or None)
    found = {
        "total": audit.count(ctx.reader, kind=which, uid=about),
        "items": audit.query(ctx.reader, kind=which, uid=about, limit=100, offset=offset),
    }
    return _render(
        request,
        "audit.html",
        user,
        found=found,
        kinds=audit.KINDS,
        kind=kind,
        uid=uid,
        offset=offset,
        limit=100,
        page="audit",
    )
