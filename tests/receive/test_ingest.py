"""The durable write path on its own (node.receive.ingest): no association, no node process.

A real file's data set is streamed into a ReceivedFile the way the acceptor does it (our File Meta,
then the bytes as received) and handed to Ingest with a migrated SQLite index and the real index
writer. What a user relies on: Success means the bytes received are on disk and indexed once; a
duplicate follows node.duplicates; a refused data set leaves no file, no temp file and no row.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from helpers import dataset_bytes
from pydicom import dcmread
from pydicom.uid import UID, ExplicitVRLittleEndian
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from node.dicom import dimse
from node.dicom.status import Status
from node.index.db import make_engine, migrate, session_factory
from node.index.models import Instance
from node.index.records import DuplicatePolicy, RecordOutcome
from node.index.writer import IndexWriter
from node.receive.ingest import Ingest, Peer, StoreResult
from node.receive.rxfile import ReceivedFile
from node.storage import Storage

CT = "transfer-syntaxes/misc/CT_small.dcm"
PEER = Peer("SENDER", "NODE", "127.0.0.1", "a-1")


@dataclass
class Node:
    storage: Storage
    sessions: sessionmaker[Session]
    ingest: Ingest
    recorded: list[RecordOutcome]

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage.files.rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted(self.storage.tmp.iterdir())

    def rows(self) -> list[tuple[str, str, str]]:
        with self.sessions() as s:
            q = select(Instance.sop_instance_uid, Instance.file_path, Instance.checksum)
            return list(s.execute(q).all())


def _node(tmp_path: Path, policy: DuplicatePolicy) -> Iterator[Node]:
    storage = Storage(tmp_path / "data")
    storage.prepare()
    engine = make_engine(f"sqlite:///{tmp_path / 'data' / 'index.sqlite'}")
    migrate(engine)
    writer = IndexWriter(engine)
    writer.start()
    recorded: list[RecordOutcome] = []

    def on_recorded(outcome: RecordOutcome, _at: dt.datetime) -> None:
        recorded.append(outcome)

    yield Node(
        storage, session_factory(engine), Ingest(storage, writer, duplicates=policy, on_recorded=on_recorded), recorded
    )
    writer.stop()
    engine.dispose()


@pytest.fixture
def node(tmp_path: Path) -> Iterator[Node]:
    yield from _node(tmp_path, "keep_first")


@pytest.fixture
def overwriting_node(tmp_path: Path) -> Iterator[Node]:
    yield from _node(tmp_path, "overwrite")


def _receive(
    node: Node, data: bytes, ts: str, sop_class: str, sop_instance: str, *, request_instance: str | None = None
) -> tuple[StoreResult, bytes]:
    """What the acceptor does with one C-STORE: our File Meta, the data set as received, then store()."""
    rx = ReceivedFile(node.storage.tmp)
    meta = dimse.encode_file_meta(sop_class, sop_instance, ts, "1.2.3.4", "TEST", PEER.calling_ae)
    rx.write(meta)
    rx.dataset_offset = rx.size
    half = len(data) // 2
    rx.write(data[:half])  # as PDV fragments arrive
    rx.write(data[half:])
    result = node.ingest.store(
        rx,
        sop_class_uid=sop_class,
        sop_instance_uid=request_instance if request_instance is not None else sop_instance,
        transfer_syntax=UID(ts),
        peer=PEER,
    )
    return result, meta + data


def _send(node: Node, path: Path) -> tuple[StoreResult, bytes]:
    ds = dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    return _receive(node, dataset_bytes(path), ts, str(ds.SOPClassUID), str(ds.SOPInstanceUID))


def test_a_received_instance_is_stored_byte_for_byte_and_indexed_once(node: Node, shared_data: Path) -> None:
    path = shared_data / CT
    result, written = _send(node, path)

    assert (result.status, result.outcome) == (Status.SUCCESS, "new"), result
    rows = node.rows()
    assert len(rows) == 1
    sop_uid, file_path, checksum = rows[0]
    assert sop_uid == str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    stored = node.storage.absolute(file_path)
    assert node.stored_files() == [stored]
    assert stored.read_bytes() == written  # our File Meta, then exactly the bytes received
    assert dataset_bytes(stored) == dataset_bytes(path)
    assert checksum.startswith("xxh3_128:")
    assert dcmread(stored).SOPInstanceUID == sop_uid  # a valid Part 10 file
    assert node.temp_files() == []
    assert [o.kind for o in node.recorded] == ["new"]  # the series tracker is told


def test_a_duplicate_keeps_the_first_copy_by_default(node: Node, shared_data: Path) -> None:
    _send(node, shared_data / CT)
    [(_, first_path, _)] = node.rows()
    first_bytes = node.storage.absolute(first_path).read_bytes()

    result, _ = _send(node, shared_data / CT)

    assert (result.status, result.outcome) == (Status.SUCCESS, "duplicate"), result
    assert [r[1] for r in node.rows()] == [first_path]
    assert node.stored_files() == [node.storage.absolute(first_path)]  # the second copy is not left behind
    assert node.storage.absolute(first_path).read_bytes() == first_bytes
    assert node.temp_files() == []


@pytest.mark.parametrize("policy", ["keep_first", "overwrite"])
def test_a_file_indexed_meanwhile_by_another_process_is_kept(request, shared_data: Path, policy) -> None:
    """Crash recovery in another process may index our just-placed file before our own row commits.

    Our record then finds the instance "already indexed", as this very file: deleting it as a duplicate's
    second copy would leave the row without its file.
    """
    node: Node = request.getfixturevalue("node" if policy == "keep_first" else "overwriting_node")
    recorder = node.ingest.recorder
    real = recorder.record

    def recovered_first(tx, rec, **kw):  # type: ignore[no-untyped-def]
        real(tx, rec)  # the other process's row, for this same file
        return real(tx, rec, **kw)

    recorder.record = recovered_first  # type: ignore[method-assign]
    result, written = _send(node, shared_data / CT)

    kind = "duplicate" if policy == "keep_first" else "replaced"
    assert (result.status, result.outcome) == (Status.SUCCESS, kind), result
    [(_, path, _)] = node.rows()
    assert node.stored_files() == [node.storage.absolute(path)]
    assert node.storage.absolute(path).read_bytes() == written


def test_a_duplicate_replaces_the_stored_copy_under_overwrite(overwriting_node: Node, shared_data: Path) -> None:
    node = overwriting_node
    _send(node, shared_data / CT)
    [(_, first_path, _)] = node.rows()

    result, written = _send(node, shared_data / CT)

    assert (result.status, result.outcome) == (Status.SUCCESS, "replaced"), result
    [(_, second_path, _)] = node.rows()
    assert second_path != first_path
    assert node.stored_files() == [node.storage.absolute(second_path)]  # the old file is gone
    assert node.storage.absolute(second_path).read_bytes() == written
    assert [o.kind for o in node.recorded] == ["new", "replaced"]


def test_a_truncated_data_set_is_refused_and_leaves_nothing(node: Node, shared_data: Path) -> None:
    path = shared_data / "malformed" / "rtplan_truncated.dcm"
    result, _ = _send(node, path)

    assert result.status == Status.CANNOT_UNDERSTAND, result
    assert "truncated" in result.reason, result.reason  # the sender is told why
    assert node.rows() == [] and node.stored_files() == [] and node.temp_files() == []
    assert node.recorded == []


def test_a_data_set_unlike_its_request_is_refused_and_leaves_nothing(node: Node, shared_data: Path) -> None:
    path = shared_data / CT
    ds = dcmread(path, stop_before_pixels=True)
    result, _ = _receive(
        node,
        dataset_bytes(path),
        str(ds.file_meta.TransferSyntaxUID),
        str(ds.SOPClassUID),
        str(ds.SOPInstanceUID),
        request_instance="1.2.826.0.1.3680043.99.1",
    )

    assert result.status == Status.DATASET_MISMATCH, result
    assert str(ds.SOPInstanceUID) in result.reason and "1.2.826.0.1.3680043.99.1" in result.reason
    assert node.rows() == [] and node.stored_files() == [] and node.temp_files() == []


def test_an_instance_without_a_series_uid_is_kept_with_a_warning(node: Node, shared_data: Path, tmp_path: Path) -> None:
    ds = dcmread(shared_data / CT)
    del ds.SeriesInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    copy = tmp_path / "no_series.dcm"
    ds.save_as(copy, enforce_file_format=True)

    result, written = _send(node, copy)

    assert result.status == Status.STORED_NONCONFORMANT, result
    assert "SeriesInstanceUID" in result.reason
    [(_, file_path, _)] = node.rows()
    assert node.storage.absolute(file_path).read_bytes() == written  # its bytes are not lost
    assert node.recorded == []  # no series to track
