"""A slice of a stored instance as a PNG, for the series browser: windowed for people, never for diagnosis.

A SEG is also drawn over its source slice in its segments' colours (:func:`seg_overlay_png`).
"""

from __future__ import annotations

import io
from collections.abc import Callable
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


def _grey(ds: pydicom.Dataset, pixels: np.ndarray) -> np.ndarray:
    """One greyscale frame windowed to 8 bits (a SEG's or a 1-bit frame: 0 .. its highest value)."""
    values = pixels.astype(np.float64)
    if ds.get("Modality") == "SEG" or ds.get("BitsAllocated") == 1:
        lo, hi = 0.0, float(values.max()) or 1.0
    else:
        values = values * float(ds.get("RescaleSlope", 1) or 1) + float(ds.get("RescaleIntercept", 0) or 0)
        lo, hi = _window(ds, values)
    scaled = np.clip((values - lo) / (hi - lo), 0, 1) * 255
    if ds.get("PhotometricInterpretation") == "MONOCHROME1":
        scaled = 255 - scaled
    return scaled.astype(np.uint8)


def _png(img: Image.Image, size: int) -> bytes:
    img.thumbnail((size, size))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


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
        img = Image.fromarray(_grey(ds, pixels), "L")
    return _png(img, size)


#: Segment colours when a SEG recommends none (a colour-blind-safe palette, Okabe-Ito).
_PALETTE = [(230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0), (204, 121, 167)]
#: How much of a segment's colour covers the slice under it.
_ALPHA = 0.5


def _frame_sources(ds: pydicom.Dataset) -> list[str]:
    """Per frame of a SEG, the SOP Instance UID of the source image it was derived from ("" if it names none)."""
    out = []
    for item in ds.get("PerFrameFunctionalGroupsSequence", []):
        try:
            out.append(str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID))
        except (AttributeError, IndexError):
            out.append("")
    return out


def _colour(item: pydicom.Dataset, number: int) -> tuple[int, int, int]:
    """A segment's recommended display colour (CIELab in the SEG), else one of the palette's."""
    lab = item.get("RecommendedDisplayCIELabValue")
    if lab is not None:
        from highdicom.color import CIELabColor

        r, g, b = CIELabColor.from_dicom_value(tuple(int(v) for v in lab)).to_rgb()
        return int(r), int(g), int(b)
    return _PALETTE[(number - 1) % len(_PALETTE)]


def seg_overlay_png(
    seg_path: Path, source_file: Callable[[str], Path], source: str | None = None, size: int = 512
) -> bytes:
    """The SEG at ``seg_path`` drawn in its segments' colours over a source slice, as a PNG.

    The slice is ``source`` (a SOP Instance UID), else the one with the most segmented pixels;
    ``source_file`` finds a source instance's stored file. Frames map to slices by the SEG's own
    references (Derivation Image), so this holds for any slice order and for label map SEGs.
    """
    import highdicom as hd

    try:
        ds = pydicom.dcmread(seg_path)
        seg = hd.seg.Segmentation.from_dataset(ds, copy=False)
        frames = ds.pixel_array.reshape(-1, ds.Rows, ds.Columns)
    except Exception as e:
        raise NoPreview(f"cannot read the segmentation: {type(e).__name__}: {e}") from None
    per_frame = _frame_sources(ds)
    if not any(per_frame):
        raise NoPreview("the segmentation names no source image per frame")
    if source is None:
        counts: dict[str, int] = {}
        for uid, frame in zip(per_frame, frames, strict=False):
            counts[uid] = counts.get(uid, 0) + int(np.count_nonzero(frame))
        source = max((u for u in counts if u), key=lambda u: counts[u])
    elif source not in per_frame:
        raise NoPreview(f"the segmentation has no frame of source instance {source}")
    numbers = list(seg.segment_numbers)
    try:
        masks = seg.get_pixels_by_source_instance([source], segment_numbers=numbers, skip_overlap_checks=True)[0]
    except Exception as e:
        raise NoPreview(f"cannot map the segmentation onto its source: {type(e).__name__}: {e}") from None
    try:
        src = pydicom.dcmread(source_file(source))
        pixels = src.pixel_array
    except (OSError, LookupError) as e:
        raise NoPreview(f"the source slice is not stored here: {e}") from None
    except Exception as e:
        raise NoPreview(f"cannot decode the source slice: {type(e).__name__}: {e}") from None
    if int(src.get("NumberOfFrames", 1) or 1) > 1 or src.get("SamplesPerPixel", 1) != 1:
        raise NoPreview("the source is not a single greyscale slice")
    if pixels.shape != masks.shape[:2]:
        raise NoPreview(f"the segmentation ({masks.shape[:2]}) and its source slice ({pixels.shape}) differ in size")
    rgb = np.repeat(_grey(src, pixels)[..., None], 3, axis=2).astype(np.float64)
    items = {int(i.SegmentNumber): i for i in ds.SegmentSequence}
    for k, number in enumerate(numbers):
        inside = masks[..., k] >= 0.5  # binary: 0/1; fractional: rescaled to 0..1
        colour = np.array(_colour(items[number], number), dtype=np.float64)
        rgb[inside] = (1 - _ALPHA) * rgb[inside] + _ALPHA * colour
    return _png(Image.fromarray(rgb.round().astype(np.uint8), "RGB"), size)
