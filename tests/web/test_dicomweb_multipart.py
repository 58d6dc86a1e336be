"""node.dicom.multipart: the one multipart/related writer of STOW-RS requests and WADO-RS answers.

What a reader relies on: the Content-Length announced before the first byte is the body's length, every
part comes back byte for byte with its own Content-Type, and a file that shrank is an error, not a short part.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import series_files
from helpers.dicomweb import parts_of

from node.dicom.multipart import Body, Part

CT = series_files("ct-head-philips-5mm")


def test_files_and_bytes_come_back_whole_with_the_announced_length():
    files = CT[:3]
    body = Body(
        [Part.of_file(p, "application/dicom; transfer-syntax=1.2.840.10008.1.2.1") for p in files]
        + [Part.of_bytes(b"\x00\x01" * 10, "application/octet-stream")]
    )
    data = b"".join(body)
    assert len(data) == body.length == int(body.headers()["Content-Length"])
    assert b"".join(body) == data  # iterating again gives the same body
    pieces = list(body.in_pieces(size=600_000))  # as a server writes it: the same bytes in fewer, larger pieces
    assert b"".join(pieces) == data
    assert all(len(p) >= 600_000 for p in pieces[:-1]) and len(pieces) < len(list(body))
    parts = parts_of(body.content_type, data)
    assert [d for _t, d in parts] == [p.read_bytes() for p in files] + [b"\x00\x01" * 10]
    assert parts[0][0] == "application/dicom; transfer-syntax=1.2.840.10008.1.2.1"
    assert body.content_type.startswith('multipart/related; type="application/dicom"; boundary=')
    assert len(body.boundary) <= 70


def test_a_file_that_shrinks_while_sent_is_an_error(tmp_path: Path):
    f = tmp_path / "x.dcm"
    f.write_bytes(CT[0].read_bytes())
    body = Body([Part.of_file(f)])
    f.write_bytes(b"short")
    with pytest.raises(OSError, match="shorter"):
        b"".join(body)
