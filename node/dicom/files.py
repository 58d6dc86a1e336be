"""Reading DICOM files: just enough of a data set to check it is whole and to index it.

Pixel data is never decoded or even loaded: the header is read up to (7FE0,0010), and then the Pixel
Data element's structure is walked on disk to prove it is complete (native: long enough for Rows x
Columns x frames; encapsulated: items up to the sequence delimiter). That keeps a 1 GB multi-frame
instance as cheap to check as a small one.

Two readers sit behind one interface, fastest first. The byte-level walker (:func:`read_raw_header`)
walks the elements of the file once, keeps the raw bytes of the ~35 top-level tags the index needs,
skips everything else (sequences included, nested to any depth), and checks as it goes that every
length fits in the file and that explicit VR data really is explicit VR: pydicom's general reader
builds a Dataset of every element on the way, which was the largest single cost of storing a small
instance. What the walker declines (deflate, a structure it finds odd: :class:`HeaderError`) goes to
pydicom's reader; a data set the walker finds cut short (:class:`Truncated`) is refused unless
pydicom's reader names another cause. Both apply the same checks, so a file gets the same answer whichever reads it.

The same checks serve a data set being received (:func:`read_header`, straight from the
association's temp file) and a file already on disk (:func:`read_file_header`: recovery, the node's
own outputs); :func:`file_checksum` is the checksum the index keeps for either.
"""

from __future__ import annotations

import io
import mmap
import struct
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, NoReturn

import xxhash
from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import dcmread, read_dataset, read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
    MediaStorageDirectoryStorage,
)

from node.dicom.status import Status

#: Prefix of every stored checksum, so the algorithm can change without ambiguity.
CHECKSUM_ALGORITHM = "xxh3_128"

# -- the byte-level walker ----------------------------------------------------

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


class Truncated(HeaderError):
    """The data set ends inside a top-level element: the sender's bytes are incomplete.

    pydicom's reader stops quietly at a cut-off element header or a value it has already decoded, so
    this verdict stands unless the general reader names another cause (a wrong VR encoding, say).
    """


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
        #: Inside a sequence, and after an undefined-length UN (whose items are implicit VR, PS3.5 6.2.2),
        #: the walk may be off track: running out of bytes there proves nothing.
        self.nested = 0
        self.skipped_un = False

    def short(self, message: str) -> Exception:
        if self.partial:
            return _NeedMore()
        return Truncated(message) if self.nested == 0 and not self.skipped_un else HeaderError(message)

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
            if not self.partial and pos + 8 > self.end and not bytes(self.m[pos : self.end]).strip(b"\x00 "):
                break  # padding after the last element (some senders pad to an even or block size): not data
            tag, vr, length, value_at = self.element(pos)
            if tag in PIXEL_TAGS:
                out.pixel_tag, out.pixel_vr, out.pixel_length, out.pixel_value_at = tag, vr, length, value_at
                return out
            if length == UNDEFINED:
                if vr is not None and vr not in (b"SQ", b"UN"):
                    raise HeaderError(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) {vr!r} has undefined length")
                self.skipped_un |= vr == b"UN"
                self.nested += 1
                pos = self.skip_sequence(value_at, 0)
                self.nested -= 1
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


# The node keeps data sets as they arrive; odd values are the sender's
# business, not a reason to refuse or to log a warning per element. What we
# do refuse is logged by us, with the reason.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")

_BINARY_INT = {b"US": (2, False), b"SS": (2, True), b"UL": (4, False), b"SL": (4, True)}
#: Text VRs whose bytes depend on Specific Character Set (PS3.5 6.1.2.3).
_CHARSET_VRS = {b"PN", b"LO", b"SH", b"ST", b"LT", b"UT", b"UC"}

KEYWORDS = (
    "SpecificCharacterSet",
    "PatientID",
    "IssuerOfPatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "SeriesInstanceUID",
    "Modality",
    "SeriesNumber",
    "SeriesDescription",
    "BodyPartExamined",
    "ProtocolName",
    "SeriesDate",
    "SeriesTime",
    "Manufacturer",
    "StationName",
    "FrameOfReferenceUID",
    "SOPInstanceUID",
    "SOPClassUID",
    "InstanceNumber",
    "AcquisitionNumber",
    "ImageType",
    "Rows",
    "Columns",
    "NumberOfFrames",
    "BitsAllocated",
    "SamplesPerPixel",
    "PhotometricInterpretation",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "PixelSpacing",
    "SliceThickness",
    "SliceLocation",
)


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(f"{keyword} is not in pydicom's data dictionary")
    return tag


TAGS = {k: _tag(k) for k in KEYWORDS}
_WANTED = frozenset(TAGS.values())
_VRS = {k: dictionary_VR(TAGS[k]).encode() for k in KEYWORDS}


_GROUP2 = (
    "the data set contains File Meta elements (group 0002): readers would take them for the file's own and misread it"
)


# -- the checks ---------------------------------------------------------------


class Rejected(Exception):
    """The data set cannot be stored; carries the DIMSE status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class Header:
    """Attribute values of one data set, whichever reader produced them."""

    transfer_syntax: UID

    def raw(self, keyword: str) -> tuple[Any, bytes | None]:
        """``(value, VR)``: bytes for values still encoded, else a decoded value and ``None``."""
        raise NotImplementedError

    def _decode_text(self, keyword: str, value: bytes, vr: bytes) -> str:
        raise NotImplementedError

    def text(self, keyword: str, limit: int = 1024) -> str:
        v, vr = self.raw(keyword)
        if v is None:
            return ""
        if isinstance(v, bytes):
            if vr in _BINARY_INT:
                n = self.int(keyword)
                return "" if n is None else str(n)
            # ISO 2022 text (e.g. Japanese, Korean) is 7-bit: ASCII bytes with escape sequences to decode.
            if b"\x1b" not in v:
                try:
                    return v.decode("ascii").strip(" \x00")[:limit]
                except UnicodeDecodeError:
                    pass
            return self._decode_text(keyword, v, vr or _VRS[keyword])[:limit]
        if isinstance(v, (MultiValue, list, tuple)):
            return "\\".join(str(x) for x in v)[:limit]
        return str(v).strip()[:limit]

    def int(self, keyword: str) -> int | None:
        v, vr = self.raw(keyword)
        if v is None:
            return None
        if isinstance(v, bytes) and (vr or _VRS[keyword]) in _BINARY_INT:
            size, signed = _BINARY_INT[vr or _VRS[keyword]]
            if len(v) < size:
                return None
            return int.from_bytes(
                v[:size], "big" if self.transfer_syntax == ExplicitVRBigEndian else "little", signed=signed
            )
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        try:
            n = int(float(s.split("\\")[0].strip(" \x00")))
        except (ValueError, OverflowError):
            return None
        return n if -(2**31) <= n < 2**31 else None  # an index column, not a place for nonsense values

    def float(self, keyword: str) -> float | None:
        v, _vr = self.raw(keyword)
        if v is None:
            return None
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        try:
            return float(s.split("\\")[0].strip(" \x00"))
        except ValueError:
            return None


class RawHeaderView(Header):
    def __init__(self, raw: RawHeader, ts: UID) -> None:
        self.h = raw
        self.transfer_syntax = ts

    def raw(self, keyword: str) -> tuple[Any, bytes | None]:
        found = self.h.values.get(TAGS[keyword])
        if found is None:
            return None, None
        vr, value = found
        # A standard attribute sent as UN is still what the dictionary says it is.
        return value, (vr if vr and vr != b"UN" else _VRS[keyword])

    def _decode_text(self, keyword: str, value: bytes, vr: bytes) -> str:
        charset = self.text("SpecificCharacterSet") or "ISO_IR 6"
        encodings = convert_encodings(charset.split("\\"))
        delimiters = {0x5E, 0x3D} if vr == b"PN" else {0x5C}
        try:
            return decode_bytes(value, encodings, delimiters).strip(" \x00")
        except Exception:
            return value.decode("latin-1").strip(" \x00")


class DatasetHeaderView(Header):
    def __init__(self, ds: Dataset, ts: UID) -> None:
        self.ds = ds
        self.transfer_syntax = ts

    def raw(self, keyword: str) -> tuple[Any, bytes | None]:
        tag = TAGS[keyword]
        elem = self.ds._dict.get(BaseTag(tag))
        if elem is None:
            return None, None
        if isinstance(elem, RawDataElement) and elem.value is not None:
            return elem.value, (elem.VR.encode() if elem.VR else _VRS[keyword])
        try:
            return self.ds[tag].value, None
        except Exception:  # an unreadable value is indexed as missing, the bytes are kept
            return None, None

    def _decode_text(self, keyword: str, value: bytes, vr: bytes) -> str:
        try:
            return str(self.ds[TAGS[keyword]].value).strip()
        except Exception:
            return value.decode("latin-1").strip(" \x00")


def read_header(
    path: str, transfer_syntax: UID, file_size: int, dataset_offset: int, head: bytes | bytearray | None = None
) -> Header:
    """Read and check the data set that starts at ``dataset_offset`` in ``path``.

    ``head`` is the start of the file if the caller has it in memory.
    """
    truncated: Truncated | None = None
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        try:
            raw = read_raw_header(
                path,
                dataset_offset,
                implicit=transfer_syntax.is_implicit_VR,
                little_endian=transfer_syntax.is_little_endian,
                wanted=_WANTED,
                head=head,
                file_size=file_size,
            )
        except Truncated as e:
            truncated = e
        except HeaderError:
            pass  # let the general reader judge it
        else:
            if raw.file_meta_in_dataset:
                raise Rejected(Status.CANNOT_UNDERSTAND, _GROUP2)
            view = RawHeaderView(raw, transfer_syntax)
            if raw.pixel_tag is not None:
                _check_pixel_data(
                    path,
                    view,
                    transfer_syntax,
                    raw.pixel_tag,
                    raw.pixel_length or 0,
                    raw.pixel_value_at or 0,
                    file_size,
                )
            return view
    with open(path, "rb") as fp:
        checked = _read_with_pydicom(fp, transfer_syntax, file_size, dataset_offset)
    if truncated is not None:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"{truncated}: it is truncated")
    return checked


def read_file_header(path: Path) -> tuple[Header, int, FileMetaDataset]:
    """A stored DICOM file (File Meta, then the data set): its checked header, size and File Meta.

    For files already on disk (recovery, the node's own outputs); received data sets come through
    :func:`read_header` straight from the association's temp file.
    """
    size = path.stat().st_size
    try:
        meta = read_file_meta_info(path)
    except InvalidDicomError:
        raise Rejected(
            Status.CANNOT_UNDERSTAND,
            "no File Meta Information (128-byte preamble, 'DICM', group 0002): not a DICOM file as stored",
        ) from None
    if not meta.get("TransferSyntaxUID"):
        raise Rejected(Status.CANNOT_UNDERSTAND, "the File Meta has no Transfer Syntax UID (0002,0010)")
    ts = UID(str(meta.TransferSyntaxUID))
    if not ts.is_transfer_syntax:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"transfer syntax {ts} is not one this node can read")
    # preamble (128) + "DICM" (4) + the group length element (12) + the rest of group 0002
    header = read_header(str(path), ts, size, 132 + 12 + int(meta.FileMetaInformationGroupLength))
    return header, size, meta


#: A File Meta group larger than this is not a real one (they are a few hundred bytes).
MAX_FILE_META = 64 * 1024


def split_file_meta(head: bytes | bytearray) -> tuple[Dataset, int] | None:
    """The File Meta of a Part 10 file's start and where its data set begins; None: more bytes needed.

    Incremental: call it again with more of the start as it arrives (STOW-RS parts are streamed), and it
    never reads past the File Meta, so the data set need not have arrived.

    Raises ValueError (with what is wrong) for something that is not a Part 10 file. The group is walked
    element by element (Explicit VR Little Endian, PS3.10 7.1) rather than trusting its group length.
    """
    if len(head) < 132:
        return None
    if head[128:132] != b"DICM":
        raise ValueError("not a DICOM Part 10 file: no 128-byte preamble followed by 'DICM'")
    pos = 132
    while True:
        if len(head) < pos + 6:
            if len(head) >= MAX_FILE_META:
                _file_meta_too_long()
            return None
        group, _elem = struct.unpack_from("<HH", head, pos)
        if group != 0x0002:
            break
        vr = bytes(head[pos + 4 : pos + 6])
        if vr in LONG_VRS:
            if len(head) < pos + 12:
                return None
            length = struct.unpack_from("<L", head, pos + 8)[0]
            pos += 12 + length
        else:
            if len(head) < pos + 8:
                return None
            pos += 8 + struct.unpack_from("<H", head, pos + 6)[0]
        if pos > MAX_FILE_META:
            _file_meta_too_long()
    if pos == 132:
        raise ValueError("not a DICOM Part 10 file: no File Meta Information (group 0002) after 'DICM'")
    try:
        meta = read_dataset(io.BytesIO(bytes(head[132:pos])), is_implicit_VR=False, is_little_endian=True)
        ts = str(meta.get("TransferSyntaxUID", "") or "").strip()
    except Exception as e:
        raise ValueError(f"the File Meta Information cannot be read: {e}") from None
    if not ts:
        raise ValueError("the File Meta has no Transfer Syntax UID (0002,0010)")
    if not UID(ts).is_transfer_syntax:
        raise ValueError(f"transfer syntax {ts} in the File Meta is not one this node can read")
    return meta, pos


def _file_meta_too_long() -> NoReturn:
    raise ValueError(f"the File Meta Information is longer than {MAX_FILE_META} bytes: not a real one")


def _read_with_pydicom(fp: BinaryIO, transfer_syntax: UID, file_size: int, dataset_offset: int) -> Header:
    try:
        ds = dcmread(fp, stop_before_pixels=True, defer_size=65536)
    except Exception as exc:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"the data set cannot be parsed: {exc}") from None
    view = DatasetHeaderView(ds, transfer_syntax)
    if any((int(tag) >> 16) == 0x0002 for tag in ds._dict):
        raise Rejected(Status.CANNOT_UNDERSTAND, _GROUP2)
    _check_complete(ds, file_size)
    pixel_offset = fp.tell()
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        _check_vr_encoding(fp, dataset_offset, transfer_syntax, file_size)
        located = _locate_pixel_data(fp, transfer_syntax, pixel_offset, file_size)
        if located is not None:
            _check_pixel_data(fp.name, view, transfer_syntax, *located, file_size)
    return view


def _check_complete(ds: Dataset, file_size: int) -> None:
    """pydicom accepts a value cut short by the end of the data; we refuse to store one."""
    for elem in ds._dict.values():
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        short = elem.value_tell + elem.length > file_size if elem.value is None else len(elem.value) < elem.length
        if short:
            raise Rejected(
                Status.CANNOT_UNDERSTAND,
                f"the data set ends inside element {elem.tag} (declared length {elem.length}): it is truncated",
            )


def _check_vr_encoding(fp: BinaryIO, offset: int, ts: UID, file_size: int) -> None:
    """A data set in implicit VR under an explicit VR transfer syntax (or the reverse) is refused.

    Readers trust the negotiated transfer syntax; storing such bytes would
    hand every downstream system a file it misreads.
    """
    if offset + 8 > file_size:
        raise Rejected(Status.CANNOT_UNDERSTAND, "the data set is empty")
    fp.seek(offset + 4)
    vr = fp.read(2)
    explicit = vr in VALID_VRS
    if ts.is_implicit_VR and explicit:
        raise Rejected(
            Status.CANNOT_UNDERSTAND,
            "the data set is encoded in explicit VR but Implicit VR Little Endian was negotiated",
        )
    if not ts.is_implicit_VR and not explicit:
        raise Rejected(
            Status.CANNOT_UNDERSTAND,
            f"the data set is not encoded in explicit VR as transfer syntax {ts.name} requires "
            f"(found bytes {vr!r} where a VR belongs)",
        )


def _locate_pixel_data(fp: BinaryIO, ts: UID, offset: int, file_size: int) -> tuple[int, int, int] | None:
    """``(tag, length, value offset)`` of a Pixel Data element starting at ``offset``, if there is one."""
    if offset + 8 > file_size:
        return None
    fp.seek(offset)
    head = fp.read(12)
    end = ">" if ts == ExplicitVRBigEndian else "<"
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = (group << 16) | elem
    if tag not in PIXEL_TAGS:
        return None
    if ts == ImplicitVRLittleEndian:
        return tag, struct.unpack("<L", head[4:8])[0], offset + 8
    if head[4:6] in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
        return tag, struct.unpack(end + "L", head[8:12])[0], offset + 12
    return tag, struct.unpack(end + "H", head[6:8])[0], offset + 8


def _expected_native_length(h: Header) -> int | None:
    rows, cols, bits = h.int("Rows"), h.int("Columns"), h.int("BitsAllocated")
    if not rows or not cols or not bits:
        return None
    spp = h.int("SamplesPerPixel") or 1
    frames = h.int("NumberOfFrames") or 1
    total_bits = rows * cols * spp * frames * bits
    if h.text("PhotometricInterpretation").startswith("YBR_FULL_422"):
        total_bits = total_bits * 2 // 3
    return (total_bits + 7) // 8


def _check_pixel_data(path: str, h: Header, ts: UID, tag: int, length: int, value_at: int, file_size: int) -> None:
    end = ">" if ts == ExplicitVRBigEndian else "<"
    if length == 0xFFFFFFFF:
        with open(path, "rb") as fp:  # only encapsulated data needs the file: native needs only lengths
            _check_encapsulated(fp, value_at, file_size, end)
        return
    if value_at + length > file_size:
        raise Rejected(
            Status.CANNOT_UNDERSTAND,
            f"Pixel Data says {length} bytes but the data set ends {file_size - value_at} bytes after it starts",
        )
    if tag == 0x7FE00010 and not ts.is_compressed:
        expected = _expected_native_length(h)
        if expected is not None and length < expected:
            raise Rejected(
                Status.CANNOT_UNDERSTAND,
                f"Pixel Data has {length} bytes, but Rows x Columns x Samples x Bits Allocated x Frames "
                f"needs {expected}: the image is truncated",
            )


def _check_encapsulated(fp: BinaryIO, pos: int, file_size: int, end: str) -> None:
    """Walk the fragment items (no data is read) up to the sequence delimiter."""
    fmt = end + "HHL"
    items = 0
    while True:
        if pos + 8 > file_size:
            raise Rejected(
                Status.CANNOT_UNDERSTAND,
                f"encapsulated Pixel Data ends after {items} item(s) without a sequence delimiter",
            )
        fp.seek(pos)
        group, elem, length = struct.unpack(fmt, fp.read(8))
        tag = (group << 16) | elem
        if tag == SEQ_END:
            if items == 0:
                raise Rejected(Status.CANNOT_UNDERSTAND, "encapsulated Pixel Data has no Basic Offset Table item")
            return
        if tag != ITEM:
            raise Rejected(
                Status.CANNOT_UNDERSTAND,
                f"encapsulated Pixel Data item {items} has tag ({group:04X},{elem:04X}) instead of (FFFE,E000)",
            )
        pos += 8 + length
        items += 1


def iter_files(paths: Iterable[Path]) -> list[Path]:
    """The files named, and every file under the folders named, each folder's sorted by path.

    What ``node send``, ``node rules test`` and ``node plugins run`` read from the command line: sorted, so a
    run over the same folders takes the files in the same order. Reads no file (a caller checks them).
    """
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out.extend(sorted(q for q in p.rglob("*") if q.is_file()))
        else:
            out.append(p)
    return out


def is_dicomdir(sop_class: str) -> bool:
    """Whether a file's SOP Class is Media Storage Directory Storage.

    A DICOMDIR indexes the files on a medium; it is not an instance to store (a peer answers 0xA900), so
    ``send`` and ``rules test`` leave it out when they walk a folder copied from a CD.
    """
    return sop_class == MediaStorageDirectoryStorage


def file_checksum(path: Path) -> str:
    """``xxh3_128:<hex>`` of a file on disk: what receiving computes while the bytes arrive (``ReceivedFile``)."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as fp:
        while chunk := fp.read(1 << 20):
            h.update(chunk)
    return f"{CHECKSUM_ALGORITHM}:{h.hexdigest()}"
