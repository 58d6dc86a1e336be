"""Where a series' voxels really are: its own orthogonal frame, and the slices' places in it.

A series is a stack of parallel planes, but not necessarily a regular grid: a tilted gantry shifts
each slice in-plane ("sheared"), and dropped or irregular slices make the spacing uneven. Treating
the (slice, row, column) indices as an orthogonal grid with the median spacing then misplaces voxels
by millimetres. Every slice's position (Image Position Patient) is exact, though, so each voxel
centre is known exactly: slice origin + row index x column direction x row spacing + column index x
row direction x column spacing. This module expresses that in the series' own orthogonal frame
(slice normal, column direction, row direction), which the built-in ``distance-map`` and ``mip-sc``
plugins compute in.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from node.plugins.api import PluginError, SeriesInput

#: Slice origins closer than this (mm) to a regular, unsheared grid count as on it (decimal strings in
#: Image Position Patient carry about 1e-5 mm of rounding).
REGULAR_TOLERANCE_MM = 1e-3


@dataclass(frozen=True)
class SliceFrame:
    """A series' orthogonal frame and each slice's origin in it.

    The frame's axes are the slice normal (row x column direction), the column direction (along
    which the row index runs) and the row direction (along which the column index runs), all unit
    vectors in patient coordinates. Voxel (k, i, j) is at ``depth[k]`` along the normal and at
    ``shift[k] + (i * row_spacing, j * column_spacing)`` along (column, row) direction, relative to
    the first slice's origin.
    """

    origin: np.ndarray
    normal: np.ndarray
    column: np.ndarray
    row: np.ndarray
    #: (slices,) each slice's origin along the normal, mm, increasing.
    depth: np.ndarray
    #: (slices, 2) each slice's origin along (column direction, row direction), mm: non-zero when sheared.
    shift: np.ndarray
    #: (row spacing, column spacing), mm: Pixel Spacing.
    pixel_spacing: tuple[float, float]

    @property
    def slice_spacing(self) -> float:
        """The median distance between neighbouring slices along the normal (NaN for one slice)."""
        return float(np.median(np.diff(self.depth))) if len(self.depth) > 1 else float("nan")

    @property
    def sheared(self) -> bool:
        """Whether slices are shifted in-plane against each other (a tilted gantry)."""
        return bool(np.abs(self.shift).max() > REGULAR_TOLERANCE_MM)

    @property
    def uneven(self) -> bool:
        """Whether the distance between slices varies."""
        if len(self.depth) < 3:
            return False
        regular = self.depth[0] + self.slice_spacing * np.arange(len(self.depth))
        return bool(np.abs(self.depth - regular).max() > REGULAR_TOLERANCE_MM)

    @property
    def regular(self) -> bool:
        """Whether (slice, row, column) indices times the spacing are the voxels' true places."""
        return not self.sheared and not self.uneven

    def positions(self, k: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
        """Patient coordinates (n, 3), mm, of the centres of voxels (k, i, j)."""
        dr, dc = self.pixel_spacing
        c = self.shift[k, 0] + i * dr
        r = self.shift[k, 1] + j * dc
        return self.origin + np.outer(self.depth[k], self.normal) + np.outer(c, self.column) + np.outer(r, self.row)


def slice_frame(series: SeriesInput, purpose: str) -> SliceFrame:
    """The series' :class:`SliceFrame`; a PluginError naming what is missing for ``purpose`` otherwise."""
    if series.orientation is None or series.positions is None:
        raise PluginError(f"{purpose} needs Image Orientation (Patient) and Image Position (Patient) on every slice")
    if series.pixel_spacing is None:
        raise PluginError(f"{purpose} needs Pixel Spacing")
    row, column = (np.asarray(v, dtype=float) for v in series.orientation)
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    normal = np.cross(row, column)
    normal /= np.linalg.norm(normal)
    rel = np.asarray(series.positions, dtype=float) - series.positions[0]
    return SliceFrame(
        origin=np.asarray(series.positions[0], dtype=float),
        normal=normal,
        column=column,
        row=row,
        depth=rel @ normal,
        shift=np.stack([rel @ column, rel @ row], axis=1),
        pixel_spacing=(float(series.pixel_spacing[0]), float(series.pixel_spacing[1])),
    )


def orthogonal_volume(frame: SliceFrame, volume: np.ndarray, fill: float) -> tuple[np.ndarray, float]:
    """``volume`` (slices, rows, cols) resampled onto a regular grid of the frame's axes; and its slice spacing.

    Why: a projection or a filter on the index grid of a sheared or unevenly spaced series shows
    the anatomy distorted (a tilted gantry's slices shift by up to a millimetre each). The grid
    keeps the pixel spacing in-plane and spans every slice's shifted extent (voxels no slice
    covers get ``fill``), and has the median slice spacing along the normal. Each slice is moved
    to its true in-plane place (linear interpolation), and planes between slices are linear
    blends of the two nearest slices along the normal. A regular series is returned as it is.
    """
    dz = frame.slice_spacing
    if frame.regular or not np.isfinite(dz):
        return volume, dz
    dr, dc = frame.pixel_spacing
    lo = frame.shift.min(axis=0)
    extent = frame.shift.max(axis=0) - lo
    shape = (volume.shape[1] + int(round(extent[0] / dr)), volume.shape[2] + int(round(extent[1] / dc)))
    moved = np.empty((len(volume), *shape), np.float32)
    for k in range(len(volume)):
        offset = -(frame.shift[k] - lo) / (dr, dc)  # output pixel o shows input pixel o + offset
        ndimage.affine_transform(
            volume[k].astype(np.float32),
            np.ones(2),
            offset=offset,
            output_shape=shape,
            output=moved[k],
            order=1,
            mode="constant",
            cval=fill,
        )
    count = int(round((frame.depth[-1] - frame.depth[0]) / dz)) + 1
    at = np.interp(frame.depth[0] + dz * np.arange(count), frame.depth, np.arange(len(frame.depth)))
    k0 = np.minimum(np.floor(at).astype(int), len(volume) - 2)
    w = (at - k0).astype(np.float32)[:, None, None]
    return moved[k0] * (1 - w) + moved[k0 + 1] * w, dz
