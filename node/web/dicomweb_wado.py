"""WADO-RS from the stored files: instances as stored, metadata, frames and rendered images (PS3.18 10.4).

Instances go out byte for byte as the node stored them (its File Meta, then the data set as received):
no transcoding, so a client asking for one specific other transfer syntax gets 406 with what there is.
Nothing here holds more than one instance's header, one frame or one rendered image in memory: frames
are read at their offset in the file, rendered images decode the one frame they show, and metadata is
written one instance at a time.
"""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID
from python_multipart.multipart import parse_options_header

from node.dicom.multipart import Body, Part
from node.index.query import InstanceRef

log = logging.getLogger(__name__)

#: Binary values (OB, OW, UN, ...) longer than this are left out of metadata (PDFs, overlays, private
#: blobs): the node serves no bulk data URIs, and inlined they would make a series' metadata megabytes.
BULK_DATA_THRESHOLD = 4096
#: A frame with more pixels than this (Rows x Columns x Samples per Pixel) is not rendered: 64 Mpixel,
#: far beyond any image a dashboard shows, and decoding it would cost gigabytes.
MAX_RENDER_PIXELS = 64 * 1024 * 1024
_LEFT_OUT = "left out"

#: The media type of a frame in an encapsulated transfer syntax (PS3.18 Table 8.7.3-2).
FRAME_MEDIA: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "image/jpeg",
    "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg",
    "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls",
    "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2",
    "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc",
    "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
    "1.2.840.10008.1.2.5": "image/dicom-rle",
}


class NotAcceptable(ValueError):
    """The client asked for a representation the node does not make (HTTP 406)."""


class NotFound(LookupError):
    """No such frame (HTTP 404)."""


class TooLarge(ValueError):
    """An image too large to render (HTTP 413)."""


# --- Accept ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MediaRange:
    """One media range of an Accept header: ``multipart/related; type="application/dicom"; transfer-syntax=*``."""

    media: str
    params: dict[str, str]
    q: float = 1.0

    def allows(self, media: str) -> bool:
        """Whether this range names ``media`` (exactly, ``type/*`` or ``*/*``)."""
        return _matches(self.media, media)


def _matches(pattern: str, media: str) -> bool:
    if pattern in ("*/*", "*", media):
        return True
    major, _, minor = pattern.partition("/")
    return minor == "*" and media.split("/")[0] == major


def parse_accept(accept: str) -> list[MediaRange]:
    """The media ranges of an Accept header, most preferred first (q=0 left out); [] for none.

    The one Accept parser of DICOMweb: names and media types in lower case, parameter values unquoted.
    """
    ranges: list[MediaRange] = []
    for value in accept.split(","):
        if not value.strip():
            continue
        media, raw = parse_options_header(value.strip())
        params = {k.decode("latin-1").lower(): v.decode("latin-1").strip() for k, v in raw.items()}
        try:
            q = float(params.pop("q", "1"))
        except ValueError:
            q = 1.0
        if q > 0:
            ranges.append(MediaRange(media.decode("latin-1").strip().lower(), params, q))
    ranges.sort(key=lambda r: -r.q)  # stable: equal preferences keep the client's order
    return ranges


def negotiate(accept: str, offered: Sequence[str]) -> str:
    """The first of ``offered`` (the node's preference) the client's most preferred range allows.

    No Accept header: ``offered[0]``. NotAcceptable names what is offered.
    """
    if not accept.strip():
        return offered[0]
    for r in parse_accept(accept):
        for media in offered:
            if r.allows(media):
                return media
    raise NotAcceptable(f"this resource is {' or '.join(offered)}, not {accept}")


def _part_type(r: MediaRange) -> str:
    """The media type of the parts a range asks for: ``type=`` of multipart/related, else the range itself."""
    if r.media == "multipart/related":
        return r.params.get("type", "*/*").lower()
    return r.media


def wanted_syntaxes(accept: str, part_type: str = "application/dicom") -> set[str] | None:
    """The transfer syntaxes an Accept header allows for ``part_type`` parts; None: any (``*`` or none named).

    ``multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1`` names one;
    several Accept values name several; a value without transfer-syntax, ``*/*`` or no header: any (PS3.18
    8.7.3 makes a missing transfer-syntax mean Explicit VR Little Endian; the node answers as stored).
    """
    named: set[str] = set()
    for r in parse_accept(accept):
        if not _matches(_part_type(r), part_type):
            continue
        ts = r.params.get("transfer-syntax", "*")
        if ts == "*":
            return None
        named.add(ts)
    return named or None


def check_syntaxes(refs: list[InstanceRef], accept: str) -> None:
    """406 unless every instance is stored in a syntax the client accepts (the node does not transcode)."""
    wanted = wanted_syntaxes(accept)
    if wanted is None:
        return
    other = sorted({r.transfer_syntax_uid for r in refs} - wanted)
    if other:
        raise NotAcceptable(
            f"the instances are stored in {', '.join(other)} and this node does not transcode: ask for "
            f'transfer-syntax=* (or one of those), e.g. Accept: multipart/related; type="application/dicom"; '
            "transfer-syntax=*"
        )


def check_frame_type(accept: str, ts: UID) -> None:
    """406 unless the Accept header allows the frames as stored in ``ts`` (the node does not transcode).

    Native frames are application/octet-stream. Compressed frames are their syntax's media type (image/jp2,
    ...); application/octet-stream allows them only with ``transfer-syntax=*`` or that syntax: without it, it
    asks for uncompressed Explicit VR Little Endian pixels (PS3.18 8.7.3), which the node does not make.
    """
    if not accept.strip():
        return
    stored = FRAME_MEDIA.get(ts, "application/octet-stream") if ts.is_encapsulated else "application/octet-stream"
    for r in parse_accept(accept):
        kind = _part_type(r)
        syntax = r.params.get("transfer-syntax")
        if not ts.is_encapsulated:
            if _matches(kind, "application/octet-stream"):
                return
        elif _matches(kind, stored) and syntax in (None, "*", ts) and kind != "application/octet-stream":
            return
        elif _matches(kind, "application/octet-stream") and syntax in ("*", ts):
            return
    raise NotAcceptable(
        f"the frames are stored as {stored} ({ts}) and this node does not transcode: ask for "
        f'Accept: multipart/related; type="{stored}"'
        + ("" if stored == "application/octet-stream" else ', or type="application/octet-stream"; transfer-syntax=*')
    )


# --- instances and metadata ------------------------------------------------------------------------


def instance_body(files: list[tuple[InstanceRef, Path]]) -> Body:
    """The multipart/related body of stored instances, each part read from its file as it is sent."""
    return Body(
        [Part.of_file(path, f"application/dicom; transfer-syntax={ref.transfer_syntax_uid}") for ref, path in files]
    )


def _drop_bulk(item: dict[str, Any]) -> None:
    for key in [k for k, v in item.items() if v.get("BulkDataURI") == _LEFT_OUT]:
        del item[key]
    for value in item.values():
        if value.get("vr") == "SQ":
            for nested in value.get("Value", []):
                _drop_bulk(nested)


def metadata(ref: InstanceRef, path: Path) -> dict[str, Any]:
    """The DICOM JSON of a stored instance (PS3.18 F.2) with its stored syntax, without its bulk data.

    Pixel Data and binary values over BULK_DATA_THRESHOLD are left out; a value pydicom cannot convert
    (e.g. a DS that is not a number) is left out with a warning instead of failing the whole answer.
    """
    ds = dcmread(path, stop_before_pixels=True)

    def left_out(_elem: DataElement) -> str:
        return _LEFT_OUT

    out: dict[str, Any] = ds.to_json_dict(
        bulk_data_threshold=BULK_DATA_THRESHOLD, bulk_data_element_handler=left_out, suppress_invalid_tags=True
    )
    _drop_bulk(out)
    out["00083002"] = {"vr": "UI", "Value": [ref.transfer_syntax_uid]}  # AvailableTransferSyntaxUID
    return out


def metadata_json(files: list[tuple[InstanceRef, Path]]) -> Iterator[bytes]:
    """A JSON array of the instances' metadata, one instance read at a time as the answer is sent.

    An instance whose file cannot be read is left out and logged (the answer has begun: it cannot become
    an error any more).
    """
    yield b"["
    first = True
    for ref, path in files:
        try:
            item = json.dumps(metadata(ref, path), ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except Exception:
            log.exception("WADO-RS metadata: %s (%s) cannot be read; it is left out", ref.sop_instance_uid, path)
            continue
        yield (b"" if first else b",") + item.encode()
        first = False
    yield b"]"


# --- frames ----------------------------------------------------------------------------------------


def parse_frames(text: str) -> list[int]:
    """``1,3,5`` -> [1, 3, 5]; ValueError says what is wrong."""
    try:
        numbers = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise ValueError(f"frame numbers are whole numbers separated by commas, not {text!r}") from None
    if not numbers or min(numbers) < 1:
        raise ValueError(f"frame numbers start at 1: {text!r}")
    return numbers


def _frame_count(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def _header(path: Path, numbers: list[int]) -> tuple[Dataset, int]:
    """The data set with its large values (Pixel Data) left on disk, and its frame count; checks ``numbers``."""
    ds = dcmread(path, defer_size=1024)
    total = _frame_count(ds)
    beyond = [n for n in numbers if n > total]
    if beyond:
        raise NotFound(f"frame {beyond[0]} does not exist: the instance has {total} frame(s)")
    if "PixelData" not in ds:
        raise NotFound("the instance has no Pixel Data (7FE0,0010): it has no frames")
    return ds, total


def frames(path: Path, numbers: list[int]) -> tuple[str, list[bytes]]:
    """The frames' bytes as stored (native: raw pixels; encapsulated: the compressed frame) and their media type.

    Only the asked frames are read: native ones at their offset in the file, encapsulated ones through
    the Basic (or Extended) Offset Table, or by walking the fragments' headers when there is none.
    """
    ds, total = _header(path, numbers)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    raw: object = ds.get_item(0x7FE00010, keep_deferred=True)  # a RawDataElement while deferred
    at: int | None = raw.value_tell if isinstance(raw, RawDataElement) and raw.value is None else None
    if ts.is_deflated or at is None:  # no file offset to seek to: read the value (rare)
        data: bytes = ds.PixelData
        source: Any = io.BytesIO(data)
        at = 0
    else:
        source = path.open("rb")
    with source as f:
        if ts.is_encapsulated:
            extended = None
            if "ExtendedOffsetTable" in ds and "ExtendedOffsetTableLengths" in ds:
                extended = (ds.ExtendedOffsetTable, ds.ExtendedOffsetTableLengths)
            out = []
            for n in numbers:
                f.seek(at)
                out.append(get_frame(f, n - 1, number_of_frames=total, extended_offsets=extended))
            media = FRAME_MEDIA.get(ts, "application/octet-stream")
            return f"{media}; transfer-syntax={ts}", out
        size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
        out = []
        for n in numbers:
            f.seek(at + (n - 1) * size)
            out.append(f.read(size))
    return "application/octet-stream; transfer-syntax=" + str(ts), out


# --- rendered --------------------------------------------------------------------------------------


def rendered_type(accept: str) -> str:
    """image/png (the default) or image/jpeg, as the Accept header prefers; NotAcceptable otherwise."""
    return negotiate(accept, ["image/png", "image/jpeg"])


def parse_window(text: str) -> tuple[float, float] | None:
    """``window=center,width[,function]`` (PS3.18 8.3.5.1.4; only the linear function)."""
    if not text:
        return None
    fields = [f.strip() for f in text.split(",")]
    try:
        center, width = float(fields[0]), float(fields[1])
    except (ValueError, IndexError):
        raise ValueError(f"window is center,width[,linear], not {text!r}") from None
    if len(fields) > 2 and fields[2].lower() != "linear":
        raise ValueError(f"only the linear window function is supported, not {fields[2]!r}")
    if width <= 0:
        raise ValueError(f"the window width must be positive, not {width}")
    return center, width


def _first(value: Any) -> float:
    """The first of a multi-valued Window Center/Width (the data set's default window)."""
    return float(value[0] if isinstance(value, MultiValue) else value)


def render(path: Path, frame: int, media: str, window: tuple[float, float] | None, quality: int = 90) -> bytes:
    """One frame as an 8-bit image, windowed as the data set says (VOI LUT / Window) or as ``window`` asks.

    Only that frame is decoded (pydicom reads it alone from the file), in float32.
    """
    ds, _total = _header(path, [frame])
    pixels_in_frame = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1))
    if pixels_in_frame > MAX_RENDER_PIXELS:
        raise TooLarge(
            f"a frame of {int(ds.Rows)} x {int(ds.Columns)} pixels is more than this node renders "
            f"({MAX_RENDER_PIXELS // 2**20} Mpixel): retrieve it with .../frames/{frame} instead"
        )
    pixels = pixel_array(path, index=frame - 1)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        if "ModalityLUTSequence" in ds:
            values = apply_modality_lut(pixels, ds).astype(np.float32, copy=False)
        else:
            values = pixels.astype(np.float32)
            slope, intercept = float(ds.get("RescaleSlope", 1) or 1), float(ds.get("RescaleIntercept", 0) or 0)
            if slope != 1:
                values *= slope
            if intercept:
                values += intercept
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if window is not None and window[1] > 0:
            center, width = window
            low, high = center - width / 2, center + width / 2
        else:
            if "VOILUTSequence" in ds:
                values = apply_voi_lut(values, ds).astype(np.float32, copy=False)
            low, high = float(values.min()), float(values.max())
        span = high - low if high > low else 1.0
        values -= low
        values *= 255.0 / span
        image = np.clip(values, 0, 255).astype(np.uint8)
        if photometric == "MONOCHROME1":
            image = 255 - image
        picture = Image.fromarray(image)
    else:  # pydicom gives YBR colour data as RGB already
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        rgb = pixels.astype(np.float32) * np.float32(255.0 / top)
        picture = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    if media == "image/jpeg":
        picture.save(out, format="JPEG", quality=quality)
    else:
        picture.save(out, format="PNG")
    return out.getvalue()
