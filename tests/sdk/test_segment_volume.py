"""dicom_node_sdk.geometry's voxel volumes: each slice's slab along the normal, on real regular, tilted,
sheared and unevenly spaced series (shared data and tests/helpers/variants.py).

The reference for a slab is computed another way than the SDK does: the volume of the parallelepiped
spanned by one pixel's two edges and the step to the next slice's position (a determinant), which is
a tilted gantry's voxel exactly, whatever its lean.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from dicom_node_sdk import geometry
from pydicom.dataset import Dataset

from tests.helpers import variants


def headers(dsets: list[Dataset]) -> tuple[np.ndarray, geometry.Orientation, tuple[float, float]]:
    iop = [float(x) for x in dsets[0].ImageOrientationPatient]
    positions = np.array([[float(x) for x in d.ImagePositionPatient] for d in dsets])
    dr, dc = (float(x) for x in dsets[0].PixelSpacing)
    return positions, ((iop[0], iop[1], iop[2]), (iop[3], iop[4], iop[5])), (dr, dc)


def prism_volumes(positions: np.ndarray, orientation: geometry.Orientation, spacing: tuple[float, float]) -> np.ndarray:
    """The volume (mm³) of the parallelepiped between each pair of neighbouring slices' voxels: |det| of its edges."""
    row, col = np.array(orientation[0]), np.array(orientation[1])
    return np.array(
        [
            abs(np.linalg.det(np.stack([col * spacing[0], row * spacing[1], step])))
            for step in np.diff(positions, axis=0)
        ]
    )


@pytest.mark.parametrize("source", ["ct-head", "mr-sag"])
def test_an_evenly_spaced_series_gives_every_slice_its_spacing(source: str) -> None:
    positions, orientation, spacing = headers(variants.make(source))
    expected = {"ct-head": 5.0, "mr-sag": 4.8}[source]  # Spacing Between Slices of these real series
    np.testing.assert_allclose(geometry.slab_thickness(positions, orientation), expected, atol=1e-3)
    np.testing.assert_allclose(
        geometry.voxel_volumes(positions, orientation, spacing), spacing[0] * spacing[1] * expected, rtol=1e-4
    )


def test_a_real_tilted_gantry_voxel_is_its_sheared_prism() -> None:
    """The 16.5 degree Philips CT: positions 2.5 mm apart, but each voxel is a prism 2.5 x cos(16.5) mm high."""
    positions, orientation, spacing = headers(variants.make("ct-tilted"))
    volumes = geometry.voxel_volumes(positions, orientation, spacing)
    np.testing.assert_allclose(volumes[1:-1], prism_volumes(positions, orientation, spacing)[1:], rtol=1e-4)
    np.testing.assert_allclose(
        geometry.slab_thickness(positions, orientation), 2.5 * math.cos(math.radians(16.5)), rtol=1e-3
    )
    # not the distance between positions (Spacing Between Slices says 2.5): that would be 4.3 % too much
    assert np.linalg.norm(positions[1] - positions[0]) == pytest.approx(2.5, abs=1e-3)


def test_shearing_a_series_keeps_its_voxel_volumes() -> None:
    """A 20 degree shear moves each slice in-plane; the slabs along the normal, and so the volumes, stay."""
    original = geometry.voxel_volumes(*headers(variants.make("ct-head")))
    positions, orientation, spacing = headers(variants.make("ct-head", "sheared"))
    assert np.linalg.norm(positions[1] - positions[0]) == pytest.approx(5 / math.cos(math.radians(20)), rel=1e-3)
    np.testing.assert_allclose(geometry.voxel_volumes(positions, orientation, spacing), original, rtol=1e-5)
    np.testing.assert_allclose(original[:-1], prism_volumes(positions, orientation, spacing), rtol=1e-4)


def test_uneven_spacing_gives_each_slice_half_its_gaps() -> None:
    """Slices dropped from the real CT (gaps of 5, 10 and 15 mm): a slice's slab reaches halfway to each neighbour."""
    positions, orientation, _ = headers(variants.make("ct-head", "uneven"))
    depth = positions @ geometry.normal(orientation)
    gaps = np.diff(depth)
    assert set(np.round(gaps, 2)) == {5.0, 10.0, 15.0}
    thickness = geometry.slab_thickness(positions, orientation)
    np.testing.assert_allclose(thickness[1:-1], (gaps[:-1] + gaps[1:]) / 2, rtol=1e-6)
    np.testing.assert_allclose([thickness[0], thickness[-1]], [gaps[0], gaps[-1]], rtol=1e-6)
    # the slabs tile the series' extent, plus half a gap beyond each end slice
    assert thickness.sum() == pytest.approx(depth[-1] - depth[0] + (gaps[0] + gaps[-1]) / 2)


def test_slices_in_any_order_get_their_own_thickness() -> None:
    orientation: geometry.Orientation = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    positions = np.array([[0.0, 0.0, z] for z in (0.0, 1.0, 3.0, 6.0)])
    np.testing.assert_allclose(geometry.slab_thickness(positions, orientation), [1.0, 1.5, 2.5, 3.0])
    shuffled = [2, 0, 3, 1]
    np.testing.assert_allclose(geometry.slab_thickness(positions[shuffled], orientation), [2.5, 1.0, 3.0, 1.5])


def test_a_single_slice_needs_its_thickness_given() -> None:
    orientation: geometry.Orientation = ((1.0, 0.0, 0.0), (0.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="give its thickness"):
        geometry.slab_thickness(np.zeros((1, 3)), orientation)
    np.testing.assert_allclose(geometry.voxel_volumes(np.zeros((1, 3)), orientation, (0.5, 0.5), single=3.0), [0.75])


def test_segment_volume_counts_each_voxel_with_its_slice() -> None:
    positions, orientation, spacing = headers(variants.make("ct-head", "uneven"))
    mask = np.zeros((len(positions), 4, 4), bool)
    mask[:, :2, :3] = True  # 6 voxels per slice
    expected = 6 * spacing[0] * spacing[1] * geometry.slab_thickness(positions, orientation).sum() / 1000
    assert geometry.segment_volume_ml(mask, positions, orientation, spacing) == pytest.approx(expected)
    with pytest.raises(ValueError, match="one slice per position"):
        geometry.segment_volume_ml(mask[1:], positions, orientation, spacing)
