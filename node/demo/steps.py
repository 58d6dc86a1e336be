"""Each step of one series' way through the node, read from the node's index as it happens.

The demo only reads the index (the same tables ``dicom-node status`` and ``lineage`` read): the
instance rows say what was received, the series revision when it became stable and which rules
matched, the job rows when each plugin ran and which version, output instances (``job_fk`` set)
what was built, and the delivery rows what reached each destination. Every step carries the
node's own timestamp, so the timings shown are the node's, not the polling interval's.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

from pydicom.uid import UID
from sqlalchemy import Engine, func, select

from node.demo.pacs import short_name
from node.index.models import Delivery, Instance, Job, Series, SeriesRevision, aware
from node.index.states import DELIVERY_RETRYABLE, JOB_RETRYABLE, DeliveryState, JobState

_i, _s, _j, _d, _r = (m.__table__ for m in (Instance, Series, Job, Delivery, SeriesRevision))
_TIMINGS = re.compile(r"load ([\d.]+) s, plugin ([\d.]+) s, build ([\d.]+) s, write ([\d.]+) s")


class StepFailed(RuntimeError):
    """The series cannot get through: a job or a delivery failed, or no rule matched."""


@dataclass(order=True)
class Step:
    at: dt.datetime
    key: str = field(compare=False)
    text: str = field(compare=False)
    #: The step's own duration in seconds (e.g. a job's run time), when it has one.
    took: float | None = field(default=None, compare=False)


def _secs(a: dt.datetime | None, b: dt.datetime | None) -> float | None:
    if a is None or b is None:
        return None
    return max(0.0, (aware(b) - aware(a)).total_seconds())


def _plugins_of(action_json: str) -> str:
    try:
        action = json.loads(action_json)
    except ValueError:
        return "?"
    if action.get("plugin"):
        return str(action["plugin"])
    return " -> ".join(str(s.get("name", "?")) for s in action.get("plugins") or [])


def kinds(classes: Counter[str]) -> str:
    """``Counter({CT: 28, SEG: 1})`` -> ``28 CT, 1 SEG``."""
    merged: Counter[str] = Counter()
    for sop_class, n in classes.items():
        merged[short_name(sop_class)] += n
    return ", ".join(f"{n} {k}" for k, n in sorted(merged.items(), key=lambda kv: (-kv[1], kv[0])))


@dataclass
class Progress:
    """What one poll saw: new steps (in time order) and where things stand."""

    steps: list[Step]
    received: int
    done: bool
    waiting_for: str
    outputs: dict[str, int] = field(default_factory=dict)
    delivered: dict[str, int] = field(default_factory=dict)
    seg_uid: str = ""


class SeriesWatch:
    """Polls the index for one series (by Series Instance UID) and reports each step once."""

    def __init__(self, engine: Engine, series_uid: str, expected: int) -> None:
        self.engine = engine
        self.series_uid = series_uid
        self.expected = expected
        self.seen: set[str] = set()
        self.first_received: dt.datetime | None = None
        self.series_id: int | None = None

    def poll(self) -> Progress:
        with self.engine.connect() as conn:
            return self._poll(conn)

    def _poll(self, conn: Any) -> Progress:  # noqa: C901 - one pass over the tables, in pipeline order
        found: list[Step] = []

        def step(key: str, at: dt.datetime | None, text: str, took: float | None = None) -> None:
            if at is not None and key not in self.seen:
                found.append(Step(aware(at), key, text, took))

        series = conn.execute(
            select(_s.c.id, _s.c.instance_count, _s.c.state).where(_s.c.series_instance_uid == self.series_uid)
        ).first()
        if series is None:
            return self._emit(found, 0, False, "waiting for the first instance to arrive")
        self.series_id = series.id
        first, last, received = conn.execute(
            select(func.min(_i.c.received_at), func.max(_i.c.received_at), func.count()).where(
                _i.c.series_fk == series.id, _i.c.job_fk.is_(None)
            )
        ).one()
        if received >= self.expected:
            step(
                "received",
                last,
                f"received {received}/{self.expected} CT images (stored and indexed)",
                _secs(first, last),
            )
        rev = conn.execute(select(_r).where(_r.c.series_fk == series.id).order_by(_r.c.revision).limit(1)).first()
        if rev is None:
            wait = (
                f"waiting for the rest of the series ({received}/{self.expected})"
                if received < self.expected
                else "waiting for the series to become stable (no new instance for stable_after seconds)"
            )
            return self._emit(found, received, False, wait)
        step("stable", rev.stable_at, f"series stable: {rev.stable_reason}", _secs(rev.last_received_at, rev.stable_at))
        if rev.error:
            raise StepFailed(f"evaluating the rules failed: {rev.error}")
        if rev.triggered_at is None:
            return self._emit(found, received, False, "waiting for the rules to be evaluated")
        if not rev.matched_rules:
            raise StepFailed("no rule matched the series, so nothing was made or sent")
        jobs = conn.execute(select(_j).where(_j.c.series_fk == series.id).order_by(_j.c.id)).all()
        step(
            "matched",
            rev.triggered_at,
            f"rule matched: {rev.matched_rules} -> {len(jobs)} job(s)",
            _secs(rev.stable_at, rev.triggered_at),
        )

        job_ids = [j.id for j in jobs]
        outputs = (
            conn.execute(
                select(_i.c.job_fk, _i.c.sop_class_uid, _i.c.sop_instance_uid, _i.c.received_at)
                .where(_i.c.job_fk.in_(job_ids))
                .order_by(_i.c.id)
            ).all()
            if job_ids
            else []
        )
        by_job: dict[int, list[Any]] = defaultdict(list)
        for o in outputs:
            by_job[o.job_fk].append(o)
        waiting: list[str] = []
        for j in jobs:
            what = "forward" if j.kind == "forward" else f"plugin {_plugins_of(j.action)}"
            waited = _secs(j.created_at, j.started_at) or 0.0
            step(
                f"job{j.id}.start",
                j.started_at,
                f"job #{j.id} started: {what}"
                + (f" (waited {waited:.2f} s for a free worker)" if waited >= 0.5 else ""),
            )
            if j.state in JOB_RETRYABLE:
                raise StepFailed(f"job #{j.id} ({what}) {j.state}: {j.last_error or 'no error recorded'}")
            if j.state != JobState.SUCCEEDED:
                again = f", attempt {j.attempts} failed: {j.last_error}" if j.last_error else ""
                waiting.append(f"job #{j.id} ({what}, {j.state}{again})")
                continue
            if j.kind == "plugin":
                made = by_job.get(j.id, [])
                t = _TIMINGS.search(j.result or "")
                detail = f" (load {t[1]} s, plugin {t[2]} s, build {t[3]} s, write {t[4]} s)" if t else ""
                step(
                    f"job{j.id}.ran",
                    made[-1].received_at if made else j.finished_at,
                    f"plugin {j.software or _plugins_of(j.action)} ran{detail}",
                    _secs(j.started_at, j.finished_at),
                )
                if made:
                    classes = Counter(o.sop_class_uid for o in made)
                    names = ", ".join(sorted({UID(c).name for c in classes}))
                    step(f"job{j.id}.built", made[-1].received_at, f"built {kinds(classes)} ({names})")
                else:
                    step(f"job{j.id}.built", j.finished_at, "built nothing (the plugin returned no output)")
            step(f"job{j.id}.done", j.finished_at, f"job #{j.id} finished: {self._short_result(j.result)}")

        # The deliveries: every row the series' jobs queued, per destination.
        rows = (
            conn.execute(
                select(
                    _d.c.job_fk,
                    _d.c.destination,
                    _d.c.state,
                    _d.c.created_at,
                    _d.c.delivered_at,
                    _d.c.last_error,
                    _i.c.sop_class_uid,
                )
                .select_from(_d.outerjoin(_i, _i.c.id == _d.c.instance_fk))
                .where(_d.c.job_fk.in_(job_ids))
            ).all()
            if job_ids
            else []
        )
        per_dest: dict[str, list[Any]] = defaultdict(list)
        for r in rows:
            per_dest[r.destination].append(r)
        delivered: dict[str, int] = {}
        for dest, drows in sorted(per_dest.items()):
            bad = [r for r in drows if r.state in DELIVERY_RETRYABLE]
            if bad:
                raise StepFailed(f"{len(bad)} delivery(ies) to {dest} {bad[0].state}: {bad[0].last_error or '-'}")
            ok = [r for r in drows if r.state == DeliveryState.DELIVERED]
            delivered[dest] = len(ok)
            pending = len(drows) - len(ok)
            if pending:
                errs = [r.last_error for r in drows if r.last_error]
                waiting.append(f"{pending} delivery(ies) to {dest}" + (f" (last error: {errs[-1]})" if errs else ""))
        jobs_done = all(j.state == JobState.SUCCEEDED for j in jobs)
        all_sent = jobs_done and not waiting and bool(rows)
        if all_sent:
            for dest, drows in sorted(per_dest.items()):
                at = max(aware(r.delivered_at) for r in drows)
                queued = min(aware(r.created_at) for r in drows)
                step(
                    f"delivered.{dest}",
                    at,
                    f"delivered to {dest}: {len(drows)}/{len(drows)} "
                    f"({kinds(Counter(r.sop_class_uid for r in drows))})",
                    _secs(queued, at),
                )
        elif jobs_done and not rows and not waiting:
            raise StepFailed("the jobs succeeded but queued nothing for delivery")
        made_classes = Counter(o.sop_class_uid for o in outputs)
        seg = next((o.sop_instance_uid for o in outputs if short_name(o.sop_class_uid) == "SEG"), "")
        progress = self._emit(found, received, all_sent, "waiting for " + "; ".join(waiting) if waiting else "")
        progress.outputs = {short_name(c): n for c, n in made_classes.items()}
        progress.delivered = delivered
        progress.seg_uid = seg
        return progress

    @staticmethod
    def _short_result(result: str) -> str:
        """A plugin job's result without the timings and memory already shown, e.g. ``queued 3 instance(s) for pacs``."""
        parts = [p.strip() for p in (result or "").split(";")]
        queued = [p for p in parts if p.startswith("queued")]
        return "; ".join(queued) if queued else (result or "done")

    def _emit(self, found: list[Step], received: int, done: bool, waiting: str) -> Progress:
        found.sort()
        self.seen.update(s.key for s in found)
        return Progress(found, received, done, waiting)
