"""A migrated index (SQLite or PostgreSQL) with one series of instances, for the queue and circuit tests.

Each "process" of a test has an engine of its own (its own connections), as separate node processes do.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import Engine, select

from node.index.cluster import Membership
from node.index.db import make_engine
from node.index.models import Delivery, Instance, Patient, Series, Study
from node.send import queue

SERIES_UID = "1.2.826.0.1.3680043.8.498.16"


@dataclass
class Index:
    url: str
    engine: Engine
    root: Path
    engines: list[Engine] = field(default_factory=list)

    def connect(self) -> Engine:
        """An engine of its own, as another node process has (disposed of at the end of the test)."""
        e = make_engine(self.url)
        self.engines.append(e)
        return e

    def process(self, lease: float = 30) -> Membership:
        """A node process registered in this index (its lease runs until it stops)."""
        m = Membership(self.engine, self.root / "run", lease=lease)
        m.register()
        return m

    def queue(self, n: int, destination: str = "pacs", files: list[Path] | None = None) -> list[int]:
        """``n`` instances of one series queued for ``destination``; returns the delivery ids in queue order.

        ``files``: real files to store them as (hard links under the data directory, one per instance).
        """
        with self.engine.begin() as conn:
            series = conn.execute(select(Series.__table__.c.id)).scalar()
            if series is None:
                patient = conn.execute(Patient.__table__.insert().values(patient_id="P16")).inserted_primary_key[0]
                study = conn.execute(
                    Study.__table__.insert().values(study_instance_uid=SERIES_UID + ".0", patient_fk=patient)
                ).inserted_primary_key[0]
                series = conn.execute(
                    Series.__table__.insert().values(series_instance_uid=SERIES_UID, study_fk=study, modality="CT")
                ).inserted_primary_key[0]
            start = conn.execute(select(Instance.__table__.c.id).order_by(Instance.__table__.c.id.desc())).scalar() or 0
            ids = []
            for k in range(start + 1, start + n + 1):
                rel = f"store/{k}.dcm"
                if files:
                    path = self.root / "data" / rel
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.hardlink_to(self._copy(files[k % len(files)]))
                ids.append(
                    conn.execute(
                        Instance.__table__.insert()
                        .values(
                            sop_instance_uid=f"{SERIES_UID}.{k}",
                            series_fk=series,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                            transfer_syntax_uid="1.2.840.10008.1.2.1",
                            file_path=rel,
                            file_size=1000,
                            checksum="0" * 64,
                        )
                        .returning(Instance.__table__.c.id)
                    ).scalar_one()
                )
            queue.enqueue(conn, ids, [destination])
            d = Delivery.__table__
            return list(
                conn.execute(
                    select(d.c.id).where(d.c.instance_fk.in_(ids), d.c.destination == destination).order_by(d.c.id)
                ).scalars()
            )

    def _copy(self, source: Path) -> Path:
        """A copy of a read-only shared file under this test's folder (linked as many times as needed)."""
        copy = self.root / "originals" / source.name
        if not copy.exists():
            copy.parent.mkdir(exist_ok=True)
            shutil.copyfile(source, copy)
        return copy

    def deliveries(self) -> list[tuple[int, str, str | None, int, str]]:
        """(id, state, owner, attempts, last_error) of every delivery, in queue order."""
        d = Delivery.__table__
        with self.engine.connect() as conn:
            return [
                tuple(r)  # type: ignore[misc]
                for r in conn.execute(
                    select(d.c.id, d.c.state, d.c.owner, d.c.attempts, d.c.last_error).order_by(d.c.id)
                )
            ]
