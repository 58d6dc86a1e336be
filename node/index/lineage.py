"""Where an object came from and where it went: source series -> jobs -> outputs -> deliveries.

Read from the index only (instance.job_fk links an output to the job that made it; job.software
names the plugin versions; the delivery table says where each instance went).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import ColumnElement, Connection, Engine, func, select

from node.index.models import Delivery, Instance, Job, Series, SeriesRevision
from node.index.states import CommitmentState, DeliveryState, JobState

_i, _s, _j, _d, _r = (m.__table__ for m in (Instance, Series, Job, Delivery, SeriesRevision))


class NotFound(LookupError):
    pass


def plugin_versions(software: str) -> list[tuple[str, str]]:
    """(plugin, version) of each step named in ``job.software`` ("threshold-seg 1.0, segment-stats 0.2")."""
    steps = []
    for part in software.split(","):
        name, _, version = part.strip().partition(" ")
        if name:
            steps.append((name, version.strip()))
    return steps


def made_with(software: str, wanted: str) -> bool:
    """Whether a job's plugins include ``wanted``: a version ("1.0"), "NAME VERSION" or "NAME==VERSION"."""
    wanted = wanted.strip().replace("==", " ")
    name, _, version = wanted.rpartition(" ")
    for n, v in plugin_versions(software):
        if (v == wanted and not name) or (n == name.strip() and v == version):
            return True
    return False


def _when(value: dt.datetime | None) -> str:
    """The index keeps UTC (naive on SQLite): said so, as the dashboard's other times are."""
    return value.strftime("%Y-%m-%d %H:%M:%S UTC") if value is not None else "-"


def _deliveries(conn: Connection, which: ColumnElement[bool], indent: str) -> list[str]:
    """Deliveries matching ``which`` (a condition on the delivery table), by destination and state."""
    rows = conn.execute(
        select(
            _d.c.destination,
            _d.c.state,
            _d.c.commitment,
            func.count(),
            func.min(_d.c.delivered_at),
            func.max(_d.c.delivered_at),
            func.max(_d.c.last_error),
        )
        .where(which)
        .group_by(_d.c.destination, _d.c.state, _d.c.commitment)
        .order_by(_d.c.destination, _d.c.state)
    ).all()
    out = []
    for dest, state, commitment, n, first, last, error in rows:
        line = f"{indent}-> {dest}: {n} {state}"
        if commitment:
            line += f" ({'awaiting commitment' if commitment == CommitmentState.REQUESTED else commitment})"
        if state == DeliveryState.DELIVERED:
            line += f" {_when(first)}" + (f" .. {_when(last)}" if n > 1 and last != first else "")
        elif error:
            line += f" -- {error}"
        out.append(line)
    return out or [f"{indent}-> not queued for any destination"]


def lineage(engine: Engine, uid: str, plugin_version: str = "") -> list[str]:
    """Lines describing the chain through ``uid`` (a SOP Instance UID or a Series Instance UID).

    Each job names the plugins and versions that ran (``job.software``) and each output the ones that made
    it, so outputs of several plugin versions (a rerun after an upgrade) are told apart. ``plugin_version``
    (see :func:`made_with`) keeps only the jobs made with that version, and says how many it left out.
    """
    with engine.connect() as conn:
        series = conn.execute(select(_s).where(_s.c.series_instance_uid == uid)).first()
        if series is None:
            inst = conn.execute(select(_i.c.series_fk).where(_i.c.sop_instance_uid == uid)).first()
            if inst is None:
                raise NotFound(f"no instance or series {uid} in the index")
            series = conn.execute(select(_s).where(_s.c.id == inst.series_fk)).one()
        made_by = conn.execute(
            select(_j.c.series_fk)
            .select_from(_i.join(_j, _j.c.id == _i.c.job_fk))
            .where(_i.c.series_fk == series.id)
            .limit(1)
        ).first()
        lines: list[str] = []
        if made_by is not None:  # an output series: start from its source
            src = conn.execute(select(_s).where(_s.c.id == made_by.series_fk)).one()
            lines.append(f"{uid} was made by this node from series {src.series_instance_uid}:")
            series = src
        lines.append(
            f"source series {series.series_instance_uid} ({series.modality} "
            f'"{series.series_description}", {series.instance_count} instances)'
        )
        for rev in conn.execute(select(_r).where(_r.c.series_fk == series.id).order_by(_r.c.revision)):
            rules = rev.matched_rules or "no rule matched"
            lines.append(
                f"  revision {rev.revision}: {rev.instance_count} instances, stable {_when(rev.stable_at)} "
                f"({rev.stable_reason}); {rules}"
            )
        jobs = conn.execute(select(_j).where(_j.c.series_fk == series.id).order_by(_j.c.id)).all()
        shown = [j for j in jobs if not plugin_version or made_with(j.software, plugin_version)]
        for job in shown:
            what = job.kind + (f" {job.software}" if job.software else "")
            detail = job.result if job.state == JobState.SUCCEEDED else job.last_error
            run = f" run {job.run}" if job.run > 1 else ""
            lines.append(
                f"  job #{job.id} revision {job.revision} rule {job.rule} action {job.action_index}{run} ({what}): "
                f"{job.state} {_when(job.finished_at)}" + (f" -- {detail}" if detail else "")
            )
            outputs = conn.execute(
                select(_i.c.id, _i.c.sop_instance_uid, _i.c.sop_class_uid, _s.c.series_instance_uid)
                .select_from(_i.join(_s, _s.c.id == _i.c.series_fk))
                .where(_i.c.job_fk == job.id)
                .order_by(_i.c.id)
            ).all()
            for o in outputs:
                from pydicom.uid import UID

                made = f", made by {job.software}" if job.software else ""
                lines.append(
                    f"    output {UID(o.sop_class_uid).name} {o.sop_instance_uid} (series {o.series_instance_uid}{made})"
                )
                lines.extend(_deliveries(conn, _d.c.instance_fk == o.id, "      "))
            if job.kind == "forward":
                lines.extend(_deliveries(conn, _d.c.job_fk == job.id, "    "))
        if not jobs:
            lines.append("  no jobs")
        elif plugin_version and len(shown) < len(jobs):
            left = len(jobs) - len(shown)
            lines.append(f"  ({left} job(s) not made with plugin version {plugin_version!r} left out)")
    return lines
