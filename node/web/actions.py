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
        if sel.all or (sel.destination and not sel.ids):
            n += queue.retry_now(ctx.engine, sel.destination, actor=user)
        ctx.wake_senders()
        message = f"{n} deliver{'y' if n == 1 else 'ies'} queued to be sent now"
    else:
        n = queue.cancel(ctx.engine, destination=destination, ids=ids, series_uid=series_uid, actor=user)
        message = f"{n} deliver{'y' if n == 1 else 'ies'} cancelled"
    log.info("deliveries %s by %s: %s: %s", what, user, sel.model_dump_json(exclude_defaults=True), message)
    return ActionResult(changed=n, message=message)
