"""Reading just enough of a received data set to check it and index it.

Pixel data is never decoded or even loaded: we read the header up to
(7FE0,0010) and then walk the Pixel Data element's structure on disk to
prove it is complete (native: long enough for Rows x Columns x frames;
encapsulated: items up to the sequence delimiter). That keeps a 1 GB
multi-frame instance as cheap to check as a small one.
"""

from __future__ import annotations

import struct
import warnings
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.filereader import dcmread
from pydicom.tag import Tag
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ImplicitVRLittleEndian,
)

from node.index.records import InstanceRecord
from node.receive.status import Status

# The node keeps data sets as they arrive; odd values are the sender's
# business, not a reason to refuse or to log a warning per element. What we
# do refuse is logged by us, with the reason.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
warnings.filterwarnings("ignore", category=UserWarning, module=r"pydicom(\..*)?$")

PIXEL_DATA_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}
_ITEM = 0xFFFEE000
_SEQ_DELIM = 0xFFFEE0DD
_VALID_VRS = {
    b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"OB", b"OD",
    b"OF", b"OL", b"OV", b"OW", b"PN", b"SH", b"SL", b"SQ", b"SS", b"ST", b"SV", b"TM", b"UC", b"UI",
    b"UL", b"UN", b"UR", b"US", b"UT", b"UV",
}  # fmt: skip


class Rejected(Exception):
    """The data set cannot be stored; carries the DIMSE status and why."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(slots=True)
class Header:
    dataset: Dataset
    transfer_syntax: UID
    #: Offset of the first data set byte (after the File Meta) in the file.
    dataset_offset: int


def read_header(fp: BinaryIO, transfer_syntax: UID, file_size: int) -> Header:
    """Read the data set up to Pixel Data and check its encoding and pixel structure."""
    try:
        ds = dcmread(fp, stop_before_pixels=True, defer_size=65536)
    except Exception as exc:
        raise Rejected(Status.CANNOT_UNDERSTAND, f"the data set cannot be parsed: {exc}") from None
    _check_complete(ds, file_size)
    meta_len = int(ds.file_meta.get("FileMetaInformationGroupLength", 0))
    dataset_offset = 132 + 12 + meta_len
    pixel_offset = fp.tell()
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        _check_vr_encoding(fp, dataset_offset, transfer_syntax, file_size)
        _check_pixel_data(fp, ds, transfer_syntax, pixel_offset, file_size)
    return Header(ds, transfer_syntax, dataset_offset)


def _check_complete(ds: Dataset, file_size: int) -> None:
    """pydicom accepts a value cut short by the end of the data; we refuse to store one."""
    for elem in ds._dict.values():
        if not isinstance(elem, RawDataElement) or elem.length == 0xFFFFFFFF:
            continue
        short = (
            elem.value_tell + elem.length > file_size
            if elem.value is None
            else len(elem.value) < elem.length
        )
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
    explicit = vr in _VALID_VRS
    if ts.is_implicit_VR and explicit:
        # Two VR-like ASCII letters where a length should be: explicit VR data.
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


def _expected_native_length(ds: Dataset) -> int | None:
    try:
        rows = int(ds.Rows)
        cols = int(ds.Columns)
        bits = int(ds.BitsAllocated)
        spp = int(ds.get("SamplesPerPixel", 1) or 1)
        frames = int(str(ds.get("NumberOfFrames", 1) or 1).strip() or 1)
    except (AttributeError, TypeError, ValueError):
        return None
    total_bits = rows * cols * spp * frames * bits
    if str(ds.get("PhotometricInterpretation", "")).startswith("YBR_FULL_422"):
        total_bits = total_bits * 2 // 3
    return (total_bits + 7) // 8


def _check_pixel_data(fp: BinaryIO, ds: Dataset, ts: UID, offset: int, file_size: int) -> None:
    if offset + 8 > file_size:
        return  # no Pixel Data element
    fp.seek(offset)
    head = fp.read(12)
    little = ts != ExplicitVRBigEndian
    end = "<" if little else ">"
    group, elem = struct.unpack(end + "HH", head[:4])
    tag = (group << 16) | elem
    if tag not in PIXEL_DATA_TAGS:
        return  # stopped before something else (e.g. trailing padding)
    if ts == ImplicitVRLittleEndian:
        (length,) = struct.unpack("<L", head[4:8])
        value_at = offset + 8
    else:
        vr = head[4:6]
        if vr in (b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"UN"):
            (length,) = struct.unpack(end + "L", head[8:12])
            value_at = offset + 12
        else:
            (length,) = struct.unpack(end + "H", head[6:8])
            value_at = offset + 8
    if length == 0xFFFFFFFF:
        _check_encapsulated(fp, value_at, file_size, end)
        return
    if value_at + length > file_size:
        raise Rejected(
            Status.CANNOT_UNDERSTAND,
            f"Pixel Data says {length} bytes but the data set ends {file_size - value_at} bytes after it starts",
        )
    if tag == 0x7FE00010 and not ts.is_compressed:
        expected = _expected_native_length(ds)
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


# --- extraction ---------------------------------------------------------------
#
# pydicom converts a value through its VR machinery on first access, which
# costs ~20-40 us per element; the index needs ~35 of them per instance. The
# header elements are still RawDataElements after ``dcmread``, so for plain
# ASCII values we decode the bytes directly and only hand anything else
# (non-ASCII text in a declared character set, binary VRs) to pydicom.

_BINARY_INT = {"US": (2, False), "SS": (2, True), "UL": (4, False), "SL": (4, True)}


class _Values:
    def __init__(self, ds: Dataset) -> None:
        self.ds = ds
        self.little = not (ds.file_meta.get("TransferSyntaxUID") == ExplicitVRBigEndian)

    def _raw(self, keyword: str) -> tuple[Any, str | None]:
        tag = _TAGS[keyword]
        elem = self.ds._dict.get(tag)
        if elem is None:
            return None, None
        if isinstance(elem, RawDataElement) and elem.value is not None:
            return elem.value, elem.VR or _VRS[keyword]
        try:
            return self.ds[tag].value, "converted"
        except Exception:  # an unreadable value is indexed as missing, the bytes are kept
            return None, None

    def text(self, keyword: str, limit: int) -> str:
        v, vr = self._raw(keyword)
        if v is None:
            return ""
        if isinstance(v, bytes):
            if vr in _BINARY_INT:
                return str(self.int(keyword) or "")
            try:
                return v.decode("ascii").strip(" \x00")[:limit]
            except UnicodeDecodeError:
                try:
                    v = self.ds[_TAGS[keyword]].value  # decoded with Specific Character Set
                except Exception:
                    return v.decode("latin-1").strip(" \x00")[:limit]
        if isinstance(v, (MultiValue, list, tuple)):
            return "\\".join(str(x) for x in v)[:limit]
        return str(v).strip()[:limit]

    def int(self, keyword: str) -> int | None:
        v, vr = self._raw(keyword)
        if v is None:
            return None
        if isinstance(v, bytes) and vr in _BINARY_INT:
            size, signed = _BINARY_INT[vr]
            if len(v) < size:
                return None
            return int.from_bytes(v[:size], "little" if self.little else "big", signed=signed)
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        s = s.split("\\")[0].strip(" \x00")
        try:
            return int(float(s))
        except ValueError:
            return None

    def float(self, keyword: str) -> float | None:
        v, _vr = self._raw(keyword)
        if v is None:
            return None
        s = v.decode("ascii", "replace") if isinstance(v, bytes) else str(v)
        try:
            return float(s.split("\\")[0].strip(" \x00"))
        except ValueError:
            return None


_KEYWORDS = (
    "PatientID", "IssuerOfPatientID", "PatientName", "PatientBirthDate", "PatientSex",
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
    "BodyPartExamined", "ProtocolName", "Manufacturer", "StationName", "FrameOfReferenceUID",
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "AcquisitionNumber", "ImageType", "Rows",
    "Columns", "NumberOfFrames", "BitsAllocated", "PhotometricInterpretation", "ImagePositionPatient",
    "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "SliceLocation",
)  # fmt: skip
_TAGS = {k: Tag(tag_for_keyword(k)) for k in _KEYWORDS}
_VRS = {k: dictionary_VR(_TAGS[k]) for k in _KEYWORDS}


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
    v = _Values(header.dataset)
    _text, _int, _float = v.text, v.int, v.float
    return InstanceRecord(
        patient={
            "patient_id": _text("PatientID", 128),
            "issuer_of_patient_id": _text("IssuerOfPatientID", 128),
            "patient_name": _text("PatientName", 512),
            "birth_date": _text("PatientBirthDate", 16),
            "sex": _text("PatientSex", 16),
        },
        study={
            "study_instance_uid": _text("StudyInstanceUID", 128),
            "study_date": _text("StudyDate", 16),
            "study_time": _text("StudyTime", 32),
            "accession_number": _text("AccessionNumber", 64),
            "study_id": _text("StudyID", 64),
            "study_description": _text("StudyDescription", 512),
            "referring_physician_name": _text("ReferringPhysicianName", 512),
        },
        series={
            "series_instance_uid": _text("SeriesInstanceUID", 128),
            "modality": _text("Modality", 16),
            "series_number": _int("SeriesNumber"),
            "series_description": _text("SeriesDescription", 512),
            "body_part_examined": _text("BodyPartExamined", 64),
            "protocol_name": _text("ProtocolName", 512),
            "manufacturer": _text("Manufacturer", 128),
            "station_name": _text("StationName", 64),
            "frame_of_reference_uid": _text("FrameOfReferenceUID", 128),
        },
        instance={
            "sop_instance_uid": _text("SOPInstanceUID", 128),
            "sop_class_uid": _text("SOPClassUID", 128),
            "transfer_syntax_uid": str(header.transfer_syntax),
            "instance_number": _int("InstanceNumber"),
            "acquisition_number": _int("AcquisitionNumber"),
            "image_type": _text("ImageType", 256),
            "rows": _int("Rows"),
            "columns": _int("Columns"),
            "number_of_frames": _int("NumberOfFrames"),
            "bits_allocated": _int("BitsAllocated"),
            "photometric_interpretation": _text("PhotometricInterpretation", 32),
            "image_position_patient": _text("ImagePositionPatient", 256),
            "image_orientation_patient": _text("ImageOrientationPatient", 512),
            "pixel_spacing": _text("PixelSpacing", 128),
            "slice_thickness": _float("SliceThickness"),
            "slice_location": _float("SliceLocation"),
            "file_path": file_path,
            "file_size": file_size,
            "checksum": checksum,
            "calling_ae": calling_ae[:16],
            "called_ae": called_ae[:16],
            "peer_address": peer_address[:64],
            "association_id": association_id,
        },
    )
