"""Where a series' voxels are in the patient: pure functions on positions, orientation and spacing.

Patient coordinates are DICOM's (x towards the patient's left, y posterior, z head, in mm). A series
is a stack of parallel planes: ``orientation`` is the row and column direction cosines (Image
Orientation (Patient)), ``positions`` each slice's Image Position (Patient), ``pixel_spacing`` the
(row spacing, column spacing) of Pixel Spacing. Voxel indices are (slice, row, column): the row index
runs along the column direction, the column index along the row direction.

The stack is not necessarily a regular grid: a tilted gantry shifts each slice in-plane ("sheared"),
and dropped or irregular slices make the spacing uneven. Every slice's position is exact, though, so
:class:`SliceFrame` expresses each slice's place in the series' own orthogonal frame, and a plugin
that measures or projects can work in patient space.

These functions take arrays, not a series, so a plugin (and the node) can use them on any geometry;
:class:`dicom_node_sdk.SeriesInput` answers its ``normal``, ``spacing``, ``affine``,
``spacing_is_uniform`` and ``frame()`` with them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

#: Row and column direction cosines: ((x, y, z), (x, y, z)).
Orientation = tuple[tuple[float, float, float], tuple[float, float, float]]

#: Slice origins closer than this (mm) to a regular, unsheared grid count as on it (decimal strings in
#: Image Position Patient carry about 1e-5 mm of rounding).
REGULAR_TOLERANCE_MM = 1e-3

#: Slices are evenly spaced when every distance is within this fraction (or 0.01 mm) of the first.
UNIFORM_RTOL = 0.01


def normal(orientation: Orientation) -> np.ndarray:
    """The slice normal, row direction x column direction (slices are sorted along it)."""
    return np.cross(np.asarray(orientation[0], dtype=float), np.asarray(orientation[1], dtype=float))


def slice_distances(positions: np.ndarray, orientation: Orientation) -> np.ndarray:
    """The distances (mm) between neighbouring slices along the normal, signed, (slices - 1,)."""
    return np.diff(np.asarray(positions, dtype=float) @ normal(orientation))


def slice_spacing(positions: np.ndarray | None, orientation: Orientation | None) -> float:
    """The median distance (mm) between neighbouring slices along the normal; NaN for fewer than two slices."""
    if positions is None or orientation is None or len(positions) < 2:
        return float("nan")
    return float(np.median(np.abs(slice_distances(positions, orientation))))


def spacing(
    positions: np.ndarray | None, orientation: Orientation | None, pixel_spacing: tuple[float, float] | None
) -> tuple[float, float, float] | None:
    """(slice, row, column) spacing in mm, the slice spacing the median (NaN without positions); None without
    Pixel Spacing."""
    if pixel_spacing is None:
        return None
    return (slice_spacing(positions, orientation), float(pixel_spacing[0]), float(pixel_spacing[1]))


def spacing_is_uniform(positions: np.ndarray | None, orientation: Orientation | None) -> bool:
    """Whether the slices are evenly spaced (within 1%, or 0.01 mm); fewer than three slices always are."""
    if positions is None or orientation is None or len(positions) < 3:
        return True
    d = slice_distances(positions, orientation)
    return bool(np.allclose(d, d[0], rtol=UNIFORM_RTOL, atol=0.01))


def affine(
    positions: np.ndarray | None, orientation: Orientation | None, pixel_spacing: tuple[float, float] | None
) -> np.ndarray | None:
    """4x4 matrix from (slice, row, column) voxel indices to patient coordinates (mm); None without geometry.

    The slice column is the average step from the first to the last slice: exact only when the
    slices are evenly spaced and not sheared (use ``positions[k]`` otherwise, or :class:`SliceFrame`).
    """
    if orientation is None or pixel_spacing is None or positions is None:
        return None
    row_dir, col_dir = np.asarray(orientation[0], dtype=float), np.asarray(orientation[1], dtype=float)
    dr, dc = pixel_spacing
    a = np.eye(4)
    # index (k, i, j): column index j moves along the row direction, row index i along the column direction
    a[:3, 2] = row_dir * dc
    a[:3, 1] = col_dir * dr
    if len(positions) > 1:
        a[:3, 0] = (positions[-1] - positions[0]) / (len(positions) - 1)
    else:
        a[:3, 0] = normal(orientation)
    a[:3, 3] = positions[0]
    return a


def axis_directions(orientation: Orientation) -> np.ndarray:
    """Unit patient-space directions of the volume axes (slice, row, column), one per row of a 3x3 array.

    The slice index runs along the normal, the row index along the column direction and the column
    index along the row direction.
    """
    row_dir, col_dir = (np.asarray(v, dtype=float) for v in orientation)
    d = np.array([np.cross(row_dir, col_dir), col_dir, row_dir])
    unit: np.ndarray = d / np.linalg.norm(d, axis=1, keepdims=True)
    return unit


def patient_axes(directions: np.ndarray) -> tuple[int, int, int]:
    """For each volume axis, the patient axis (0 x, 1 y, 2 z) it is matched to (the most parallel overall)."""
    best = max(itertools.permutations(range(3)), key=lambda p: sum(abs(directions[a, p[a]]) for a in range(3)))
    return (best[0], best[1], best[2])


def patient_orientation(cosines: Sequence[float], *, nearest: bool = False) -> tuple[str, str] | None:
    """DICOM Patient Orientation (e.g. ("L", "P")) of six row and column direction cosines; None if not six numbers.

    As PS3.3 C.7.6.1.1.1 writes it: the letters of each direction's significant components, largest
    first (an oblique row may be "LP"); ``nearest`` keeps only the first letter.
    """
    try:
        v = [float(x) for x in cosines]
    except (TypeError, ValueError):
        return None
    if len(v) != 6:
        return None

    def letters(d: list[float]) -> str:
        names = (("L", "R"), ("P", "A"), ("H", "F"))
        order = sorted(range(3), key=lambda k: -abs(d[k]))
        found = "".join(names[k][0 if d[k] > 0 else 1] for k in order if abs(d[k]) > 0.1)
        return (found or names[order[0]][0 if d[order[0]] > 0 else 1])[: 1 if nearest else 3]

    return letters(v[:3]), letters(v[3:])


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


def slice_frame(positions: np.ndarray, orientation: Orientation, pixel_spacing: tuple[float, float]) -> SliceFrame:
    """The :class:`SliceFrame` of slices at ``positions`` (sorted along the normal) with this orientation and spacing."""
    row, column = (np.asarray(v, dtype=float) for v in orientation)
    row, column = row / np.linalg.norm(row), column / np.linalg.norm(column)
    n = np.cross(row, column)
    n /= np.linalg.norm(n)
    p = np.asarray(positions, dtype=float)
    rel = p - p[0]
    return SliceFrame(
        origin=p[0],
        normal=n,
        column=column,
        row=row,
        depth=rel @ n,
        shift=np.stack([rel @ column, rel @ row], axis=1),
        pixel_spacing=(float(pixel_spacing[0]), float(pixel_spacing[1])),
    )


def slab_thickness(positions: np.ndarray, orientation: Orientation, single: float | None = None) -> np.ndarray:
    """Each slice's thickness (mm) along the normal, (slices,): the slab from halfway to one neighbour to
    halfway to the other.

    Why per slice: with uneven spacing (dropped or irregular slices) the slab a slice stands for is as
    thick as the gaps around it, not the median spacing; measured along the normal, not between the
    positions, so a tilted gantry's in-plane shift does not count. The first and last slices reach
    half their only gap outward, so an evenly spaced series gives every slice the spacing. Slices may
    come in any order. ``single`` is the thickness of a lone slice (e.g. Slice Thickness): one slice
    has no neighbour to measure against (ValueError without it).
    """
    p = np.asarray(positions, dtype=float).reshape(-1, 3)
    if len(p) < 2:
        if single is None or not np.isfinite(single) or single <= 0:
            raise ValueError("one slice has no neighbour to measure its thickness: give its thickness (single)")
        return np.full(len(p), float(single))
    depth = p @ (normal(orientation) / np.linalg.norm(normal(orientation)))
    order = np.argsort(depth, kind="stable")
    gaps = np.diff(depth[order])
    # the slab of sorted slice k reaches halfway to k-1 and halfway to k+1; the ends mirror their one gap
    sorted_thickness = (np.concatenate([gaps[:1], gaps]) + np.concatenate([gaps, gaps[-1:]])) / 2
    thickness: np.ndarray = np.empty_like(sorted_thickness)
    thickness[order] = sorted_thickness
    return thickness


def voxel_volumes(
    positions: np.ndarray, orientation: Orientation, pixel_spacing: tuple[float, float], single: float | None = None
) -> np.ndarray:
    """The volume (mm³) of one voxel of each slice, (slices,): pixel area times the slab thickness along the normal.

    A tilted gantry's voxel is a sheared prism (a parallelepiped leaning along the tilt): its volume is
    its base, the pixel, times its height along the normal, whatever the lean. See :func:`slab_thickness`.
    """
    return float(pixel_spacing[0]) * float(pixel_spacing[1]) * slab_thickness(positions, orientation, single)


def segment_volume_ml(
    mask: np.ndarray,
    positions: np.ndarray,
    orientation: Orientation,
    pixel_spacing: tuple[float, float],
    single: float | None = None,
) -> float:
    """The volume (ml) of a mask (slices, rows, columns), each voxel counted with its slice's :func:`voxel_volumes`.

    Non-zero counts as inside (threshold fractional masks first). ``positions`` are the slices' Image
    Position (Patient), in the mask's slice order.
    """
    m = np.asarray(mask)
    if m.ndim != 3 or m.shape[0] != len(positions):
        raise ValueError(f"mask must be (slices, rows, columns) with one slice per position; got shape {m.shape}")
    per_slice = np.count_nonzero(m.reshape(m.shape[0], -1), axis=1)
    return float(per_slice @ voxel_volumes(positions, orientation, pixel_spacing, single)) / 1000.0


@dataclass(frozen=True)
class Grid:
    """The planes of an affine's grid: per-slice positions, the row/column directions, spacing and thickness."""

    #: (slices, 3) each plane's origin (the centre of voxel (k, 0, 0)), mm.
    positions: np.ndarray
    #: Image Orientation (Patient): the row direction, then the column direction (6 cosines).
    orientation: list[float]
    #: (row spacing, column spacing), mm.
    pixel_spacing: tuple[float, float]
    #: The distance between planes along their normal (1.0 for one plane), mm.
    thickness: float


def grid_from_affine(matrix: np.ndarray, slices: int) -> Grid:
    """The planes of a (slice, row, column) -> patient affine with ``slices`` slices.

    Raises ValueError saying what is wrong when the affine is not an image grid: not a finite 4x4
    matrix, an axis of zero length, or row and column axes that are not perpendicular.
    """
    a = np.asarray(matrix, dtype=np.float64)
    if a.shape != (4, 4) or not np.all(np.isfinite(a)):
        raise ValueError(f"must be a finite 4x4 matrix, not {_describe(a)}")
    step, col_vec, row_vec = a[:3, 0], a[:3, 1], a[:3, 2]
    dr, dc, dz = (float(np.linalg.norm(v)) for v in (col_vec, row_vec, step))
    if min(dr, dc) < 1e-6 or (slices > 1 and dz < 1e-6):
        which = [name for name, d in (("slice", dz), ("row", dr), ("column", dc)) if d < 1e-6]
        raise ValueError(
            f"has a zero-length {' and '.join(which)} axis (columns 0, 1, 2 are the slice, row and column steps in mm)"
        )
    row_dir, col_dir = row_vec / dc, col_vec / dr
    if abs(float(row_dir @ col_dir)) > 1e-4:
        raise ValueError(
            "has row and column axes that are not perpendicular (columns 1 and 2, the row and column steps, "
            "must be at right angles)"
        )
    thickness = abs(float(step @ np.cross(row_dir, col_dir))) if slices > 1 else 1.0
    positions = a[:3, 3] + np.arange(slices)[:, None] * step
    return Grid(positions, [*map(float, row_dir), *map(float, col_dir)], (dr, dc), thickness)


def _describe(a: np.ndarray) -> str:
    return f"shape {a.shape}" if a.shape != (4, 4) else "a matrix with NaN or infinite values"


__all__ = [
    "REGULAR_TOLERANCE_MM",
    "Grid",
    "Orientation",
    "SliceFrame",
    "affine",
    "axis_directions",
    "grid_from_affine",
    "normal",
    "patient_axes",
    "patient_orientation",
    "segment_volume_ml",
    "slice_distances",
    "slice_frame",
    "slice_spacing",
    "spacing",
    "spacing_is_uniform",
    "slab_thickness",
    "voxel_volumes",
]
