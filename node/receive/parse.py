"""Reading just enough of a received data set to check it and index it.

Pixel data is never decoded or even loaded: we read the header up to
(7FE0,0010) and then walk the Pixel Data element's structure on disk to
prove it is complete (native: long enough for Rows x Columns x frames;
encapsulated: items up to the sequence delimiter). That keeps a 1 GB
multi-frame instance as cheap to check as a small one.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, BinaryIO

from pydicom import config as pydicom_config
from pydicom.dataset import Dataset
from pydicom.filereader import dcmread
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
# business, not a reason to refuse or to log a warning per element.
pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE

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
    meta_len = int(ds.file_meta.get("FileMetaInformationGroupLength", 0))
    dataset_offset = 132 + 12 + meta_len
    pixel_offset = fp.tell()
    if transfer_syntax != DeflatedExplicitVRLittleEndian:
        _check_vr_encoding(fp, dataset_offset, transfer_syntax, file_size)
        _check_pixel_data(fp, ds, transfer_syntax, pixel_offset, file_size)
    return Header(ds, transfer_syntax, dataset_offset)


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


def _value(ds: Dataset, keyword: str) -> Any:
    try:
        return ds.get(keyword)
    except Exception:  # an unreadable value is indexed as missing, the bytes are kept
        return None


def _text(ds: Dataset, keyword: str, limit: int) -> str:
    v = _value(ds, keyword)
    if v is None:
        return ""
    if isinstance(v, MultiValue):
        s = "\\".join(str(x) for x in v)
    else:
        s = str(v)
    return s.strip()[:limit]


def _int(ds: Dataset, keyword: str) -> int | None:
    v = _value(ds, keyword)
    if v is None or v == "":
        return None
    try:
        return int(float(str(v).strip()))
    except (TypeError, ValueError):
        return None


def _float(ds: Dataset, keyword: str) -> float | None:
    v = _value(ds, keyword)
    if v is None or v == "":
        return None
    try:
        return float(str(v).strip())
    except (TypeError, ValueError):
        return None


def _ds_list(ds: Dataset, keyword: str, limit: int) -> str:
    v = _value(ds, keyword)
    if v is None:
        return ""
    if isinstance(v, (MultiValue, list, tuple)):
        return "\\".join(str(x) for x in v)[:limit]
    return str(v)[:limit]


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
    ds = header.dataset
    return InstanceRecord(
        patient={
            "patient_id": _text(ds, "PatientID", 128),
            "issuer_of_patient_id": _text(ds, "IssuerOfPatientID", 128),
            "patient_name": _text(ds, "PatientName", 512),
            "birth_date": _text(ds, "PatientBirthDate", 16),
            "sex": _text(ds, "PatientSex", 16),
        },
        study={
            "study_instance_uid": _text(ds, "StudyInstanceUID", 128),
            "study_date": _text(ds, "StudyDate", 16),
            "study_time": _text(ds, "StudyTime", 32),
            "accession_number": _text(ds, "AccessionNumber", 64),
            "study_id": _text(ds, "StudyID", 64),
            "study_description": _text(ds, "StudyDescription", 512),
            "referring_physician_name": _text(ds, "ReferringPhysicianName", 512),
        },
        series={
            "series_instance_uid": _text(ds, "SeriesInstanceUID", 128),
            "modality": _text(ds, "Modality", 16),
            "series_number": _int(ds, "SeriesNumber"),
            "series_description": _text(ds, "SeriesDescription", 512),
            "body_part_examined": _text(ds, "BodyPartExamined", 64),
            "protocol_name": _text(ds, "ProtocolName", 512),
            "manufacturer": _text(ds, "Manufacturer", 128),
            "station_name": _text(ds, "StationName", 64),
            "frame_of_reference_uid": _text(ds, "FrameOfReferenceUID", 128),
        },
        instance={
            "sop_instance_uid": _text(ds, "SOPInstanceUID", 128),
            "sop_class_uid": _text(ds, "SOPClassUID", 128),
            "transfer_syntax_uid": str(header.transfer_syntax),
            "instance_number": _int(ds, "InstanceNumber"),
            "acquisition_number": _int(ds, "AcquisitionNumber"),
            "image_type": _text(ds, "ImageType", 256),
            "rows": _int(ds, "Rows"),
            "columns": _int(ds, "Columns"),
            "number_of_frames": _int(ds, "NumberOfFrames"),
            "bits_allocated": _int(ds, "BitsAllocated"),
            "photometric_interpretation": _text(ds, "PhotometricInterpretation", 32),
            "image_position_patient": _ds_list(ds, "ImagePositionPatient", 256),
            "image_orientation_patient": _ds_list(ds, "ImageOrientationPatient", 512),
            "pixel_spacing": _ds_list(ds, "PixelSpacing", 128),
            "slice_thickness": _float(ds, "SliceThickness"),
            "slice_location": _float(ds, "SliceLocation"),
            "file_path": file_path,
            "file_size": file_size,
            "checksum": checksum,
            "calling_ae": calling_ae[:16],
            "called_ae": called_ae[:16],
            "peer_address": peer_address[:64],
            "association_id": association_id,
        },
    )
