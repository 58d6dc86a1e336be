"""A slice of a stored instance as a PNG, for the series browser: windowed for people, never for diagnosis."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image


class NoPreview(ValueError):
    pass


def _window(ds: pydicom.Dataset, values: np.ndarray) -> tuple[float, float]:
    centre, width = ds.get("WindowCenter"), ds.get("WindowWidth")
    if centre is not None and width is not None:
        c = float(centre[0] if isinstance(centre, pydicom.multival.MultiValue) else centre)
        w = float(width[0] if isinstance(width, pydicom.multival.MultiValue) else width)
        if w > 0:
            return c - w / 2, c + w / 2
    lo, hi = np.percentile(values, [1, 99]) if values.size else (0.0, 1.0)
    return float(lo), float(hi) if hi > lo else float(lo) + 1


def render_png(path: Path, frame: int | None = None, size: int = 512) -> bytes:
    """The middle frame (or ``frame``) of the instance at ``path``, windowed to 8 bits, at most ``size`` px."""
    try:
        ds = pydicom.dcmread(path)
        pixels = ds.pixel_array
    except Exception as e:
        raise NoPreview(f"cannot decode the image: {type(e).__name__}: {e}") from None
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    rgb = ds.get("SamplesPerPixel", 1) == 3
    if frames > 1:
        pixels = pixels[frames // 2 if frame is None else max(0, min(frame, frames - 1))]
    if rgb:
        if ds.get("PhotometricInterpretation", "").startswith("YBR"):
            from pydicom.pixels.processing import convert_color_space

            pixels = convert_color_space(pixels, ds.PhotometricInterpretation, "RGB")
        img = Image.fromarray(np.asarray(pixels, dtype=np.uint8), "RGB")
    else:
        values = pixels.astype(np.float64)
        if ds.get("Modality") == "SEG" or ds.get("BitsAllocated") == 1:
            lo, hi = 0.0, float(values.max()) or 1.0
        else:
            values = values * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
            lo, hi = _window(ds, values)
        scaled = np.clip((values - lo) / (hi - lo), 0, 1) * 255
        if ds.get("PhotometricInterpretation") == "MONOCHROME1":
            scaled = 255 - scaled
        img = Image.fromarray(scaled.astype(np.uint8), "L")
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()
