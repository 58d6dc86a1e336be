"""Read-only summaries of the index for ``dicom-node status``."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from sqlalchemy import func, select

from node.config import Config
from node.index.db import NoIndex, existing_engine, session_factory
from node.index.models import Instance, Job, Patient, Series, Study
from node.send import queue

__all__ = ["IndexStatus", "NoIndex", "gather"]


@dataclass
class IndexStatus:
    patients: int
    studies: int
    series: int
    instances: int
    stored_bytes: int
    free_bytes: int
    recent_series: list[tuple] = field(default_factory=list)
    #: Series by tracker state and jobs by state, e.g. {"receiving": 2}.
    series_states: dict[str, int] = field(default_factory=dict)
    job_states: dict[str, int] = field(default_factory=dict)
    #: {destination: {state: count}} of the forward queue.
    deliveries: dict[str, dict[str, int]] = field(default_factory=dict)


def gather(cfg: Config, recent: int = 10) -> IndexStatus:
    engine = existing_engine(cfg.database_url)
    try:
        with session_factory(engine)() as s:
            counts = [s.execute(select(func.count()).select_from(m)).scalar_one() for m in (Patient, Study, Series)]
            n_inst, size = s.execute(select(func.count(), func.coalesce(func.sum(Instance.file_size), 0))).one()
            rows = s.execute(
                select(
                    Patient.patient_name,
                    Study.study_date,
                    Series.modality,
                    Series.series_description,
                    Series.instance_count,
                    Series.last_received_at,
                )
                .join(Study, Series.study_fk == Study.id)
                .join(Patient, Study.patient_fk == Patient.id)
                .order_by(Series.last_received_at.desc())
                .limit(recent)
            ).all()
            series_states = dict(s.execute(select(Series.state, func.count()).group_by(Series.state)).all())
            job_states = dict(s.execute(select(Job.state, func.count()).group_by(Job.state)).all())
        deliveries = queue.counts(engine)
    finally:
        engine.dispose()
    free = shutil.disk_usage(cfg.data_dir).free if cfg.data_dir.exists() else 0
    recent_rows = [(r[0], r[1], r[2], r[3], r[4], r[5].strftime("%Y-%m-%d %H:%M:%S")) for r in rows]
    return IndexStatus(*counts, n_inst, int(size), free, recent_rows, series_states, job_states, deliveries)
