"""What each kind of job does. A handler returns a one-line summary or raises :class:`JobFailed`."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, delete, select, update

from node.config import Config
from node.index.models import Instance, Job, Series
from node.jobs.store import ClaimedJob
from node.storage import Storage

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job run that did not succeed; ``retryable`` says whether another attempt may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


@dataclass
class JobContext:
    job: ClaimedJob
    cfg: Config
    engine: Engine
    storage: Storage
    #: True once the job was cancelled (checked between steps of long work).
    cancelled: Callable[[], bool]

    def instance_files(self) -> list[tuple[int, str]]:
        """(id, stored path) of the revision's instances, in Instance Number order."""
        i = Instance.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(i.c.id, i.c.file_path)
                .where(i.c.series_fk == self.job.series_id, i.c.revision == self.job.revision)
                .order_by(i.c.instance_number.is_(None), i.c.instance_number, i.c.id)
            ).all()
        return [(r.id, r.file_path) for r in rows]


def forward(ctx: JobContext) -> str:
    """Send the revision's instances, as stored, to each destination."""
    from node.send.scu import send_files

    files = [ctx.storage.absolute(p) for _, p in ctx.instance_files()]
    if not files:
        return "nothing to forward: the revision has no instances (discarded?)"
    dests = {d.name: d for d in ctx.cfg.destinations}
    done, problems, retryable = [], [], False
    for name in ctx.job.action["to"]:
        if ctx.cancelled():
            raise JobFailed("cancelled", retryable=False)
        d = dests.get(name)
        if d is None:
            problems.append(f"{name}: no such destination in the config any more")
            continue
        summary = send_files(d.host, d.port, files, called_ae=d.ae_title, calling_ae=ctx.cfg.node.ae_title)
        if summary.ok:
            done.append(f"{summary.sent} to {name}")
            continue
        first = summary.errors[0][1] if summary.errors else "unknown error"
        problems.append(f"{name}: {summary.failed} of {len(files)} failed ({first})")
        # Refusals by status (0xA9xx, 0xC0xx, ...) will not change by themselves; connection problems may.
        retryable = retryable or any("association" in e or "status" not in e for _, e in summary.errors)
    if problems:
        raise JobFailed("; ".join(problems) + (f" (sent {', '.join(done)})" if done else ""), retryable=retryable)
    return "sent " + ", ".join(done)


def discard(ctx: JobContext) -> str:
    """Delete the revision's instances: files first, then rows, so a crash between leaves no orphan file.

    Runs after the series' other jobs (see the job store), and not at all when one of them did not
    succeed: data that did not reach its destination is kept.
    """
    j = Job.__table__
    with ctx.engine.connect() as conn:
        unfinished = conn.execute(
            select(j.c.id, j.c.state)
            .where(j.c.series_fk == ctx.job.series_id, j.c.id != ctx.job.id, j.c.kind != "discard",
                   j.c.state != "succeeded")
            .order_by(j.c.id)
        ).all()  # fmt: skip
    if unfinished:
        which = ", ".join(f"job {r.id} is {r.state}" for r in unfinished)
        raise JobFailed(f"not discarding: {which}; the series is kept (retry this job once they succeeded)",
                        retryable=False)  # fmt: skip
    items = ctx.instance_files()
    removed = 0
    for _, rel in items:
        p: Path = ctx.storage.absolute(rel)
        if p.is_file():
            ctx.storage.remove(p)
            removed += 1
    i, s = Instance.__table__, Series.__table__
    with ctx.engine.begin() as conn:
        gone = conn.execute(delete(i).where(i.c.id.in_([pk for pk, _ in items]))).rowcount if items else 0
        if gone:
            conn.execute(update(s).where(s.c.id == ctx.job.series_id).values(instance_count=s.c.instance_count - gone))
    return f"discarded {gone} instances ({removed} files removed)"


def plugin(ctx: JobContext) -> str:
    raise JobFailed(
        "this version of dicom-node creates plugin jobs but has no plugin runtime yet to run them",
        retryable=False,
    )


HANDLERS: dict[str, Callable[[JobContext], str]] = {"forward": forward, "discard": discard, "plugin": plugin}


def handler_for(kind: str) -> Callable[[JobContext], Any]:
    try:
        return HANDLERS[kind]
    except KeyError:
        raise JobFailed(f"unknown job kind {kind!r}", retryable=False) from None
