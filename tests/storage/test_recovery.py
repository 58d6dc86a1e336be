"""Start-up recovery on its own (node.storage.recovery): files stored before a crash whose rows never committed.

Real files go straight into a data directory's storage with an empty index; recovery must index the
received ones as received series (the rules run on them) and the node's own outputs (UIDs under its
derived root) as not tracked (no rule runs on them), and move what it cannot read to quarantine.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import UID
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.dicom.identity import DERIVED_UID_ROOT
from node.index.db import make_engine, migrate, session_factory
from node.index.models import Instance, Series
from node.index.writer import IndexWriter
from node.storage import Storage
from node.storage.recovery import mark_clean, recover

CT = "transfer-syntaxes/misc/CT_small.dcm"
Store = tuple[Storage, IndexWriter, sessionmaker[Session]]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    storage = Storage(tmp_path / "data")
    storage.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    writer = IndexWriter(engine)
    writer.start()
    yield storage, writer, session_factory(engine)
    writer.stop()
    engine.dispose()


def _place(storage: Storage, source: Path, sop_uid: str | None = None, series_uid: str = "") -> Path:
    """A copy of ``source`` (with new UIDs if given) where the node would have stored it."""
    ds = dcmread(source)
    if sop_uid is not None:
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = UID(sop_uid)
        ds.SeriesInstanceUID = series_uid
    final = storage.path_for(str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
    final.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(final, enforce_file_format=True)
    return final


def test_received_and_derived_files_are_indexed_and_only_received_series_are_tracked(
    store: Store, shared_data: Path
) -> None:
    storage, writer, sessions = store
    received = _place(storage, shared_data / CT)
    derived_uid = DERIVED_UID_ROOT + "1.2.3"
    derived = _place(storage, shared_data / CT, sop_uid=derived_uid, series_uid=DERIVED_UID_ROOT + "1.2")

    report = recover(storage, sessions, writer)

    assert report.full_scan and sorted(report.indexed) == sorted([dcmread(received).SOPInstanceUID, derived_uid])
    assert report.quarantined == []
    with sessions() as s:
        states = dict(
            s.execute(
                select(Instance.sop_instance_uid, Series.state).join(Series, Instance.series_fk == Series.id)
            ).all()
        )
    assert states[derived_uid] == "triggered", states  # a node's own output: no rule runs on it
    assert states[str(dcmread(received).SOPInstanceUID)] == "receiving", states
    assert derived.is_file() and received.is_file()


def test_an_unreadable_stored_file_goes_to_quarantine_with_the_reason(
    store: Store, shared_data: Path, caplog: pytest.LogCaptureFixture
) -> None:
    storage, writer, sessions = store
    stored = _place(storage, shared_data / CT)
    data = stored.read_bytes()
    stored.write_bytes(data[: len(data) // 10])  # cut inside the header: a torn copy

    with caplog.at_level("WARNING", logger="node.storage.recovery"):
        report = recover(storage, sessions, writer)

    assert report.indexed == [] and len(report.quarantined) == 1
    assert not stored.exists() and Path(report.quarantined[0]).is_file()
    assert "unreadable (" in caplog.text and "it is truncated" in caplog.text, caplog.text
    with sessions() as s:
        assert s.execute(select(Instance.id)).first() is None


def test_a_clean_stop_skips_the_scan(store: Store, shared_data: Path) -> None:
    storage, writer, sessions = store
    mark_clean(storage)
    shutil.copy(shared_data / CT, storage.tmp / "rx-1-1.part")  # a temp file is always removed
    report = recover(storage, sessions, writer)
    assert not report.full_scan and report.temp_removed == 1
