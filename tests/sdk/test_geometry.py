"""dicom_node_sdk.geometry on real series (shared data) and on their sheared, tilted and unevenly spaced variants.

Every voxel centre of a series is known exactly from its own slice's Image Position (Patient): the
reference here is ``IPP[k] + i * column direction * row spacing + j * row direction * column spacing``
computed from the headers, against which the SDK's summaries (affine, spacing, SliceFrame) are checked.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dicom_node_sdk import SeriesInput, geometry
from pydicom.dataset import Dataset

from tests.helpers import variants


def _headers(dsets: list[Dataset]) -> tuple[np.ndarray, geometry.Orientation, tuple[float, float]]:
    """Positions (sorted along the normal, as the loader sorts), orientation and pixel spacing of data sets."""
    iop = [float(x) for x in dsets[0].ImageOrientationPatient]
    orientation = ((iop[0], iop[1], iop[2]), (iop[3], iop[4], iop[5]))
    positions = np.array([[float(x) for x in d.ImagePositionPatient] for d in dsets])
    positions = positions[np.argsort(positions @ np.cross(iop[:3], iop[3:]))]
    dr, dc = (float(x) for x in dsets[0].PixelSpacing)
    return positions, orientation, (dr, dc)


def _true_centres(positions: np.ndarray, orientation: geometry.Orientation, spacing: tuple[float, float]) -> tuple:
    """Voxel indices spread over the volume, and their centres straight from each slice's position."""
    rng = np.random.default_rng(0)
    k = rng.integers(0, len(positions), 200)
    i, j = rng.integers(0, 512, 200), rng.integers(0, 512, 200)
    row, col = np.array(orientation[0]), np.array(orientation[1])
    centres = positions[k] + np.outer(i * spacing[0], col) + np.outer(j * spacing[1], row)
    return (k, i, j), centres


def _series(dsets: list[Dataset]) -> SeriesInput:
    positions, orientation, spacing = _headers(dsets)
    return SeriesInput(datasets=dsets, positions=positions, orientation=orientation, pixel_spacing=spacing)


def test_a_regular_axial_ct_is_described_exactly():
    positions, orientation, spacing = _headers(variants.make("ct-head"))
    np.testing.assert_allclose(geometry.normal(orientation), [0, 0, 1])
    dz = geometry.slice_spacing(positions, orientation)
    assert dz == pytest.approx(5.0, abs=0.01)  # the series' 5 mm slices (Slice Thickness 5)
    assert geometry.spacing(positions, orientation, spacing) == (dz, *spacing)
    assert geometry.spacing_is_uniform(positions, orientation)
    (k, i, j), centres = _true_centres(positions, orientation, spacing)
    a = geometry.affine(positions, orientation, spacing)
    assert a is not None
    np.testing.assert_allclose((a @ np.stack([k, i, j, np.ones_like(k)]))[:3].T, centres, atol=1e-3)
    frame = geometry.slice_frame(positions, orientation, spacing)
    assert frame.regular and not frame.sheared and not frame.uneven
    np.testing.assert_allclose(frame.positions(k, i, j), centres, atol=1e-6)
    assert geometry.patient_orientation([*orientation[0], *orientation[1]]) == ("L", "P")
    assert geometry.patient_axes(geometry.axis_directions(orientation)) == (2, 1, 0)  # slices along z


def test_a_sagittal_mr_names_its_directions():
    positions, orientation, spacing = _headers(variants.make("mr-sag"))
    assert abs(geometry.normal(orientation)[0]) == pytest.approx(1.0)  # slices along x
    assert geometry.patient_orientation([*orientation[0], *orientation[1]]) == ("P", "F")
    assert geometry.patient_axes(geometry.axis_directions(orientation)) == (0, 2, 1)
    frame = geometry.slice_frame(positions, orientation, spacing)
    assert frame.regular
    assert np.all(np.diff(frame.depth) > 0)  # sorted along the normal


def test_a_tilted_gantry_ct_is_sheared_by_its_tilt():
    """The real 16.5 degree tilted CT: slices shifted in-plane, each voxel still placed exactly."""
    dsets = variants.make("ct-tilted")
    positions, orientation, spacing = _headers(dsets)
    frame = geometry.slice_frame(positions, orientation, spacing)
    assert frame.sheared and not frame.regular
    step = np.diff(frame.shift[:, 0])[0] / np.diff(frame.depth)[0]
    assert math.degrees(math.atan(abs(step))) == pytest.approx(float(dsets[0].GantryDetectorTilt), abs=0.2)
    (k, i, j), centres = _true_centres(positions, orientation, spacing)
    np.testing.assert_allclose(frame.positions(k, i, j), centres, atol=1e-6)
    # its columns point 16.5 degrees out of the coronal plane: the letters say both directions
    assert geometry.patient_orientation([*orientation[0], *orientation[1]]) == ("L", "PH")


def test_a_sheared_variant_shifts_by_the_tangent_of_its_angle():
    positions, orientation, spacing = _headers(variants.make("ct-head", "sheared"))
    frame = geometry.slice_frame(positions, orientation, spacing)
    assert frame.sheared and not frame.uneven
    np.testing.assert_allclose(frame.shift[:, 0], frame.depth * math.tan(math.radians(20)), atol=1e-3)
    np.testing.assert_allclose(frame.shift[:, 1], 0, atol=1e-3)
    # the slice spacing is along the normal, not along the (longer) step between slice origins
    assert geometry.slice_spacing(positions, orientation) == pytest.approx(5.0, abs=0.01)
    (k, i, j), centres = _true_centres(positions, orientation, spacing)
    np.testing.assert_allclose(frame.positions(k, i, j), centres, atol=1e-6)


def test_uneven_slices_are_told_and_placed_by_their_own_positions():
    positions, orientation, spacing = _headers(variants.make("ct-head", "uneven"))
    assert not geometry.spacing_is_uniform(positions, orientation)
    frame = geometry.slice_frame(positions, orientation, spacing)
    assert frame.uneven and not frame.sheared
    assert sorted(set(np.round(np.diff(frame.depth), 2))) == [5.0, 10.0, 15.0]  # 1, 2 and 3 steps of 5 mm
    assert geometry.slice_spacing(positions, orientation) == pytest.approx(float(np.median(np.diff(frame.depth))))
    (k, i, j), centres = _true_centres(positions, orientation, spacing)
    np.testing.assert_allclose(frame.positions(k, i, j), centres, atol=1e-6)
    a = geometry.affine(positions, orientation, spacing)
    assert a is not None
    off = np.abs((a @ np.stack([k, i, j, np.ones_like(k)]))[:3].T - centres).max()
    assert off > 1.0  # the affine's average step misplaces middle slices: why SliceFrame exists


def test_one_slice_and_no_geometry():
    positions, orientation, spacing = _headers(variants.make("ct-head", "single"))
    assert math.isnan(geometry.slice_spacing(positions, orientation))
    assert geometry.spacing_is_uniform(positions, orientation)
    a = geometry.affine(positions, orientation, spacing)
    assert a is not None
    np.testing.assert_allclose(a[:3, 0], [0, 0, 1])  # one slice: the normal stands in for the step
    assert geometry.affine(None, orientation, spacing) is None
    assert geometry.spacing(None, None, None) is None
    assert math.isnan(geometry.spacing(None, None, spacing)[0])  # type: ignore[index]
    assert geometry.patient_orientation(["x"] * 6) is None and geometry.patient_orientation([1, 0, 0]) is None


@pytest.mark.parametrize("source", [("ct-head",), ("ct-tilted",), ("ct-head", "uneven"), ("mr-sag",)])
def test_series_input_answers_with_the_geometry_module(source):
    dsets = variants.make(*source)
    series = _series(dsets)
    positions, orientation, spacing = _headers(dsets)
    np.testing.assert_array_equal(series.affine, geometry.affine(positions, orientation, spacing))
    assert series.spacing == geometry.spacing(positions, orientation, spacing)
    assert series.spacing_is_uniform == geometry.spacing_is_uniform(positions, orientation)
    np.testing.assert_array_equal(series.normal, geometry.normal(orientation))


def test_the_planes_of_an_affine_and_what_is_wrong_with_one():
    positions, orientation, spacing = _headers(variants.make("ct-head"))
    a = geometry.affine(positions, orientation, spacing)
    assert a is not None
    grid = geometry.grid_from_affine(a, len(positions))
    np.testing.assert_allclose(grid.positions, positions, atol=1e-3)
    assert grid.orientation == [*orientation[0], *orientation[1]]
    assert grid.pixel_spacing == pytest.approx(spacing) and grid.thickness == pytest.approx(5.0, abs=0.01)
    flat, nan, skew = a.copy(), a.copy(), a.copy()
    flat[:3, 0] = 0
    nan[0, 3] = np.nan
    skew[:3, 1] = skew[:3, 2]
    for bad, message in [
        (a[:3], r"must be a finite 4x4 matrix, not shape \(3, 4\)"),
        (nan, "NaN or infinite"),
        (flat, "zero-length slice axis"),
        (skew, "not perpendicular"),
    ]:
        with pytest.raises(ValueError, match=message):
            geometry.grid_from_affine(bad, len(positions))
    assert geometry.grid_from_affine(flat, 1).thickness == 1.0  # one plane needs no slice step
