"""``distance-map``: the signed distance (mm) to a segment's surface, as a float Parametric Map.

Chain it after a segmentation plugin (``plugins = [{ name = "threshold-seg" }, { name = "distance-map" }]``):
it takes the last Segmentation an earlier step returned and, for the chosen segment (the first by
default), gives every voxel its distance in patient space to the segment's surface: negative inside
the segment, positive outside, in millimetres.

**The surface.** A voxel outside the segment is as far from the surface as its centre is from the
nearest voxel centre inside the segment; a voxel inside, as far as its centre is from the nearest
centre outside (so the voxels on either side of the boundary are one voxel spacing apart, not half).

**Where the voxels are.** Voxel centres are placed by each slice's own Image Position (Patient),
so a tilted gantry's sheared slices and uneven slice spacing count exactly (see
``node.plugins.geometry``). A regular series (unsheared, even spacing) is an orthogonal grid, and
``scipy.ndimage.distance_transform_edt`` with the spacing gives the exact distances. Otherwise the
distance is separable into slices: from a voxel of slice k to the segment's voxels in slice m it
is ``sqrt(dz**2 + d**2)``, with dz the distance between the two planes and d the in-plane distance
from the voxel's foot on plane m to those voxels, which is a 2-D distance transform of slice m.
The foot falls between slice m's pixels when slices are shifted by fractions of a pixel, so each
2-D transform is computed on a grid q times finer (q per axis, at most 8), chosen so that the foot
moves by at most a quarter of the smallest pixel spacing when read from the nearest fine node:
the result is then within that quarter pixel of the exact distance (the distance is 1-Lipschitz),
and exact for unsheared series with uneven spacing. The minimum over all slices m is the distance.
"""

from __future__ import annotations

import logging
import math

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.sr.coding import Code
from scipy import ndimage

from node.plugins.api import PluginError, Segmentation, SeriesInput, Volume, plugin
from node.plugins.geometry import SliceFrame, slice_frame

log = logging.getLogger(__name__)

MILLIMETER = Code("mm", "UCUM", "millimeter")

#: Largest error of a distance on a sheared series, as a fraction of the smaller pixel spacing.
ERROR_BUDGET = 0.25
#: Finest subdivision of a pixel for a sheared series' in-plane transforms.
MAX_REFINE = 8


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Which segment of the segmentation (1 = the first).
    segment: int = Field(1, ge=1)


def _mask(seg: Segmentation, number: int) -> np.ndarray:
    """Segment ``number`` (1-based) of ``seg`` as booleans (slices, rows, columns)."""
    masks = seg.segment_masks()
    count = masks.shape[-1]
    if not 1 <= number <= count:
        raise PluginError(f"the segmentation has {count} segment(s); segment = {number} does not exist")
    mask: np.ndarray = masks[..., number - 1]
    return mask


def refinement(offsets: np.ndarray, spacing: float, budget: float) -> int:
    """The smallest subdivision q of ``spacing`` that puts every offset (pixels) within ``budget`` mm of a node."""
    miss = math.inf
    for q in range(1, MAX_REFINE + 1):
        miss = float(np.abs(offsets * q - np.rint(offsets * q)).max() * spacing / q)
        if miss <= budget:
            return q
    log.warning(
        "distance-map: slices are shifted by fractions of a pixel finer than 1/%d; distances may be off by "
        "up to %.3f mm",
        MAX_REFINE,
        miss,
    )
    return MAX_REFINE


def distance_to(source: np.ndarray, frame: SliceFrame) -> np.ndarray:
    """For every voxel, the distance (mm) from its centre to the nearest centre of a ``source`` voxel (float32)."""
    dr, dc = frame.pixel_spacing
    if frame.regular:
        dz = frame.slice_spacing if len(frame.depth) > 1 else 1.0
        regular: np.ndarray = ndimage.distance_transform_edt(~source, sampling=(dz, dr, dc)).astype(np.float32)
        return regular
    n, rows, cols = source.shape
    # in-plane offset of slice k's pixels against slice m's, in pixels: offsets[k, m] = (rows, columns)
    offsets = (frame.shift[:, None, :] - frame.shift[None, :, :]) / (dr, dc)
    sheared_axes = int(np.abs(offsets[..., 0]).max() > 0) + int(np.abs(offsets[..., 1]).max() > 0)
    budget = ERROR_BUDGET * min(dr, dc) / math.sqrt(max(sheared_axes, 1))
    q = (refinement(offsets[..., 0], dr, budget), refinement(offsets[..., 1], dc, budget))
    pad = [
        int(math.ceil(np.abs(offsets[..., a]).max())) + 1 if np.abs(offsets[..., a]).max() > 0 else 0 for a in range(2)
    ]
    # fine node of slice m's pixel (i, j): ((i + pad0) * q0, (j + pad1) * q1)
    fine_shape = ((rows - 1 + 2 * pad[0]) * q[0] + 1, (cols - 1 + 2 * pad[1]) * q[1] + 1)
    start = np.rint((offsets + pad) * q).astype(int)  # fine node of slice k's pixel (0, 0) in slice m's grid
    log.debug("distance on a sheared/uneven grid: %d slices, in-plane refinement %s, padding %s", n, q, pad)
    dist2 = np.full(source.shape, np.inf, np.float32)
    bound = np.full(n, np.inf)  # the largest squared distance so far in each slice: farther planes cannot help
    for m in range(n):
        if not source[m].any():
            continue
        fine = np.ones(fine_shape, bool)
        fine[pad[0] * q[0] : (pad[0] + rows) * q[0] : q[0], pad[1] * q[1] : (pad[1] + cols) * q[1] : q[1]] = ~source[m]
        d2 = ndimage.distance_transform_edt(fine, sampling=(dr / q[0], dc / q[1])).astype(np.float32) ** 2
        for k in range(n):
            dz2 = float(frame.depth[k] - frame.depth[m]) ** 2
            if dz2 >= bound[k]:
                continue
            r0, c0 = start[k, m]
            view = d2[r0 : r0 + (rows - 1) * q[0] + 1 : q[0], c0 : c0 + (cols - 1) * q[1] + 1 : q[1]]
            np.minimum(dist2[k], view + np.float32(dz2), out=dist2[k])
            bound[k] = float(dist2[k].max())
    return np.sqrt(dist2)


@plugin(name="distance-map", version="1.1", params=Params)
def distance_map(series: SeriesInput, params: Params) -> Volume:
    """Signed distance in mm to the boundary of a segment from an earlier step (negative inside)."""
    segs = [r for r in series.previous if isinstance(r, Segmentation)]
    if not segs:
        raise PluginError(
            "distance-map needs a segmentation from an earlier step: chain it after a segmentation "
            'plugin (plugins = [{ name = "threshold-seg" }, { name = "distance-map" }])'
        )
    mask = _mask(segs[-1], params.segment)
    frame = slice_frame(series, "distance-map")
    if not mask.any():
        raise PluginError(f"segment {params.segment} is empty: there is no surface to measure from")
    if mask.all():
        raise PluginError(f"segment {params.segment} covers every voxel: there is no surface to measure from")
    values = np.where(mask, -distance_to(~mask, frame), distance_to(mask, frame))
    return Volume(
        values,
        name="distance",
        kind="parametric-map",
        units=MILLIMETER,
        description=f"signed distance to segment {params.segment}, mm (negative inside)",
    )
