"""distance-map and mip-sc on series whose index grid is not their geometry: real tilted and sheared CTs.

- A 58-slice Philips head CT with a 16.5 degree gantry tilt (each slice shifted 0.71 mm in-plane
  against the previous one), the same with slices dropped (spacing 1 to 3 steps), and the real head
  CT sheared by 20 degrees (1.8 mm per slice), made by ``tests/helpers/variants.py``.
- distance-map is compared with the exact physical distance from each sampled voxel centre to the
  nearest voxel centre on the other side of the bone surface, computed from each slice's Image
  Position (Patient) with a KD tree, or by brute force within a ball.
- mip-sc gets a thin rod burnt into the real tilted CT along the slice normal: on a geometry-correct
  grid it projects to a dot along the normal and to a straight line across the slices, at the
  length it has; on the index grid it would drift 1.75 pixels per slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from scipy.spatial import cKDTree

from node.plugins.api import Segment, Segmentation, SeriesInput, codes
from node.plugins.builtin.distance import distance_map
from node.plugins.builtin.mip import mip_sc
from node.plugins.geometry import SliceFrame, slice_frame
from node.plugins.series import load_series
from tests.helpers import variants

BONE_HU = 300.0
#: Inside the bone every voxel is within this of the outside (the skull is thinner); checked, not assumed.
INSIDE_BALL_MM = 12.0
SAMPLES = 1000


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("geometry")


def series_of(folder: Path, source: str, *changes: str) -> SeriesInput:
    return load_series(variants.write(variants.make(source, *changes), folder / "-".join((source, *changes))))


def sample(where: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, ...]:
    idx = np.nonzero(where)
    pick = rng.choice(len(idx[0]), min(SAMPLES, len(idx[0])), replace=False)
    return tuple(a[pick] for a in idx)


def voxel_centres(series: SeriesInput, k: np.ndarray, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Patient coordinates of voxel centres straight from the headers (independent of the plugins' frame)."""
    row, col = np.array(series.orientation[0]), np.array(series.orientation[1])
    dr, dc = series.pixel_spacing
    return series.positions[k] + np.outer(i * dr, col) + np.outer(j * dc, row)


def nearest_within(
    series: SeriesInput, frame: SliceFrame, other: np.ndarray, q: tuple[np.ndarray, ...], radius: float
) -> np.ndarray:
    """Exact distance from each voxel ``q`` to the nearest ``other`` voxel centre, by brute force in a ball.

    Every voxel whose centre can be within ``radius`` is looked at (per slice within ``radius`` along
    the normal, the rows and columns within ``radius`` of the foot); inf if none is.
    """
    dr, dc = series.pixel_spacing
    pts = voxel_centres(series, *q)
    out = np.full(len(pts), np.inf)
    for n, p in enumerate(pts):
        rel = p - series.positions[0]
        best = np.inf
        for k in np.nonzero(np.abs(frame.depth - rel @ frame.normal) <= radius)[0]:
            c = (rel @ frame.column - frame.shift[k, 0]) / dr
            r = (rel @ frame.row - frame.shift[k, 1]) / dc
            i0, i1 = max(0, int(np.floor(c - radius / dr))), min(other.shape[1], int(np.ceil(c + radius / dr)) + 1)
            j0, j1 = max(0, int(np.floor(r - radius / dc))), min(other.shape[2], int(np.ceil(r + radius / dc)) + 1)
            ii, jj = np.nonzero(other[k, i0:i1, j0:j1])
            if len(ii):
                d = np.linalg.norm(voxel_centres(series, np.full(len(ii), k), ii + i0, jj + j0) - p, axis=1)
                best = min(best, float(d.min()))
        out[n] = best if best <= radius else np.inf
    return out


def bone_segmentation(series: SeriesInput) -> tuple[np.ndarray, Segmentation]:
    bone = series.rescaled() >= BONE_HU
    return bone, Segmentation(bone, [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone)])


@pytest.mark.parametrize(
    "source", [("ct-tilted",), ("ct-tilted", "uneven"), ("ct-head", "sheared")], ids=lambda s: "-".join(s)
)
def test_distance_map_is_the_physical_distance(folder: Path, source: tuple[str, ...]) -> None:
    series = series_of(folder, *source)
    frame = slice_frame(series, "test")
    assert frame.sheared and (frame.uneven == ("uneven" in source))
    bone, seg = bone_segmentation(series)
    series.previous = [seg]
    values = distance_map.run(series, distance_map.params()).values
    assert values.shape == bone.shape
    assert (values[bone] <= 0).all() and (values[~bone] > 0).all()

    rng = np.random.default_rng(13)
    tolerance = 0.5 * min(frame.slice_spacing, *series.pixel_spacing)  # half the smallest voxel dimension
    # outside: the exact distance to the nearest bone voxel centre (a KD tree over all of them)
    q = sample(~bone, rng)
    truth = cKDTree(voxel_centres(series, *np.nonzero(bone))).query(voxel_centres(series, *q))[0]
    err_out = np.abs(values[q] - truth)
    # inside: the exact distance to the nearest voxel centre outside, by brute force in a ball
    q = sample(bone, rng)
    truth = nearest_within(series, frame, ~bone, q, INSIDE_BALL_MM)
    assert np.isfinite(truth).all(), "a bone voxel is farther than the ball from the outside: enlarge it"
    err_in = np.abs(-values[q] - truth)
    for name, err in (("outside", err_out), ("inside", err_in)):
        assert np.percentile(err, 95) <= tolerance and err.max() <= tolerance, (
            f"{name}: p95 {np.percentile(err, 95):.3f} mm, max {err.max():.3f} mm > {tolerance:.3f} mm"
        )


def test_distance_map_of_a_regular_series_is_exact(folder: Path) -> None:
    """The real head CT as it is (no shear, even slices): exact distances, as the orthogonal transform gives."""
    series = series_of(folder, "ct-head")
    assert slice_frame(series, "test").regular
    bone, seg = bone_segmentation(series)
    series.previous = [seg]
    values = distance_map.run(series, distance_map.params()).values
    q = sample(~bone, np.random.default_rng(5))
    truth = cKDTree(voxel_centres(series, *np.nonzero(bone))).query(voxel_centres(series, *q))[0]
    assert np.abs(values[q] - truth).max() <= 1e-3


# -- mip-sc --------------------------------------------------------------------------------------------------

ROD_STORED = 4000  # far above any tissue or bone of the real CT (stored values up to ~1800)
ROD_HALF_WIDTH = 1.0  # pixels either side of the rod's axis


def with_rod(source: tuple[str, ...], folder: Path) -> tuple[SeriesInput, float]:
    """The series with a thin rod burnt in along its slice normal, through the middle of the field; its length (mm)."""
    dsets = variants.make(*source)
    series = load_series(variants.write(dsets, folder / ("rod-" + "-".join(source))))
    frame = slice_frame(series, "test")
    dr, dc = series.pixel_spacing
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    # the rod's axis, in the frame's in-plane coordinates (mm from the first slice's origin)
    axis_c, axis_r = rows / 2 * dr + frame.shift[:, 0].mean(), cols / 2 * dc + frame.shift[:, 1].mean()
    for k, path in enumerate(series.files):
        full = pydicom.dcmread(path)
        arr = full.pixel_array.copy()
        ic, jc = (axis_c - frame.shift[k, 0]) / dr, (axis_r - frame.shift[k, 1]) / dc
        i, j = np.ogrid[:rows, :cols]
        arr[(np.abs(i - ic) <= ROD_HALF_WIDTH) & (np.abs(j - jc) <= ROD_HALF_WIDTH)] = ROD_STORED
        full.PixelData = arr.tobytes()
        full.save_as(path)
    return load_series(series.files), float(frame.depth[-1] - frame.depth[0])


def bright(image: np.ndarray) -> np.ndarray:
    return image[0] == 255


@pytest.mark.parametrize(
    "source", [("ct-tilted",), ("ct-tilted", "uneven"), ("ct-head", "sheared")], ids=lambda s: "-".join(s)
)
def test_mip_of_a_sheared_series_is_geometry_correct(folder: Path, source: tuple[str, ...]) -> None:
    series, length = with_rod(source, folder)
    dz = slice_frame(series, "test").slice_spacing
    hu = ROD_STORED * float(series.first.RescaleSlope) + float(series.first.RescaleIntercept)
    axial, coronal, sagittal = (r for r in mip_sc.run(series, mip_sc.params(window_center=hu - 300, window_width=200)))
    # along the normal: a dot the rod's width (3 pixels), not a streak of 1.75 pixels per slice
    rows, cols = np.nonzero(bright(axial.pixels))
    assert len(rows) and np.ptp(rows) <= 3 and np.ptp(cols) <= 3, (np.ptp(rows), np.ptp(cols))
    # across the slices: straight and as long as the rod (along the normal), in the images' own spacing
    for view in (coronal, sagittal):
        lit = bright(view.pixels)
        on = np.nonzero(lit.any(axis=1))[0]
        centre = np.array([np.nonzero(lit[r])[0].mean() for r in on])
        assert np.ptp(centre) <= 2, f"{view.description}: the rod drifts {np.ptp(centre):.1f} pixels"
        # rows are cells: the rod's centres span ``length``, its slices one slice spacing more
        spacing_v = view.pixel_spacing[0]
        assert abs((np.ptp(on) + 1) * spacing_v - (length + dz)) <= 2 * spacing_v, (np.ptp(on), spacing_v, length)
    # the images say what they show: the tilted CT's frame is turned 16.5 degrees about the patient's x axis
    tilted = source[0] == "ct-tilted"
    assert [v.patient_orientation for v in (axial, coronal, sagittal)] == (
        [("L", "PH"), ("L", "FP"), ("PH", "FP")] if tilted else [("L", "P"), ("L", "F"), ("P", "F")]
    )


def test_mip_of_a_regular_series_is_the_index_grid_projection(folder: Path) -> None:
    """The real head CT as it is: the projections are the plain maxima over the index grid, as before."""
    series = series_of(folder, "ct-head")
    (axial,) = mip_sc.run(series, mip_sc.params(views=["axial"], window_center=300, window_width=1500))
    hu = series.rescaled().max(axis=0)
    grey = np.rint(np.clip((hu - (300 - 750)) * 255 / 1500, 0, 255))
    assert np.abs(axial.pixels[0].astype(int) - grey).max() <= 1
