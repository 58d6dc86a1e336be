"""What an operator can change from the dashboard or the REST API: retry and cancel jobs and deliveries.

Both the API (:mod:`node.web.api`) and the pages (:mod:`node.web.pages`) call these, so a button and
a ``POST /api/...`` do exactly the same; they go through the same store functions as the command
line (:mod:`node.jobs.store`, :mod:`node.send.queue`), which audit the change under the user's name.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, Field, model_validator

from node.web.context import WebContext

log = logging.getLogger(__name__)

#: Database ids are 64-bit; a larger number is a client's mistake (422), not a server error.
JobId = PathParam(ge=1, le=2**63 - 1)
DbId = Annotated[int, Field(ge=1, le=2**63 - 1)]
Change = Literal["retry", "cancel"]


class Selection(BaseModel):
    """Which deliveries: by id, destination and/or series; ``all`` must be said explicitly."""

    ids: list[DbId] = Field(default_factory=list, max_length=10000)
    destination: str | None = None
    series_uid: str | None = None
    all: bool = False

    @model_validator(mode="after")
    def _something(self) -> Selection:
        if not (self.ids or self.destination or self.series_uid or self.all):
            raise ValueError("say which deliveries: ids, destination, series_uid, or all = true")
        return self


class ActionResult(BaseModel):
    changed: int
    message: str


class Refused(Exception):
    """The change cannot be made: ``status`` is the HTTP status that says why (404 no such thing, 409 wrong state)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def job_change(ctx: WebContext, job_id: int, what: Change, user: str) -> ActionResult:
    """Retry a failed or cancelled job, or cancel a pending or running one."""
    from node.jobs import store

    try:
        if what == "retry":
            store.retry(ctx.engine, job_id, actor=user)
            ctx.wake_jobs()
            return ActionResult(changed=1, message=f"job {job_id} queued to run again")
        was = store.cancel(ctx.engine, job_id, actor=user)
        return ActionResult(changed=1, message=f"job {job_id} cancelled (it was {was})")
    except store.JobStateError as e:
        raise Refused(404 if "there is no job" in str(e) else 409, str(e)) from None


def delivery_change(ctx: WebContext, what: Change, sel: Selection, user: str) -> ActionResult:
    """Queue failed or cancelled deliveries again (and waiting ones now, for a whole destination), or cancel."""
    from node.send import queue

    destination, ids, series_uid = sel.destination or None, sel.ids or None, sel.series_uid or None
    if what == "retry":
        n = queue.retry(ctx.engine, destination=destination, ids=ids, series_uid=series_uid, actor=user)
        if sel.all or (sel.destination and not sel.ids and not sel.series_uid):  # a whole destination
            n += queue.retry_now(ctx.engine, sel.destination, actor=user)
        ctx.wake_senders()
        message = f"{n} deliver{'y' if n == 1 else 'ies'} queued to be sent now"
    else:
        n = queue.cancel(ctx.engine, destination=destination, ids=ids, series_uid=series_uid, actor=user)
        message = f"{n} deliver{'y' if n == 1 else 'ies'} cancelled"
    log.info("deliveries %s by %s: %s: %s", what, user, sel.model_dump_json(exclude_defaults=True), message)
    return ActionResult(changed=n, message=message)


def rerun_rules(ctx: WebContext, series_uid: str, user: str) -> ActionResult:
    """Evaluate the current rules on the series' latest stable revision and make the matching rules' jobs again.

    Each job is the next run of its (revision, rule, action): the first run's jobs and outputs are kept.
    Audited (``rules_rerun``). 404: no such series; 409: nothing to run on yet (or any more).
    """
    from node.decide.rerun import RerunRefused
    from node.decide.rerun import rerun_rules as rerun

    if ctx.cfg.ruleset is None:
        raise Refused(409, "this server has no compiled rules (it is not a running node's dashboard)")
    try:
        done = rerun(ctx.engine, ctx.cfg.data_dir, ctx.cfg.ruleset, series_uid, actor=user)
    except RerunRefused as e:
        raise Refused(404 if str(e).startswith("no series") else 409, str(e)) from None
    if done.job_ids:
        ctx.wake_jobs()
    log.info("rules run again on series %s by %s: %s", series_uid, user, done.message())
    return ActionResult(changed=len(done.job_ids), message=done.message())


def rerun_job(ctx: WebContext, job_id: int, user: str) -> ActionResult:
    """Run a succeeded, failed or cancelled job again as a new job (new outputs with new UIDs; the old ones stay).

    Audited (``job_rerun``). 404: no such job; 409: the job is pending or running.
    """
    from node.jobs import store

    try:
        new = store.rerun(ctx.engine, job_id, actor=user)
    except store.JobStateError as e:
        raise Refused(404 if "there is no job" in str(e) else 409, str(e)) from None
    ctx.wake_jobs()
    log.info("job %d run again by %s as job %d", job_id, user, new)
    return ActionResult(changed=1, message=f"job {job_id} runs again as job {new}")


def forward_now(ctx: WebContext, series_uid: str, destination: str, user: str) -> ActionResult:
    """Queue the series' stored instances for a configured destination now (sent again where delivered before).

    Audited (``series_forward``). 404: no such series (or no instances); 422: not a configured destination.
    """
    from node.send import queue

    known = [d.name for d in ctx.cfg.destinations]
    if destination not in known:
        raise Refused(422, f"no destination {destination!r} in the config (destinations: {', '.join(known) or 'none'})")
    try:
        got = queue.forward_series(ctx.engine, series_uid, destination, actor=user)
    except LookupError as e:
        raise Refused(404, str(e.args[0])) from None
    ctx.wake_senders()
    n = got.new + got.requeued
    message = f"{n} instance(s) of series {series_uid} queued for {destination}" + (
        f"; {got.already} already waiting to be sent" if got.already else ""
    )
    log.info("series %s forwarded to %s by %s: %s", series_uid, destination, user, message)
    return ActionResult(changed=n, message=message)
