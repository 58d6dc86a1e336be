"""``overlay-sc``: a segmentation drawn in colour on the windowed source slices, as RGB Secondary Capture.

The "CT with annotation" pictures for a PACS or viewer that does not display
SEG. The segmentation is the last :class:`Segmentation` an earlier plugin of
the same job returned (``series.previous``), so the plugin runs in a chain
after a segmentation plugin, e.g.
``plugins = [{ name = "threshold-seg" }, { name = "overlay-sc" }]``;
that plugin's SEG is an output of the job as well.

For each chosen slice (all, or those with any segment; then every n-th):

1. **Window.** The rescaled values (HU for CT) map linearly to grey,
   ``clip((v - (center - width / 2)) / width, 0, 1) * 255``, rounded. Without
   a given window: CT 40/400 (soft tissue), otherwise the first image's
   Window Center/Width, otherwise the 0.5th to 99.5th percentile of the series.
2. **Colour.** Segments are painted in order (later ones on top) in their
   colour, or the node's SEG palette colour for their number, so the pictures
   match the SEG's display colours. ``filled`` blends every pixel of the mask,
   ``out = (1 - opacity) * grey + opacity * colour``; ``outline`` paints the
   inner boundary of the mask in the slice (pixels of the mask with a
   4-neighbour outside it, ``outline_px`` wide) in full colour; ``both`` does
   both. Colour thus appears only on pixels of the mask, except in the legend.
3. **Legend.** A black box with a colour swatch and the label (in capitals,
   from a 5x7 bitmap font embedded below) for each drawn segment, scaled with
   the image (1 pixel per font dot up to 383 pixels, 2 from 384, ...). It goes
   in the corner that covers the fewest segmented pixels over the chosen
   slices (top left on a tie), the same corner in every picture.

Fractional masks count where they are at least 0.5 (``Segmentation.segment_masks``).
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.multival import MultiValue
from scipy import ndimage

from node.plugins.api import Images, PluginError, Segmentation, SeriesInput, plugin
from node.plugins.builtin.body_parts import Values, values_of

#: Default windows (center, width) by modality.
DEFAULT_WINDOWS = {"CT": (40.0, 400.0)}

#: A 5x7 bitmap font: seven rows per glyph, top to bottom, five bits each (16 = leftmost), as hex pairs.
FONT_5X7 = {
    "A": "0e11111f111111",
    "B": "1e11111e11111e",
    "C": "0e11101010110e",
    "D": "1c12111111121c",
    "E": "1f10101e10101f",
    "F": "1f10101e101010",
    "G": "0e11101711110f",
    "H": "1111111f111111",
    "I": "0e04040404040e",
    "J": "0702020202120c",
    "K": "11121418141211",
    "L": "1010101010101f",
    "M": "111b1515111111",
    "N": "11111915131111",
    "O": "0e11111111110e",
    "P": "1e11111e101010",
    "Q": "0e11111115120d",
    "R": "1e11111e141211",
    "S": "0f10100e01011e",
    "T": "1f040404040404",
    "U": "1111111111110e",
    "V": "11111111110a04",
    "W": "1111111515150a",
    "X": "11110a040a1111",
    "Y": "1111110a040404",
    "Z": "1f01020408101f",
    "0": "0e11131519110e",
    "1": "040c040404040e",
    "2": "0e11010204081f",
    "3": "1f02040201110e",
    "4": "02060a121f0202",
    "5": "1f101e0101110e",
    "6": "0608101e11110e",
    "7": "1f010204080808",
    "8": "0e11110e11110e",
    "9": "0e11110f01020c",
    " ": "00000000000000",
    "-": "0000001f000000",
    "_": "0000000000001f",
    ".": "00000000000c0c",
    ",": "000000000c0408",
    ":": "000c0c000c0c00",
    "/": "00010204081000",
    "(": "02040808080402",
    ")": "08040202020408",
    "+": "0004041f040400",
    "%": "18190204081303",
    "#": "0a0a1f0a1f0a0a",
    "?": "0e110102040004",
    "'": "0c040800000000",
    "=": "00001f001f0000",
    "*": "0004150e150400",
    ">": "08040201020408",
    "<": "02040810080402",
    "!": "04040404040004",
    "&": "0c12140815120d",
}


def _glyph(code: str) -> np.ndarray:
    rows = [int(code[i : i + 2], 16) for i in range(0, 14, 2)]
    return np.array([[(r >> (4 - b)) & 1 for b in range(5)] for r in rows], dtype=bool)


GLYPHS = {c: _glyph(code) for c, code in FONT_5X7.items()}


def text_bitmap(text: str, scale: int = 1) -> np.ndarray:
    """``text`` in the 5x7 font (lower case as capitals, unknown characters as "?"), one dot = scale x scale."""
    if not text:
        return np.zeros((7 * scale, 0), dtype=bool)
    cols = []
    for i, ch in enumerate(text.upper()):
        if i:
            cols.append(np.zeros((7, 1), dtype=bool))
        cols.append(GLYPHS.get(ch, GLYPHS["?"]))
    bitmap = np.hstack(cols)
    return np.kron(bitmap, np.ones((scale, scale), dtype=bool)).astype(bool)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Window (rescaled values, HU for CT); by default CT 40/400, else the image's window or the value range.
    window_center: float | None = None
    window_width: float | None = Field(None, gt=0)
    #: How much colour a filled mask pixel gets (0: none, 1: only colour).
    opacity: float = Field(0.4, ge=0, le=1)
    style: Literal["filled", "outline", "both"] = "filled"
    #: Width of the outline in pixels.
    outline_px: int = Field(1, ge=1, le=20)
    #: Which slices: all, or those where any drawn segment has a pixel ...
    slices: Literal["all", "segmented"] = "segmented"
    #: ... and of those, every n-th (the first, the (n+1)-th, ...).
    every: int = Field(1, ge=1)
    #: Labels of the segments to draw (default all), e.g. ["Lungs"].
    segments: list[str] | None = Field(None, min_length=1)
    legend: bool = True


def window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Rescaled values to grey in [0, 255] (float): linear over [center - width/2, center + width/2], clipped."""
    lo = center - width / 2.0
    return np.clip((values - lo) * (255.0 / width), 0.0, 255.0)


def _first(value: object) -> float | None:
    """The first value of a (possibly multi-valued) DS element as a float, or None."""
    if isinstance(value, (MultiValue, list, tuple)):
        value = value[0] if len(value) else None
    try:
        # A pydicom value (DSfloat, IS, str or bytes): float() reads each, or raises what is caught below.
        return float(value) if value not in (None, "") else None  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None


def default_window(
    series: SeriesInput, values: Values, defaults: dict[str, tuple[float, float]]
) -> tuple[float, float]:
    """The window for ``series``: the modality's default, else the first image's, else the value range."""
    if series.modality in defaults:
        return defaults[series.modality]
    c, w = _first(series.first.get("WindowCenter")), _first(series.first.get("WindowWidth"))
    if c is not None and w is not None and w > 0:
        return c, w
    # percentiles of the stored values, rescaled (the rescale is increasing and linear)
    lo, hi = (float(x) * values.slope + values.intercept for x in np.percentile(values.array, [0.5, 99.5]))
    return (lo + hi) / 2.0, max(hi - lo, 1e-6)


def resolve_window(
    series: SeriesInput,
    values: Values,
    center: float | None,
    width: float | None,
    defaults: dict[str, tuple[float, float]],
) -> tuple[float, float]:
    """The given window, with a missing center or width taken from :func:`default_window`."""
    if center is not None and width is not None:
        return center, width
    c, w = default_window(series, values, defaults)
    return (c if center is None else center), (w if width is None else width)


def stacked_masks(seg: Segmentation, shape: tuple[int, int, int]) -> np.ndarray:
    """The segmentation's masks as booleans of shape (slices, rows, cols, segments), one per described segment."""
    k = len(seg.segments)
    if k == 0:
        raise PluginError("the previous segmentation has no segments")
    masks = seg.segment_masks()
    if masks.shape != (*shape, k):
        raise PluginError(
            f"the previous segmentation's masks have shape {np.shape(seg.masks)}, which does not fit the series "
            f"{shape} with {k} segment(s)"
        )
    return masks


def segment_colors(seg: Segmentation) -> list[tuple[int, int, int]]:
    """Each segment's colour, or the one the node's SEG gives it (so overlay and SEG agree)."""
    from node.derive.seg import PALETTE

    return [s.color or PALETTE[i % len(PALETTE)] for i, s in enumerate(seg.segments)]


def inner_boundary(mask: np.ndarray, width: int) -> np.ndarray:
    """Pixels of a 2-D mask within ``width`` 4-neighbour steps of a pixel outside it (the image edge is outside)."""
    boundary: np.ndarray = mask & ~ndimage.binary_erosion(mask, iterations=width, border_value=0)
    return boundary


def legend_layout(labels: list[str], scale: int) -> tuple[int, int, list[tuple[int, int, np.ndarray]]]:
    """The legend's size (h, w) and, per label, the (row, col) of its swatch and the text bitmap."""
    pad, line, swatch, gap = 3 * scale, 10 * scale, 7 * scale, 4 * scale
    texts = [text_bitmap(label[:32], scale) for label in labels]
    width = pad + swatch + gap + max(t.shape[1] for t in texts) + pad
    height = pad + line * len(labels) - 3 * scale + pad
    return height, width, [(pad + i * line, pad, t) for i, t in enumerate(texts)]


def choose_corner(occupied: np.ndarray, h: int, w: int) -> tuple[int, int]:
    """Top-left (row, col) of the corner box of size (h, w) covering the fewest occupied pixels."""
    rows, cols = occupied.shape
    h, w = min(h, rows), min(w, cols)
    corners = [(0, 0), (0, cols - w), (rows - h, 0), (rows - h, cols - w)]
    counts = [int(occupied[r : r + h, c : c + w].sum()) for r, c in corners]
    return corners[int(np.argmin(counts))]


def draw_legend(
    rgb: np.ndarray,
    at: tuple[int, int],
    layout: tuple[int, int, list[tuple[int, int, np.ndarray]]],
    colors: list[tuple[int, int, int]],
) -> None:
    """Paints the legend into ``rgb`` (rows, cols, 3) with its top-left corner at ``at``, clipped to the image."""
    h, w, items = layout
    r0, c0 = at
    rows, cols = rgb.shape[:2]

    def paint(r: int, c: int, mask: np.ndarray, color: tuple[int, int, int]) -> None:
        r, c = r0 + r, c0 + c
        if r >= rows or c >= cols:
            return
        m = mask[: rows - r, : cols - c]
        rgb[r : r + m.shape[0], c : c + m.shape[1]][m] = color

    paint(0, 0, np.ones((h, w), dtype=bool), (0, 0, 0))
    for (r, c, text), color in zip(items, colors, strict=True):
        s = text.shape[0]  # 7 * scale: the swatch is as high as the text
        paint(r, c, np.ones((s, s), dtype=bool), color)
        paint(r, c + s + (s * 4) // 7, text, (255, 255, 255))


@plugin(name="overlay-sc", version="1.0", params=Params)
def overlay_sc(series: SeriesInput, params: Params) -> list[Images]:
    """The previous plugin's segmentation in colour on the windowed slices, as RGB Secondary Capture."""
    seg = next((r for r in reversed(series.previous) if isinstance(r, Segmentation)), None)
    if seg is None:
        raise PluginError(
            "overlay-sc draws the segmentation of an earlier plugin in the same job, and there is "
            'none: chain it after a segmentation plugin, e.g. plugins = [{ name = "threshold-seg" }, '
            '{ name = "overlay-sc" }]'
        )
    values = values_of(series)
    if values.array.ndim != 3:
        raise PluginError("overlay-sc takes grey images (one sample per pixel)")
    masks = stacked_masks(seg, values.array.shape)
    colors = segment_colors(seg)
    labels = [s.label for s in seg.segments]
    chosen = list(range(len(labels)))
    if params.segments is not None:
        unknown = [x for x in params.segments if x not in labels]
        if unknown:
            raise PluginError(f"segments {unknown} are not in the segmentation; it has {labels}")
        chosen = [i for i, x in enumerate(labels) if x in params.segments]
    masks = masks[..., chosen]
    colors = [colors[i] for i in chosen]
    labels = [labels[i] for i in chosen]

    any_mask = np.asarray(masks.any(axis=-1))
    if params.slices == "segmented":
        indices = [int(k) for k in np.nonzero(any_mask.any(axis=(1, 2)))[0]]
    else:
        indices = list(range(len(values.array)))
    indices = indices[:: params.every]
    if not indices:
        return []

    center, width = resolve_window(series, values, params.window_center, params.window_width, DEFAULT_WINDOWS)
    rows, cols = values.array.shape[1:]
    scale = 1 + min(rows, cols) // 384
    layout = legend_layout(labels, scale) if params.legend else None
    corner = choose_corner(np.asarray(any_mask[indices].any(axis=0)), layout[0], layout[1]) if layout else (0, 0)

    out = np.empty((len(indices), rows, cols, 3), dtype=np.uint8)
    a = params.opacity
    for n, k in enumerate(indices):
        img = np.repeat(window(values.rescaled(values.array[k]), center, width)[..., None], 3, axis=-1)
        for i, color in enumerate(colors):
            m = masks[k, :, :, i]
            if not m.any():
                continue
            c = np.array(color, dtype=np.float64)
            if params.style in ("filled", "both"):
                img[m] = (1.0 - a) * img[m] + a * c
            if params.style in ("outline", "both"):
                img[inner_boundary(m, params.outline_px)] = c
        px = np.rint(img).astype(np.uint8)
        if layout:
            draw_legend(px, corner, layout, colors)
        out[n] = px
    description = f"{seg.description or 'segmentation'} overlay"[:64]
    return [Images(out, source_slices=indices, description=description)]
