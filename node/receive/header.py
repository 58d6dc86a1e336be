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


def read_raw_header(
    path: str, offset: int, *, implicit: bool, little_endian: bool, wanted: frozenset[int]
) -> RawHeader:
    """Read the data set that starts at ``offset`` in ``path``."""
    with open(path, "rb") as fp:
        size = fp.seek(0, 2)
        if size <= offset:
            raise HeaderError("empty data set")
        with mmap.mmap(fp.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return _walk(m, offset, size, implicit, little_endian, wanted)


def _walk(m: mmap.mmap, pos: int, end: int, implicit: bool, little: bool, wanted: frozenset[int]) -> RawHeader:
    e = "<" if little else ">"
    tag_fmt = struct.Struct(e + "HH")
    u32 = struct.Struct(e + "L")
    u16 = struct.Struct(e + "H")
    out = RawHeader(little_endian=little, implicit=implicit)
    while pos < end:
        if pos + 8 > end:
            raise HeaderError(f"the data set ends inside an element header at byte {pos}")
        group, elem = tag_fmt.unpack_from(m, pos)
        tag = (group << 16) | elem
        if implicit:
            vr = None
            (length,) = u32.unpack_from(m, pos + 4)
            value_at = pos + 8
        else:
            vr = m[pos + 4 : pos + 6]
            if vr not in VALID_VRS:
                raise HeaderError(f"({group:04X},{elem:04X}) has VR bytes {vr!r}: not explicit VR")
            if vr in LONG_VRS:
                if pos + 12 > end:
                    raise HeaderError("the data set ends inside an element header")
                (length,) = u32.unpack_from(m, pos + 8)
                value_at = pos + 12
            else:
                (length,) = u16.unpack_from(m, pos + 6)
                value_at = pos + 8
        if tag in PIXEL_TAGS:
            out.pixel_tag, out.pixel_vr, out.pixel_length, out.pixel_value_at = tag, vr, length, value_at
            return out
        if length == UNDEFINED:
            if not implicit and vr not in (b"SQ", b"UN"):
                raise HeaderError(f"({group:04X},{elem:04X}) {vr!r} has undefined length")
            pos = _skip_sequence(m, value_at, end, tag_fmt, u32, implicit, little, 0)
            continue
        if value_at + length > end:
            raise HeaderError(
                f"the data set ends inside element ({group:04X},{elem:04X}) (declared length {length})"
            )
        if tag in wanted:
            out.values[tag] = (vr, m[value_at : value_at + length])
        pos = value_at + length
    return out


def _skip_sequence(m, pos, end, tag_fmt, u32, implicit, little, depth) -> int:  # type: ignore[no-untyped-def]
    """Skip an undefined-length sequence's items; return the position after its delimiter."""
    if depth > 32:
        raise HeaderError("sequences nested deeper than 32 levels")
    while True:
        if pos + 8 > end:
            raise HeaderError("the data set ends inside a sequence")
        group, elem = tag_fmt.unpack_from(m, pos)
        tag = (group << 16) | elem
        (length,) = u32.unpack_from(m, pos + 4)
        pos += 8
        if tag == SEQ_END:
            return pos
        if tag != ITEM:
            raise HeaderError(f"({group:04X},{elem:04X}) where a sequence item belongs")
        if length != UNDEFINED:
            if pos + length > end:
                raise HeaderError("the data set ends inside a sequence item")
            pos += length
            continue
        pos = _skip_item(m, pos, end, tag_fmt, u32, implicit, little, depth)


def _skip_item(m, pos, end, tag_fmt, u32, implicit, little, depth) -> int:  # type: ignore[no-untyped-def]
    """Skip the elements of an undefined-length item; return the position after its delimiter."""
    u16 = struct.Struct(("<" if little else ">") + "H")
    while True:
        if pos + 8 > end:
            raise HeaderError("the data set ends inside a sequence item")
        group, elem = tag_fmt.unpack_from(m, pos)
        tag = (group << 16) | elem
        if tag == ITEM_END:
            return pos + 8
        if implicit:
            vr = None
            (length,) = u32.unpack_from(m, pos + 4)
            value_at = pos + 8
        else:
            vr = m[pos + 4 : pos + 6]
            if vr not in VALID_VRS:
                raise HeaderError(f"({group:04X},{elem:04X}) in a sequence has VR bytes {vr!r}")
            if vr in LONG_VRS:
                (length,) = u32.unpack_from(m, pos + 8)
                value_at = pos + 12
            else:
                (length,) = u16.unpack_from(m, pos + 6)
                value_at = pos + 8
        if length == UNDEFINED:
            pos = _skip_sequence(m, value_at, end, tag_fmt, u32, implicit, little, depth + 1)
            continue
        if value_at + length > end:
            raise HeaderError("the data set ends inside an element of a sequence item")
        pos = value_at + length
