"""What the dashboard and the REST API show: the read model (:mod:`node.index.read`) as JSON-ready dicts.

Everything here only reads, through the node's read-only engine; the few changes an operator can make
(retry, cancel) are :mod:`node.web.actions`. The rows and counts come from :mod:`node.index.read`, as for
the command line and the metrics; what is only the dashboard's (a series' timeline, the studies page,
rates, rules, plugins) is put together here.
"""

from __future__ import annotations

import collections
import dataclasses
import datetime as dt
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydicom.uid import UID
from sqlalchemy import Engine, func, or_, select

from node.config import Config
from node.decide.explain import rule_lines
from node.decide.facts import series_snapshot
from node.index import read
from node.index.models import Delivery, Instance, Job, Patient, Series, SeriesRevision, Study, aware, utcnow
from node.index.states import DeliveryState
from node.storage import Storage

_s, _st, _p, _i, _j, _d, _r = (m.__table__ for m in (Series, Study, Patient, Instance, Job, Delivery, SeriesRevision))


class NotFound(LookupError):
    pass


#: Output kinds by SOP Class UID; an image class not named here is a derived image of its modality.
_KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.66.7": "SEG",
    "1.2.840.10008.5.1.4.1.1.30": "Parametric Map",
    "1.2.840.10008.5.1.4.1.1.88.59": "KOS",
}


def output_kind(sop_class_uid: str, modality: str) -> str:
    """What a produced instance is, for people: SEG, SC, SR, KOS, Parametric Map or "derived CT image"."""
    if sop_class_uid in _KINDS:
        return _KINDS[sop_class_uid]
    if sop_class_uid.startswith("1.2.840.10008.5.1.4.1.1.88."):  # the structured report classes
        return "SR"
    if "Secondary Capture" in UID(sop_class_uid).name:
        return "SC"
    return f"derived {modality} image" if modality else "derived image"


def made_by(engine: Engine, series_ids: list[int]) -> dict[int, dict[str, Any]]:
    """For each of these series that this node produced: its kind, the job and the plugins (name and version)."""
    if not series_ids:
        return {}
    with engine.connect() as conn:
        first = (
            select(_i.c.series_fk, func.min(_i.c.id).label("first"))
            .where(_i.c.series_fk.in_(series_ids), _i.c.job_fk.is_not(None))
            .group_by(_i.c.series_fk)
            .subquery()
        )
        rows = conn.execute(
            select(
                _i.c.series_fk,
                _i.c.sop_class_uid,
                _j.c.id,
                _j.c.rule,
                _j.c.software,
                _s.c.series_instance_uid,
            )
            .select_from(first.join(_i, _i.c.id == first.c.first).join(_j, _j.c.id == _i.c.job_fk))
            .join(_s, _s.c.id == _j.c.series_fk)
        ).all()
        modality = dict(conn.execute(select(_s.c.id, _s.c.modality).where(_s.c.id.in_(series_ids))).tuples().all())
    return {
        r.series_fk: {
            "kind": output_kind(r.sop_class_uid, modality.get(r.series_fk, "")),
            "job_id": r.id,
            "rule": r.rule,
            "software": r.software,
            "source_series_instance_uid": r.series_instance_uid,
        }
        for r in rows
    }


def iso(value: dt.datetime | None) -> str | None:
    return aware(value).isoformat(timespec="milliseconds") if value else None


def jsonable(row: Any) -> dict[str, Any]:
    """A read-model row (a dataclass) as the API sends it: its fields, times as ISO 8601 strings."""
    return {k: iso(v) if isinstance(v, dt.datetime) else v for k, v in dataclasses.asdict(row).items()}


def page_json(page: read.Page[Any]) -> dict[str, Any]:
    """A page of read-model rows as the API sends it (and the pages show it): the total and the rows."""
    return {"total": page.total, "items": [jsonable(r) for r in page.items]}


@dataclass
class Sample:
    at: float
    received: int
    sent: int


class RateSampler:
    """Instances received and sent, sampled every few seconds for the overview's live charts.

    The totals come from the index (the highest instance id, the delivered count), so a chart is right
    whatever process stored or sent; it covers the last hour this process has been up.
    """

    def __init__(self, engine: Engine, every: float = 5.0, keep: float = 3600.0) -> None:
        self.engine = engine
        self.every = every
        self._samples: collections.deque[Sample] = collections.deque(maxlen=int(keep / every) + 1)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="web-rates", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def sample(self) -> None:
        received, sent = read.received_and_sent(self.engine)
        self._samples.append(Sample(time.time(), received, sent))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # the database may be busy or gone for a moment; the next sample will tell
                pass
            self._stop.wait(self.every)

    def rates(self) -> list[dict[str, float]]:
        """Per interval: its end time (epoch seconds) and instances/s received and sent."""
        s = list(self._samples)
        out = []
        for a, b in zip(s, s[1:], strict=False):
            span = max(b.at - a.at, 1e-6)
            out.append(
                {
                    "at": round(b.at, 3),
                    "received_per_s": round(max(b.received - a.received, 0) / span, 3),
                    "sent_per_s": round(max(b.sent - a.sent, 0) / span, 3),
                }
            )
        return out


def disk(data_dir: Path) -> dict[str, int]:
    if not data_dir.exists():
        return {"total_bytes": 0, "used_bytes": 0, "free_bytes": 0}
    u = shutil.disk_usage(data_dir)
    return {"total_bytes": u.total, "used_bytes": u.used, "free_bytes": u.free}


def destinations(engine: Engine, cfg: Config) -> list[dict[str, Any]]:
    """Each destination's queue: counts by state, oldest queued, next attempt, newest error."""
    found = [
        {
            "name": d.destination,
            "states": d.states,
            "oldest_queued": iso(d.oldest_queued),
            "next_attempt": iso(d.next_attempt),
            "last_error": d.last_error,
        }
        for d in read.destinations(engine)
    ]
    known = {d["name"] for d in found}
    for d in cfg.destinations:  # configured but never used yet
        if d.name not in known:
            found.append({"name": d.name, "states": {}, "oldest_queued": None, "next_attempt": None, "last_error": ""})
    return found


def overview(engine: Engine, cfg: Config, sampler: RateSampler | None) -> dict[str, Any]:
    s = read.summary(engine)
    return {
        "patients": s.patients,
        "studies": s.studies,
        "series": s.series,
        "instances": s.instances,
        "outputs": s.outputs,
        "stored_bytes": s.stored_bytes,
        "series_states": s.states.series,
        "job_states": s.states.jobs,
        "destinations": destinations(engine, cfg),
        "disk": disk(cfg.data_dir),
        "rates": sampler.rates() if sampler else [],
        "now": iso(utcnow()),
    }


def studies(engine: Engine, *, q: str = "", limit: int = 25, offset: int = 0) -> dict[str, Any]:
    """Studies, newest first, each with its series."""
    base = _st.join(_p, _p.c.id == _st.c.patient_fk)
    cond = []
    if q:
        cond.append(read.search_condition(q, series=False))
    last = (
        select(
            _s.c.study_fk,
            func.max(_s.c.last_received_at).label("last"),
            func.count().label("n_series"),
            func.sum(_s.c.instance_count).label("n_inst"),
        )
        .group_by(_s.c.study_fk)
        .subquery()
    )
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(base).where(*cond)).scalar_one()
        rows = conn.execute(
            select(
                _st.c.id,
                *read.STUDY_KEY_COLUMNS,
                last.c.last,
                last.c.n_series,
                last.c.n_inst,
            )
            .select_from(base.join(last, last.c.study_fk == _st.c.id, isouter=True))
            .where(*cond)
            .order_by(last.c.last.desc(), _st.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
        ids = [r.id for r in rows]
        series = (
            conn.execute(
                select(*read.SERIES_COLUMNS, _s.c.study_fk)
                .select_from(read.SERIES_JOIN)
                .where(_s.c.study_fk.in_(ids))
                .order_by(_s.c.series_number, _s.c.id)
            ).all()
            if ids
            else []
        )
    by_study: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
    outputs = made_by(engine, [r.id for r in series])
    for r in series:
        by_study[r.study_fk].append(jsonable(read.SeriesRow.of(r)) | {"made_by": outputs.get(r.id)})
    items = [
        read.StudyKeys.values(r)
        | {
            "last_received_at": iso(r.last),
            "series_count": int(r.n_series or 0),
            "instance_count": int(r.n_inst or 0),
            "series": by_study[r.id],
        }
        for r in rows
    ]
    return {"total": int(total), "items": items}


def series_detail(engine: Engine, cfg: Config, uid: str) -> dict[str, Any]:
    """One series: what it is, its revisions, the rules now and why, jobs, outputs, deliveries, timeline."""
    with engine.connect() as conn:
        r = conn.execute(
            select(*read.SERIES_COLUMNS, _s.c.body_part_examined, _s.c.manufacturer, _s.c.station_name)
            .select_from(read.SERIES_JOIN)
            .where(_s.c.series_instance_uid == uid)
        ).first()
        if r is None:
            raise NotFound(f"no series {uid} in the index")
        sid = r.id
        head = jsonable(read.SeriesRow.of(r)) | {
            "body_part_examined": r.body_part_examined,
            "manufacturer": r.manufacturer,
            "station_name": r.station_name,
        }
        first_inst = conn.execute(
            select(_i.c.calling_ae, _i.c.called_ae, _i.c.peer_address, _i.c.sop_class_uid, _i.c.transfer_syntax_uid)
            .where(_i.c.series_fk == sid)
            .order_by(_i.c.id)
            .limit(1)
        ).first()
        revisions = conn.execute(select(_r).where(_r.c.series_fk == sid).order_by(_r.c.revision)).all()
        job_ids = list(conn.execute(select(_j.c.id).where(_j.c.series_fk == sid).order_by(_j.c.id)).scalars())
        outputs = (
            conn.execute(
                select(
                    _i.c.sop_instance_uid,
                    _i.c.sop_class_uid,
                    _i.c.job_fk,
                    _i.c.received_at,
                    _i.c.id,
                    _s.c.series_instance_uid,
                    _s.c.series_description,
                    _s.c.modality,
                    _j.c.software,
                )
                .select_from(_i.join(_s, _s.c.id == _i.c.series_fk).join(_j, _j.c.id == _i.c.job_fk))
                .where(_i.c.job_fk.in_(job_ids))
                .order_by(_i.c.id)
            ).all()
            if job_ids
            else []
        )
        out_series = sorted({o.series_instance_uid for o in outputs})
        dq = (
            select(_d, _s.c.series_instance_uid)
            .select_from(_d.join(_s, _s.c.id == _d.c.series_fk))
            .where(or_(_d.c.series_fk == sid, _s.c.series_instance_uid.in_(out_series)))
        )
        deliveries = conn.execute(dq.order_by(_d.c.id)).all()
    jobs = read.series_jobs(engine, sid)
    snap_lines: list[str] = []
    try:
        from sqlalchemy.orm import Session

        with Session(engine) as s:
            snap = series_snapshot(s, cfg.data_dir, sid)
        if snap is not None and cfg.ruleset is not None:
            snap_lines = [line.strip() for line in rule_lines(cfg.ruleset.evaluate(snap.facts), indent="")]
    except Exception as e:  # a series whose files are gone can still be shown
        snap_lines = [f"(the rules cannot be evaluated now: {e})"]

    # Deliveries by destination and state, for the series itself and for its outputs.
    summary: dict[str, dict[str, dict[str, int]]] = {"source": {}, "outputs": {}}
    for d in deliveries:
        part = "source" if d.series_fk == sid else "outputs"
        summary[part].setdefault(d.destination, {}).setdefault(d.state, 0)
        summary[part][d.destination][d.state] += 1

    timeline: list[dict[str, Any]] = [
        {
            "at": iso(r.first_received_at),
            "step": "received",
            "text": "first instance received"
            + (
                f" from {first_inst.calling_ae} ({first_inst.peer_address})"
                if first_inst and first_inst.calling_ae
                else ""
            ),
        },
        {
            "at": iso(r.last_received_at),
            "step": "received",
            "text": f"last instance received ({r.instance_count} in all)",
        },
    ]
    for rev in revisions:
        timeline.append(
            {
                "at": iso(rev.stable_at),
                "step": "stable",
                "text": f"revision {rev.revision} stable, {rev.instance_count} instances ({rev.stable_reason})",
            }
        )
        if rev.triggered_at:
            what = f"rules matched: {rev.matched_rules.replace(',', ', ')}" if rev.matched_rules else "no rule matched"
            if rev.error:
                what = f"rules could not be evaluated: {rev.error}"
            timeline.append({"at": iso(rev.triggered_at), "step": "rules", "text": f"revision {rev.revision}: {what}"})
    for j in jobs:
        label = f"job #{j.id} ({j.kind}{' ' + j.software if j.software else ''}, rule {j.rule})"
        if j.started_at:
            timeline.append({"at": iso(j.started_at), "step": "job", "text": f"{label} started"})
        if j.finished_at:
            detail = j.detail
            timeline.append(
                {
                    "at": iso(j.finished_at),
                    "step": "job",
                    "text": f"{label} {j.state}" + (f": {detail}" if detail else ""),
                }
            )
    by_job: dict[int, list[Any]] = collections.defaultdict(list)
    for o in outputs:
        by_job[o.job_fk].append(o)
    for job_id, outs in by_job.items():
        names = collections.Counter(UID(o.sop_class_uid).name for o in outs)
        text = ", ".join(f"{n} × {k}" for k, n in names.items())
        timeline.append(
            {"at": iso(max(o.received_at for o in outs)), "step": "output", "text": f"job #{job_id} produced {text}"}
        )
    per_dest: dict[tuple[str, str], list[Any]] = collections.defaultdict(list)
    for d in deliveries:
        per_dest[("source" if d.series_fk == sid else "outputs", d.destination)].append(d)
    for (part, dest), rows in sorted(per_dest.items()):
        done = [d for d in rows if d.state == DeliveryState.DELIVERED and d.delivered_at]
        failed = [d for d in rows if d.state == DeliveryState.FAILED]
        if done:
            timeline.append(
                {
                    "at": iso(max(d.delivered_at for d in done)),
                    "step": "delivered",
                    "text": f"{len(done)} of {len(rows)} {part} instance(s) delivered to {dest}",
                }
            )
        if failed:
            timeline.append(
                {
                    "at": iso(max(d.updated_at for d in failed)),
                    "step": "failed",
                    "text": f"{len(failed)} {part} instance(s) failed for {dest}: {failed[-1].last_error}",
                }
            )
        waiting = len(rows) - len(done) - len(failed)
        if waiting:
            timeline.append(
                {
                    "at": iso(max(d.updated_at for d in rows)),
                    "step": "queued",
                    "text": f"{waiting} {part} instance(s) still waiting for {dest}",
                }
            )
    timeline = [t for t in timeline if t["at"]]
    timeline.sort(key=lambda t: t["at"])
    start = dt.datetime.fromisoformat(timeline[0]["at"]) if timeline else None
    for t in timeline:
        t["offset_s"] = round((dt.datetime.fromisoformat(t["at"]) - start).total_seconds(), 3) if start else 0.0

    return head | {
        "made_by": made_by(engine, [sid]).get(sid),
        "received_from": {
            "calling_ae": first_inst.calling_ae,
            "called_ae": first_inst.called_ae,
            "peer_address": first_inst.peer_address,
        }
        if first_inst
        else None,
        "sop_class": UID(first_inst.sop_class_uid).name if first_inst else "",
        "transfer_syntax": UID(first_inst.transfer_syntax_uid).name if first_inst else "",
        "revisions": [
            {
                "revision": v.revision,
                "instance_count": v.instance_count,
                "stable_at": iso(v.stable_at),
                "stable_reason": v.stable_reason,
                "triggered_at": iso(v.triggered_at),
                "matched_rules": [m for m in v.matched_rules.split(",") if m],
                "error": v.error,
            }
            for v in revisions
        ],
        "rules_now": snap_lines,
        "jobs": [jsonable(j) for j in jobs],
        "outputs": [
            {
                "sop_instance_uid": o.sop_instance_uid,
                "sop_class": UID(o.sop_class_uid).name,
                "job_id": o.job_fk,
                "series_instance_uid": o.series_instance_uid,
                "series_description": o.series_description,
                "modality": o.modality,
                "kind": output_kind(o.sop_class_uid, o.modality),
                "software": o.software,
            }
            for o in outputs
        ],
        "deliveries": summary,
        "timeline": timeline,
    }


def job(engine: Engine, job_id: int) -> dict[str, Any]:
    found = read.job(engine, job_id)
    if found is None:
        raise NotFound(f"there is no job {job_id}")
    return jsonable(found)


def rules(cfg: Config, engine: Engine) -> list[dict[str, Any]]:
    """The configured rules, with how often each matched (per series revision)."""
    with engine.connect() as conn:
        matched: collections.Counter[str] = collections.Counter()
        for (names,) in conn.execute(select(_r.c.matched_rules).where(_r.c.matched_rules != "")):
            matched.update(n for n in names.split(",") if n)
    out = []
    for rule in cfg.ruleset or []:
        m = rule.model
        out.append(
            {
                "name": m.name,
                "priority": m.priority,
                "enabled": m.enabled,
                "stop": m.stop,
                "match": m.model_dump(mode="json").get("match", {}),
                "actions": [a.summary() for a in m.actions],
                "matched_revisions": matched.get(m.name, 0),
            }
        )
    return out


def plugins(cfg: Config) -> list[dict[str, Any]]:
    from node.plugins.registry import PluginLoadError, describe, discover

    used: dict[str, list[str]] = collections.defaultdict(list)
    for rule in cfg.ruleset or []:
        for a in rule.model.actions:
            for step in a.steps if a.type == "plugin" else []:
                used[step.name].append(rule.name)
    out = []
    for name, ref in sorted(discover(cfg.plugins).items()):
        item = {
            "name": name,
            "target": ref.target,
            "source": ref.source,
            "package_version": ref.version,
            "kind": ref.kind,
            "environment": ref.environment or "",
            "version": "",
            "description": "",
            "error": "",
            "used_by_rules": sorted(set(used.get(name, []))),
        }
        try:
            info = describe(ref, cfg.plugins)
            item["version"] = info.version
            item["description"] = info.description
        except PluginLoadError as e:
            item["error"] = str(e)
        out.append(item)
    return out


def instance_file(engine: Engine, data_dir: Path, uid: str, index: int | None = None) -> tuple[Path, int]:
    """The file of a series' ``index``-th instance in instance order (default: the middle one), and the count."""
    with engine.connect() as conn:
        sid = conn.execute(select(_s.c.id).where(_s.c.series_instance_uid == uid)).scalar()
        if sid is None:
            raise NotFound(f"no series {uid} in the index")
        paths = (
            conn.execute(
                select(_i.c.file_path)
                .where(_i.c.series_fk == sid)
                .order_by(_i.c.instance_number.is_(None), _i.c.instance_number, _i.c.id)
            )
            .scalars()
            .all()
        )
    if not paths:
        raise NotFound(f"series {uid} has no stored instance")
    i = len(paths) // 2 if index is None else max(0, min(index, len(paths) - 1))
    return Storage(data_dir).absolute(paths[i]), len(paths)


def sop_file(engine: Engine, data_dir: Path, sop_uid: str) -> Path:
    """The stored file of the instance ``sop_uid``."""
    with engine.connect() as conn:
        path = conn.execute(select(_i.c.file_path).where(_i.c.sop_instance_uid == sop_uid)).scalar()
    if path is None:
        raise NotFound(f"no instance {sop_uid} in the index")
    return Storage(data_dir).absolute(path)
