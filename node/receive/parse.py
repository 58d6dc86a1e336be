"""Reading just enough of a received data set to check it and index it.

Pixel data is never decoded or even loaded: we read the header up to
(7FE0,0010) and then walk the Pixel Data element's structure on disk to
prove it is complete (native: long enough for Rows x Columns x frames;
encapsulated: items up to the sequence delimiter). That keeps a 1 GB
multi-frame instance as cheap to check as a small one.

Two readers sit behind one interface, fastest first: the byte-level walker
in :mod:`node.receive.header`, and pydicom's general reader for what the
walker declines (deflated data sets, unusual structures). Both apply the
same checks, so a file gets the same answer whichever reads it.
"""

from __future__ import annotations

import struct
import warnings
from pathlib import Path
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom.charset import convert_encodings, decode_bytes
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import dcmread, read_file_meta_info
from pydicom.multival import MultiValue
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from node.index.records import InstanceRecord
from node.receive.header import VALID_VRS, HeaderError, RawHeader, read_raw_header
from node.receive.status import Status

# The node keeps data sets as they arrive; odd values are the sender's
# business, not a reason to refuse or to log a warning per element. What we
# do refuse is logged by us, with the reason.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")

_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
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
TAGS = {k: tag_for_keyword(k) for k in KEYWORDS}
_WANTED = frozenset(TAGS.values())
_VRS = {k: dictionary_VR(TAGS[k]).encode() for k in KEYWORDS}


_GROUP2 = (
    "the data set contains File Meta elements (group 0002): readers would take them for the file's own and misread it"
)


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
            try:
                return v.decode("ascii").strip(" \x00")[:limit]
            except UnicodeDecodeError:
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
        elem = self.ds._dict.get(tag)
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
        return _read_with_pydicom(fp, transfer_syntax, file_size, dataset_offset)


def read_file_header(path: Path) -> tuple[Header, int, FileMetaDataset]:
    """A stored DICOM file (File Meta, then the data set): its checked header, size and File Meta.

    For files already on disk (recovery, the node's own outputs); received data sets come through
    :func:`read_header` straight from the association's temp file.
    """
    size = path.stat().st_size
    meta = read_file_meta_info(path)
    ts = UID(str(meta.TransferSyntaxUID))
    # preamble (128) + "DICM" (4) + the group length element (12) + the rest of group 0002
    header = read_header(str(path), ts, size, 132 + 12 + int(meta.FileMetaInformationGroupLength))
    return header, size, meta


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
    if tag not in (0x7FE00010, 0x7FE00008, 0x7FE00009):
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
        if tag == _SEQ_DELIM:
            if items == 0:
                raise Rejected(Status.CANNOT_UNDERSTAND, "encapsulated Pixel Data has no Basic Offset Table item")
            return
        if tag != _ITEM:
            raise Rejected(
                Status.CANNOT_UNDERSTAND,
                f"encapsulated Pixel Data item {items} has tag ({group:04X},{elem:04X}) instead of (FFFE,E000)",
            )
        pos += 8 + length
        items += 1


def to_record(
    header: Header,
    *,
    file_path: str,
    file_size: int,
    checksum: str,
    calling_ae: str = "",
    called_ae: str = "",
    peer_address: str = "",
    association_id: str = "",
) -> InstanceRecord:
    t, i, f = header.text, header.int, header.float
    return InstanceRecord(
        patient={
            "patient_id": t("PatientID", 128),
            "issuer_of_patient_id": t("IssuerOfPatientID", 128),
            "patient_name": t("PatientName", 512),
            "birth_date": t("PatientBirthDate", 16),
            "sex": t("PatientSex", 16),
        },
        study={
            "study_instance_uid": t("StudyInstanceUID", 128),
            "study_date": t("StudyDate", 16),
            "study_time": t("StudyTime", 32),
            "accession_number": t("AccessionNumber", 64),
            "study_id": t("StudyID", 64),
            "study_description": t("StudyDescription", 512),
            "referring_physician_name": t("ReferringPhysicianName", 512),
        },
        series={
            "series_instance_uid": t("SeriesInstanceUID", 128),
            "modality": t("Modality", 16),
            "series_number": i("SeriesNumber"),
            "series_description": t("SeriesDescription", 512),
            "body_part_examined": t("BodyPartExamined", 64),
            "protocol_name": t("ProtocolName", 512),
            "manufacturer": t("Manufacturer", 128),
            "station_name": t("StationName", 64),
            "frame_of_reference_uid": t("FrameOfReferenceUID", 128),
        },
        instance={
            "sop_instance_uid": t("SOPInstanceUID", 128),
            "sop_class_uid": t("SOPClassUID", 128),
            "transfer_syntax_uid": str(header.transfer_syntax),
            "instance_number": i("InstanceNumber"),
            "acquisition_number": i("AcquisitionNumber"),
            "image_type": t("ImageType", 256),
            "rows": i("Rows"),
            "columns": i("Columns"),
            "number_of_frames": i("NumberOfFrames"),
            "bits_allocated": i("BitsAllocated"),
            "photometric_interpretation": t("PhotometricInterpretation", 32),
            "image_position_patient": t("ImagePositionPatient", 256),
            "image_orientation_patient": t("ImageOrientationPatient", 512),
            "pixel_spacing": t("PixelSpacing", 128),
            "slice_thickness": f("SliceThickness"),
            "slice_location": f("SliceLocation"),
            "file_path": file_path,
            "file_size": file_size,
            "checksum": checksum,
            "calling_ae": calling_ae[:16],
            "called_ae": called_ae[:16],
            "peer_address": peer_address[:64],
            "association_id": association_id,
        },
    )
