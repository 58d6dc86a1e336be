"""WADO-RS from the stored files: instances as stored, metadata, frames and rendered images (PS3.18 10.4).

Instances go out byte for byte as the node stored them (its File Meta, then the data set as received):
no transcoding, so a client asking for one specific other transfer syntax gets 406 with what there is.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_modality_lut, apply_voi_lut
from pydicom.uid import UID

from node.dicom.multipart import Body, Part
from node.index.query import InstanceRef

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


def wanted_syntaxes(accept: str, part_type: str = "application/dicom") -> set[str] | None:
    """The transfer syntaxes an Accept header allows for ``part_type`` parts; None: any (``*`` or none named).

    ``multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1`` names one;
    several Accept values name several; a value without transfer-syntax, ``*/*`` or no header: any.
    """
    named: set[str] = set()
    for value in accept.split(","):
        fields = [f.strip() for f in value.split(";")]
        media = fields[0].lower()
        params = {}
        for f in fields[1:]:
            if "=" in f:
                k, v = f.split("=", 1)
                params[k.strip().lower()] = v.strip().strip('"')
        if media in ("", "*/*", "multipart/related") and params.get("type", part_type).lower() in (part_type, "*/*"):
            ts = params.get("transfer-syntax", "*")
        elif media == part_type:
            ts = params.get("transfer-syntax", "*")
        else:
            continue
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


def instance_body(files: list[tuple[InstanceRef, Path]]) -> Body:
    """The multipart/related body of stored instances, each part read from its file as it is sent."""
    return Body(
        [Part.of_file(path, f"application/dicom; transfer-syntax={ref.transfer_syntax_uid}") for ref, path in files]
    )


def metadata(ref: InstanceRef, path: Path) -> dict[str, Any]:
    """The DICOM JSON of a stored instance without its pixel data (PS3.18 F.2), with its stored syntax."""
    ds = dcmread(path, stop_before_pixels=True)
    out: dict[str, Any] = ds.to_json_dict(bulk_data_threshold=2**31)
    out["00083002"] = {"vr": "UI", "Value": [ref.transfer_syntax_uid]}  # AvailableTransferSyntaxUID
    return out


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


def frames(path: Path, numbers: list[int]) -> tuple[str, list[bytes]]:
    """The frames' bytes as stored (native: raw pixels; encapsulated: the compressed frame) and their media type."""
    ds = dcmread(path)
    ts = UID(str(ds.file_meta.TransferSyntaxUID))
    total = _frame_count(ds)
    beyond = [n for n in numbers if n > total]
    if beyond:
        raise NotFound(f"frame {beyond[0]} does not exist: the instance has {total} frame(s)")
    if "PixelData" not in ds:
        raise NotFound("the instance has no Pixel Data (7FE0,0010): it has no frames")
    if ts.is_encapsulated:
        all_frames = list(generate_frames(ds.PixelData, number_of_frames=total))
        media = FRAME_MEDIA.get(ts, "application/octet-stream")
        return f"{media}; transfer-syntax={ts}", [all_frames[n - 1] for n in numbers]
    size = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1)) * int(ds.BitsAllocated) // 8
    data: bytes = ds.PixelData
    return "application/octet-stream; transfer-syntax=" + str(ts), [data[(n - 1) * size : n * size] for n in numbers]


def rendered_type(accept: str) -> str:
    """image/png (the default) or image/jpeg, as the Accept header prefers; NotAcceptable otherwise."""
    if not accept.strip():
        return "image/png"
    for value in accept.split(","):
        media = value.split(";")[0].strip().lower()
        if media in ("image/png", "image/jpeg"):
            return media
        if media in ("*/*", "image/*"):
            return "image/png"
    raise NotAcceptable(f"rendered images are image/png or image/jpeg, not {accept}")


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
    """One frame as an 8-bit image, windowed as the data set says (VOI LUT / Window) or as ``window`` asks."""
    ds = dcmread(path)
    total = _frame_count(ds)
    if frame > total:
        raise NotFound(f"frame {frame} does not exist: the instance has {total} frame(s)")
    if "PixelData" not in ds:
        raise NotFound("the instance has no Pixel Data (7FE0,0010): there is nothing to render")
    pixels = ds.pixel_array
    if total > 1:
        pixels = pixels[frame - 1]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    if int(ds.get("SamplesPerPixel", 1)) == 1:
        values = apply_modality_lut(pixels, ds).astype(np.float64)
        if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
            window = _first(ds.WindowCenter), _first(ds.WindowWidth)
        if window is not None and window[1] > 0:
            center, width = window
            low, high = center - width / 2, center + width / 2
        else:
            if "VOILUTSequence" in ds:
                values = apply_voi_lut(values, ds).astype(np.float64)
            low, high = float(values.min()), float(values.max())
        span = high - low if high > low else 1.0
        image = np.clip((values - low) / span * 255.0, 0, 255).astype(np.uint8)
        if photometric == "MONOCHROME1":
            image = 255 - image
        picture = Image.fromarray(image)
    else:  # pydicom gives YBR colour data as RGB already
        rgb = pixels.astype(np.float64)
        top = float(2 ** int(ds.get("BitsStored", 8)) - 1)
        picture = Image.fromarray(np.clip(rgb / top * 255.0, 0, 255).astype(np.uint8))
    out = io.BytesIO()
    if media == "image/jpeg":
        picture.save(out, format="JPEG", quality=quality)
    else:
        picture.save(out, format="PNG")
    return out.getvalue()
