"""DICOMweb in tests: a STOW-RS body, and the node's web app in this process with a real index and storage."""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import Engine

from node.config import Config
from node.index.db import make_engine, migrate
from node.index.records import RecordOutcome
from node.index.writer import IndexWriter
from node.receive.ingest import Ingest
from node.storage import Storage
from node.web.app import create_app
from node.web.auth import Authenticator
from node.web.context import WebContext

TOKEN = "dicomweb-test-token-0123456789"
BOUNDARY = "dicomweb-test-boundary-7c1e"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def part(data: bytes, content_type: str = "application/dicom") -> bytes:
    return f"--{BOUNDARY}\r\nContent-Type: {content_type}\r\n\r\n".encode() + data + b"\r\n"


def stow_body(parts: Iterable[bytes], *, close: bool = True) -> bytes:
    """A multipart/related body of ``parts`` (each from part()); ``close=False`` leaves out the final boundary."""
    return b"".join(parts) + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def files_body(files: Iterable[Path]) -> bytes:
    return stow_body(part(p.read_bytes()) for p in files)


@dataclass
class LocalNode:
    """The web app of a node (no DICOM port, no rules) over a migrated SQLite index and a storage."""

    client: TestClient
    storage: Storage
    engine: Engine
    ingest: Ingest
    recorded: list[RecordOutcome] = field(default_factory=list)

    def headers(self, content_type: str = STOW_TYPE) -> dict[str, str]:
        return {"Authorization": f"Bearer {TOKEN}", "Content-Type": content_type}

    def stow(self, body: bytes, path: str = "/dicom-web/studies", content_type: str = STOW_TYPE):  # -> Response
        return self.client.post(path, content=body, headers=self.headers(content_type))

    def get(self, path: str, params: dict[str, str] | None = None, **headers: str):  # -> Response
        return self.client.get(path, params=params, headers={"Authorization": f"Bearer {TOKEN}", **headers})

    def stored_files(self) -> list[Path]:
        return sorted(p for p in self.storage.files.rglob("*") if p.is_file())

    def temp_files(self) -> list[Path]:
        return sorted(self.storage.tmp.iterdir())


@contextmanager
def local_node(root: Path, max_results: int = 10000) -> Iterator[LocalNode]:
    cfg = Config.model_validate(
        {"node": {"data_dir": str(root)}, "web": {"token": TOKEN}, "qr": {"max_results": max_results}}
    )
    storage = Storage(root)
    storage.prepare()
    engine = make_engine(cfg.database_url)
    migrate(engine)
    reader = make_engine(cfg.database_url, write=False)
    writer = IndexWriter(engine)
    writer.start()
    recorded: list[RecordOutcome] = []

    def on_recorded(outcome: RecordOutcome, _at: dt.datetime) -> None:
        recorded.append(outcome)

    ingest = Ingest(storage, writer, on_recorded=on_recorded)
    ctx = WebContext(cfg, engine, reader, Authenticator(cfg.web, TOKEN, engine, reader), ingest=ingest, storage=storage)
    try:
        with TestClient(create_app(ctx)) as client:
            yield LocalNode(client, storage, engine, ingest, recorded)
    finally:
        writer.stop()
        engine.dispose()
        reader.dispose()


def parts_of(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """The (Content-Type, bytes) parts of a multipart response."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    _media, params = parse_options_header(content_type)
    out: list[tuple[str, bytes]] = []
    field, value, data = bytearray(), bytearray(), bytearray()
    headers: dict[str, str] = {}

    def header_end() -> None:
        headers[field.decode().lower()] = value.decode()
        field.clear()
        value.clear()

    def part_end() -> None:
        out.append((headers.get("content-type", ""), bytes(data)))
        data.clear()
        headers.clear()

    parser = MultipartParser(
        params[b"boundary"],
        {
            "on_header_field": lambda d, s, e: field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: value.extend(d[s:e]),
            "on_header_end": header_end,
            "on_part_data": lambda d, s, e: data.extend(d[s:e]),
            "on_part_end": part_end,
        },
    )
    parser.write(body)
    return out
