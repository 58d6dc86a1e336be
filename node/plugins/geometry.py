"""A series' own orthogonal frame for the built-in plugins: the SDK's geometry on a SeriesInput, and resampling.

A series is a stack of parallel planes, but not necessarily a regular grid: a tilted gantry shifts
each slice in-plane ("sheared"), and dropped or irregular slices make the spacing uneven. Treating
the (slice, row, column) indices as an orthogonal grid with the median spacing then misplaces voxels
by millimetres. :mod:`dicom_node_sdk.geometry` expresses each slice's exact place in the series' own
orthogonal frame (:class:`SliceFrame`); this module takes it from a :class:`SeriesInput` (refusing a
series without geometry with a PluginError) and resamples a volume onto a regular grid of that frame
(which needs scipy, so it is not part of the SDK). The built-in ``distance-map`` and ``mip-sc``
plugins compute in it.
"""

from __future__ import annotations

import numpy as np
from dicom_node_sdk import geometry
from dicom_node_sdk.geometry import REGULAR_TOLERANCE_MM, SliceFrame
from scipy import ndimage

from node.plugins.api import PluginError, SeriesInput

__all__ = ["REGULAR_TOLERANCE_MM", "SliceFrame", "orthogonal_volume", "slice_frame", "voxel_volumes"]


def slice_frame(series: SeriesInput, purpose: str) -> SliceFrame:
    """The series' :class:`SliceFrame`; a PluginError naming what is missing for ``purpose`` otherwise."""
    if series.orientation is None or series.positions is None:
        raise PluginError(f"{purpose} needs Image Orientation (Patient) and Image Position (Patient) on every slice")
    if series.pixel_spacing is None:
        raise PluginError(f"{purpose} needs Pixel Spacing")
    return geometry.slice_frame(series.positions, series.orientation, series.pixel_spacing)


def voxel_volumes(series: SeriesInput, purpose: str) -> np.ndarray:
    """Each slice's voxel volume (mm³), (slices,), from :func:`dicom_node_sdk.geometry.voxel_volumes`.

    A PluginError names what is missing for ``purpose``: the slices' positions and orientation, Pixel
    Spacing, or, for a single slice (which has no neighbour to measure its slab against), Spacing
    Between Slices or Slice Thickness, which then give its slab.
    """
    if series.orientation is None or series.positions is None:
        raise PluginError(f"{purpose} needs Image Orientation (Patient) and Image Position (Patient) on every slice")
    if series.pixel_spacing is None:
        raise PluginError(f"{purpose} needs Pixel Spacing to measure volumes")
    single = series.first.get("SpacingBetweenSlices") or series.first.get("SliceThickness")
    try:
        return geometry.voxel_volumes(
            series.positions, series.orientation, series.pixel_spacing, float(single or 0) or None
        )
    except ValueError:
        raise PluginError(
            f"{purpose} cannot measure the volume of a single slice without Slice Thickness or Spacing Between Slices"
        ) from None


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
