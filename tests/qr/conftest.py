"""An index holding two real series (CT and MR, stored as the acceptor stores them), and a channel that stands in
for the association: what node.qr answers is read from it, the index behind it is real."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import series_files
from helpers.ingest import receive
from pydicom import Dataset
from pynetdicom.dsutils import decode

from node.config import Config, load_config
from node.dicom.dimse import Element, encode_identifier
from node.index.cluster import Membership
from node.index.db import make_engine, migrate
from node.index.writer import IndexWriter
from node.receive.acceptor import AssociationInfo
from node.receive.ingest import Ingest
from node.receive.sop_classes import (
    PATIENT_ROOT_FIND,
    PATIENT_ROOT_GET,
    PATIENT_ROOT_MOVE,
    STUDY_ROOT_FIND,
    STUDY_ROOT_GET,
    STUDY_ROOT_MOVE,
)
from node.storage import Storage

CT, MR = "ct-head-philips-5mm", "mr-t1-sag-siemens"
STUDY_FIND, STUDY_MOVE, STUDY_GET = STUDY_ROOT_FIND, STUDY_ROOT_MOVE, STUDY_ROOT_GET
PATIENT_FIND, PATIENT_MOVE, PATIENT_GET = PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET
ASSOC = AssociationInfo("a-1", "FINDSCU", "DICOM_NODE", "127.0.0.1", 40000)


@dataclass
class Stored:
    """The node's data directory and index, with the CT and MR series stored."""

    root: Path
    storage: Storage
    engine: Any
    writer: IndexWriter
    process: Membership

    def config(self, extra: str = "") -> Config:
        """A config on this data directory with one DIMSE destination "pacs" (AE PACS) and ``extra``."""
        path = self.root / "node.toml"
        path.write_text(
            f'[node]\ndata_dir = "{self.root / "data"}"\nae_title = "DICOM_NODE"\n'
            '[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "127.0.0.1"\nport = 1\n' + extra
        )
        return load_config(path)


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stored]:
    root = tmp_path_factory.mktemp("qr")
    engine = make_engine(f"sqlite:///{root / 'data' / 'index.sqlite'}")
    migrate(engine)
    process = Membership(engine, root / "data" / "run", lease=60)
    process.register()
    storage = Storage(root / "data", process.id)
    storage.prepare()
    writer = IndexWriter(engine)
    writer.start()
    ingest = Ingest(storage, writer, duplicates="keep_first")
    for name in (CT, MR):
        for f in series_files(name):
            receive(storage, ingest, f)
    yield Stored(root, storage, engine, writer, process)
    writer.stop()
    engine.dispose()


@dataclass
class Channel:
    """The association as node.qr sees it (node.receive.acceptor.QRChannel), recording what it is told.

    ``cancel_after``: cancelled() answers True once that many pending responses were sent; ``stores``:
    the C-GET sub-operations' statuses by SOP Instance UID (success for the others).
    """

    abstract_syntax: str = STUDY_FIND
    cancel_after: int | None = None
    stores: dict[str, tuple[int, str]] = field(default_factory=dict)
    pendings: list[tuple[Dataset | None, dict[str, Any]]] = field(default_factory=list)
    stored: list[tuple[Path, str, str, str]] = field(default_factory=list)
    on_pending: Callable[[], None] | None = None

    def pending(self, identifier: Dataset | Sequence[Element] | None = None, **counts: Any) -> None:
        if identifier is not None and not isinstance(identifier, Dataset):
            # What the acceptor writes for a match given as elements, read back as a requestor reads it.
            data = encode_identifier(identifier, implicit=False)
            identifier = decode(io.BytesIO(data), False, True)
        self.pendings.append((identifier, counts))
        if self.on_pending is not None:
            self.on_pending()

    def cancelled(self) -> bool:
        return self.cancel_after is not None and len(self.pendings) >= self.cancel_after

    def store(
        self,
        path: Path,
        sop_class: str,
        sop_instance: str,
        transfer_syntax: str,
        move_originator: tuple[str, int] | None = None,
    ) -> tuple[int, str]:
        self.stored.append((path, sop_class, sop_instance, transfer_syntax))
        return self.stores.get(sop_instance, (0x0000, ""))
