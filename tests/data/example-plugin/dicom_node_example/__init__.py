"""dicom-node-example: a complete, small dicom-node plugin package.

``example-sphere`` segments a sphere of ``radius_mm`` around the centre of the
volume. It stands in for a lesion detector: the mask is computed in patient
coordinates (millimetres) from the series geometry, so it is a sphere whatever
the pixel spacing, slice spacing or orientation (axial, sagittal, coronal,
oblique) of the series. It never reads a pixel value, so the node never
decodes the pixel data.

Use it in a rule::

    [[rules.actions]]
    type = "plugin"
    plugin = "example-sphere"
    params = { radius_mm = 25 }
    send_to = ["pacs"]
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from node.plugins.api import PluginError, Segment, Segmentation, SeriesInput, codes, plugin

__version__ = "1.0.0"


class Params(BaseModel):
    """The parameters of example-sphere; the node validates a rule's params against this when its config loads."""

    # A misspelt key in a rule (radius = 20) is an error, not silently ignored.
    model_config = ConfigDict(extra="forbid")

    radius_mm: float = Field(30.0, gt=0, le=1000, description="Radius of the sphere, in mm.")


def volume_centre(series: SeriesInput) -> np.ndarray:
    """The centre of the volume (x, y, z) in patient coordinates: the middle of its first and last voxel centres."""
    a = series.affine  # (slice, row, column) index -> patient mm
    assert a is not None and series.positions is not None
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    mid_slice = (series.positions[0] + series.positions[-1]) / 2
    return mid_slice + a[:3, 1] * (rows - 1) / 2 + a[:3, 2] * (cols - 1) / 2


def sphere_mask(series: SeriesInput, radius_mm: float) -> np.ndarray:
    """Boolean mask (slices, rows, cols): the voxels whose centre lies within ``radius_mm`` of the volume centre."""
    a = series.affine
    if a is None or series.positions is None:
        raise PluginError(
            "example-sphere needs images with a position, an orientation and a pixel spacing "
            "(ImagePositionPatient, ImageOrientationPatient, PixelSpacing)"
        )
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    centre = volume_centre(series)
    # Voxel (k, i, j) lies at positions[k] + i * a[:3, 1] + j * a[:3, 2]. The slice positions are
    # taken as they are (not positions[0] + k * a[:3, 0]), so unevenly spaced slices are right too.
    to_slice = series.positions - centre  # (slices, 3)
    in_plane = np.arange(rows)[:, None, None] * a[:3, 1] + np.arange(cols)[None, :, None] * a[:3, 2]  # (rows, cols, 3)
    # |s + p|^2 = |s|^2 + |p|^2 + 2 s.p, without a (slices, rows, cols, 3) array
    d2 = (
        (to_slice**2).sum(axis=1)[:, None, None]
        + (in_plane**2).sum(axis=2)[None]
        + 2 * np.einsum("kc,ijc->kij", to_slice, in_plane)
    )
    return d2 <= radius_mm**2


@plugin(name="example-sphere", version=__version__, params=Params)
def sphere(series: SeriesInput, params: Params) -> list[Segmentation]:
    """A sphere of radius_mm around the centre of the volume (an example for plugin authors)."""
    # A sphere that misses the volume (a huge series, a tiny radius) is not an error: an empty
    # result is a result, and the node still makes a SEG (with empty frames).
    mask = sphere_mask(series, params.radius_mm)
    segment = Segment(
        label="Sphere",
        category=codes.SCT.MorphologicallyAbnormalStructure,  # SCT 49755003
        type=codes.SCT.Mass,  # SCT 4147007
        color=(255, 200, 0),
    )
    return [Segmentation(mask, [segment], description=f"sphere r={params.radius_mm:g} mm")]
