"""Index rows for unit tests of what reads the index (retention, ...): a series with a real stored file."""

from __future__ import annotations

import datetime as dt

from sqlalchemy.orm import Session

from node.index.models import Instance, Series, Study, utcnow
from node.storage import Storage


def stored_series(s: Session, study: Study, uid: str, storage: Storage, days_old: float = 10) -> Series:
    """A triggered series with one stored instance (a real file), last changed ``days_old`` days ago."""
    when = utcnow() - dt.timedelta(days=days_old)
    series = Series(series_instance_uid=uid, study=study, state="triggered", last_received_at=when, instance_count=1)
    rel = f"storage/{uid}/1.dcm"
    path = storage.absolute(rel)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")
    s.add(
        Instance(
            sop_instance_uid=uid + ".1",
            series=series,
            sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
            transfer_syntax_uid="1.2.840.10008.1.2.1",
            file_path=rel,
            file_size=1,
            checksum="0" * 64,
        )
    )
    return series
