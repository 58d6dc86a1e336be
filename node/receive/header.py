"""A one-pass reader of a received data set's top-level header, straight from the bytes.

The index needs ~35 top-level attributes and a proof that the data set is
complete; pydicom's general reader builds a Dataset of every element on the
way, which was the largest single cost of storing a small instance. This
reader walks the elements of the memory-mapped file once, keeps the raw
bytes of the tags asked for, skips everything else (sequences included,
nested to any depth), and checks as it goes that every length fits in the
file and that explicit VR data really is explicit VR. Anything it does not
handle (deflate, a structure it finds odd) raises :class:`HeaderError`, and
the caller falls back to pydicom, so unusual files are judged exactly as
before.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass, field
from typing import Any

VALID_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
ITEM, ITEM_END, SEQ_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
UNDEFINED = 0xFFFFFFFF


class HeaderError(ValueError):
    """The fast reader cannot vouch for this data set; use the general reader."""


class _NeedMore(Exception):
    """The header runs past the in-memory head of the file; read the file itself."""


@dataclass(slots=True)
class RawHeader:
    """Raw values of the wanted top-level tags, and where Pixel Data starts."""

    little_endian: bool
    implicit: bool
    values: dict[int, tuple[bytes | None, bytes]] = field(default_factory=dict)  # tag -> (VR or None, value)
    pixel_tag: int | None = None
    pixel_vr: bytes | None = None
    pixel_length: int | None = None
    pixel_value_at: int | None = None
    #: Group 0002 elements in the data set itself (they belong only in the File Meta).
    file_meta_in_dataset: bool = False


def read_raw_header(
    path: str,
    offset: int,
    *,
    implicit: bool,
    little_endian: bool,
    wanted: frozenset[int],
    head: bytes | bytearray | None = None,
    file_size: int | None = None,
) -> RawHeader:
    """Read the data set that starts at ``offset`` in ``path``.

    ``head`` (the first bytes of the file, kept while receiving) saves opening
    and mapping the file when the whole header lies within it.
    """
    if head is not None and file_size is not None and len(head) > offset:
        try:
            return _Walker(head, len(head), implicit, little_endian, partial=file_size > len(head)).top_level(
                offset, wanted
            )
        except _NeedMore:
            pass
    with open(path, "rb") as fp:
        size = fp.seek(0, 2)
        if size <= offset:
            raise HeaderError("empty data set")
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _Walker(m, size, implicit, little_endian).top_level(offset, wanted)


class _Walker:
    def __init__(self, m: Any, end: int, implicit: bool, little: bool, partial: bool = False) -> None:
        e = "<" if little else ">"
        self.m, self.end, self.implicit, self.little = m, end, implicit, little
        #: ``m`` holds only the start of the file: running past its end is not truncation.
        self.partial = partial
        self.tag_fmt = struct.Struct(e + "HH")
        self.u32 = struct.Struct(e + "L")
        self.u16 = struct.Struct(e + "H")

    def short(self, message: str) -> Exception:
        return _NeedMore() if self.partial else HeaderError(message)

    def element(self, pos: int) -> tuple[int, bytes | None, int, int]:
        """``(tag, VR or None, length, value offset)`` of the element header at ``pos``."""
        if pos + 8 > self.end:
            raise self.short(f"the data set ends inside an element header at byte {pos}")
        group, elem = self.tag_fmt.unpack_from(self.m, pos)
        tag = (group << 16) | elem
        if self.implicit or group == 0xFFFE:  # items and delimiters have no VR in any syntax
            return tag, None, self.u32.unpack_from(self.m, pos + 4)[0], pos + 8
        vr = bytes(self.m[pos + 4 : pos + 6])
        if vr not in VALID_VRS:
            raise HeaderError(f"({group:04X},{elem:04X}) has VR bytes {vr!r}: not explicit VR")
        if vr in LONG_VRS:
            if pos + 12 > self.end:
                raise self.short("the data set ends inside an element header")
            return tag, vr, self.u32.unpack_from(self.m, pos + 8)[0], pos + 12
        return tag, vr, self.u16.unpack_from(self.m, pos + 6)[0], pos + 8

    def top_level(self, pos: int, wanted: frozenset[int]) -> RawHeader:
        out = RawHeader(little_endian=self.little, implicit=self.implicit)
        while pos < self.end or self.partial:
            tag, vr, length, value_at = self.element(pos)
            if tag in PIXEL_TAGS:
                out.pixel_tag, out.pixel_vr, out.pixel_length, out.pixel_value_at = tag, vr, length, value_at
                return out
            if length == UNDEFINED:
                if vr is not None and vr not in (b"SQ", b"UN"):
                    raise HeaderError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr!r} has undefined length")
                pos = self.skip_sequence(value_at, 0)
                continue
            if value_at + length > self.end:
                raise self.short(
                    f"the data set ends inside element ({tag >> 16:04X},{tag & 0xFFFF:04X}) (declared length {length})"
                )
            if tag in wanted:
                out.values[tag] = (vr, bytes(self.m[value_at : value_at + length]))
            elif tag >> 16 == 0x0002:
                out.file_meta_in_dataset = True
            pos = value_at + length
        return out

    def skip_sequence(self, pos: int, depth: int) -> int:
        """Skip an undefined-length sequence's items; return the position after its delimiter."""
        if depth > 32:
            raise HeaderError("sequences nested deeper than 32 levels")
        while True:
            tag, _vr, length, pos = self.element(pos)
            if tag == SEQ_END:
                return pos
            if tag != ITEM:
                raise HeaderError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence item belongs")
            if length == UNDEFINED:
                pos = self.skip_item(pos, depth)
            elif pos + length > self.end:
                raise self.short("the data set ends inside a sequence item")
            else:
                pos += length

    def skip_item(self, pos: int, depth: int) -> int:
        """Skip the elements of an undefined-length item; return the position after its delimiter."""
        while True:
            tag, _vr, length, value_at = self.element(pos)
            if tag == ITEM_END:
                return value_at
            if length == UNDEFINED:
                pos = self.skip_sequence(value_at, depth + 1)
            elif value_at + length > self.end:
                raise self.short("the data set ends inside an element of a sequence item")
            else:
                pos = value_at + length
