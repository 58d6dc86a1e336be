"""``distance-map``: the signed distance (mm) to a segment's surface, as a float Parametric Map.

Chain it after a segmentation plugin (``plugins = [{ name = "threshold-seg" }, { name = "distance-map" }]``):
it takes the last Segmentation an earlier step returned and, for the chosen segment (the
first by default), computes the Euclidean distance of every voxel to the segment's boundary
with the series' real spacing (``scipy.ndimage.distance_transform_edt`` with ``sampling``):
negative inside the segment, positive outside, in millimetres. Uneven slice spacing is
approximated by the median spacing.
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from pydicom.sr.coding import Code
from scipy import ndimage

from node.plugins.api import PluginError, Segmentation, SeriesInput, Volume, plugin

MILLIMETER = Code("mm", "UCUM", "millimeter")


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Which segment of the segmentation (1 = the first).
    segment: int = Field(1, ge=1)


def _mask(seg: Segmentation, number: int) -> np.ndarray:
    m = np.asarray(seg.masks)
    if m.ndim == 3:  # label map, or a single binary/fractional mask
        if m.dtype == bool or (np.issubdtype(m.dtype, np.floating) and m.max() <= 1):
            if number != 1:
                raise PluginError(f"the segmentation has one segment; segment = {number} does not exist")
            return m > 0.5
        return m == number
    if number > m.shape[-1]:
        raise PluginError(f"the segmentation has {m.shape[-1]} segments; segment = {number} does not exist")
    return m[..., number - 1] > 0.5


@plugin(name="distance-map", version="1.0", params=Params)
def distance_map(series: SeriesInput, params: Params) -> Volume:
    """Signed distance in mm to the boundary of a segment from an earlier step (negative inside)."""
    segs = [r for r in series.previous if isinstance(r, Segmentation)]
    if not segs:
        raise PluginError("distance-map needs a segmentation from an earlier step: chain it after a segmentation "
                          "plugin (plugins = [{ name = \"threshold-seg\" }, { name = \"distance-map\" }])")  # fmt: skip
    mask = _mask(segs[-1], params.segment)
    spacing = series.spacing
    if spacing is None:
        raise PluginError("the series has no usable spacing (Pixel Spacing and slice positions)")
    if not mask.any():
        raise PluginError(f"segment {params.segment} is empty: there is no surface to measure from")
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    values = np.where(mask, -inside, outside).astype(np.float32)
    return Volume(values, name="distance", kind="parametric-map", units=MILLIMETER,
                  description=f"signed distance to segment {params.segment}, mm (negative inside)")  # fmt: skip
