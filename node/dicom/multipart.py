"""The one multipart/related body writer (RFC 2387) for DICOMweb: STOW-RS requests and WADO-RS answers.

A body is built from parts whose sizes are known before the first byte goes out, so the total
Content-Length is known up front (a STOW-RS server or client then needs no chunked encoding) while the
part bytes are read from disk only as they are sent. Every part carries its own Content-Type and
Content-Length headers (PS3.18 8.6.1.2 allows them; they let a reader skip a part without scanning it).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

#: Bytes read from a file per chunk while streaming.
CHUNK = 1024 * 1024


@dataclass(frozen=True)
class Part:
    """One part: either ``data`` (in memory, e.g. a frame) or the first ``length`` bytes of ``path``."""

    content_type: str
    length: int
    path: Path | None = None
    data: bytes | None = None
    #: Further part headers (e.g. Content-Location), written after Content-Type and Content-Length.
    headers: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def of_file(cls, path: Path, content_type: str = "application/dicom", size: int | None = None) -> Part:
        """A part streamed from ``path``; ``size`` (default: its size now) is what will be sent.

        OSError when the file cannot be read now; a file that shrinks before it is sent raises OSError then.
        """
        return cls(content_type, path.stat().st_size if size is None else size, path=path)

    @classmethod
    def of_bytes(cls, data: bytes, content_type: str) -> Part:
        return cls(content_type, len(data), data=data)

    def head(self, boundary: str) -> bytes:
        lines = [f"--{boundary}", f"Content-Type: {self.content_type}", f"Content-Length: {self.length}"]
        lines += [f"{k}: {v}" for k, v in self.headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    def chunks(self) -> Iterator[bytes]:
        if self.data is not None:
            yield self.data
            return
        assert self.path is not None
        left = self.length
        with self.path.open("rb") as f:
            while left > 0:
                chunk = f.read(min(CHUNK, left))
                if not chunk:
                    raise OSError(f"{self.path} is shorter than when the body began ({self.length} bytes)")
                left -= len(chunk)
                yield chunk


def new_boundary() -> str:
    """A boundary that cannot occur in the parts (RFC 2046: at most 70 characters, no quoting needed)."""
    return f"dicom-node-{uuid.uuid4().hex}"


class Body:
    """A multipart/related body: ``content_type`` and ``length`` for the headers, iterate it for the bytes.

    Iterating again starts again from the first part (a client may resend a request).
    """

    def __init__(self, parts: Sequence[Part], type_: str = "application/dicom", boundary: str | None = None) -> None:
        self.parts = list(parts)
        self.boundary = boundary or new_boundary()
        self.content_type = f'multipart/related; type="{type_}"; boundary={self.boundary}'
        self._tail = f"--{self.boundary}--\r\n".encode()
        self.length = sum(len(p.head(self.boundary)) + p.length + 2 for p in self.parts) + len(self._tail)

    def headers(self) -> dict[str, str]:
        """Content-Type and Content-Length of the body."""
        return {"Content-Type": self.content_type, "Content-Length": str(self.length)}

    def __iter__(self) -> Iterator[bytes]:
        for part in self.parts:
            yield part.head(self.boundary)
            yield from part.chunks()
            yield b"\r\n"
        yield self._tail

    def in_pieces(self, size: int = 4 * CHUNK) -> Iterator[bytes]:
        """The body in pieces of about ``size`` bytes: fewer, larger writes for a server that hands each
        piece to another thread (a part's header, data and CRLF are not three round trips)."""
        held: list[bytes] = []
        n = 0
        for chunk in self:
            held.append(chunk)
            n += len(chunk)
            if n >= size:
                yield b"".join(held)
                held, n = [], 0
        if held:
            yield b"".join(held)
