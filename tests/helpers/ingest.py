"""Receiving a file without a network: what the acceptor hands node.receive.ingest for one C-STORE."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import UID

from helpers import dataset_bytes
from node.dicom import dimse
from node.dicom.status import Status
from node.receive.ingest import Ingest, Peer
from node.receive.rxfile import ReceivedFile
from node.storage import Storage


def receive(storage: Storage, ingest: Ingest, path: Path) -> None:
    """One C-STORE as the acceptor hands it over: our File Meta, then the data set as sent; must succeed."""
    ds = dcmread(path, stop_before_pixels=True)
    ts = str(ds.file_meta.TransferSyntaxUID)
    rx = ReceivedFile(storage.tmp)
    rx.write(dimse.encode_file_meta(str(ds.SOPClassUID), str(ds.SOPInstanceUID), ts, "1.2.3.4", "TEST"))
    rx.dataset_offset = rx.size
    rx.write(dataset_bytes(path))
    result = ingest.store(
        rx,
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        transfer_syntax=UID(ts),
        peer=Peer("SENDER", "NODE", "127.0.0.1"),
    )
    assert result.status == Status.SUCCESS, result
