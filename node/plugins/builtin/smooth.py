"""``smooth-series``: edge-preserving denoising of a CT or MR series, returned as a derived image series.

A median filter (``scipy.ndimage.median_filter``) over each slice (``size``
pixels square; ``3d = true`` also takes the neighbouring slices): noise goes,
edges stay where they were because the median never blurs a step. It works
on the rescaled values (HU for CT), so the result is stored, scrolled and
measured like the source; a median of integers is an integer, so a CT
comes back exactly (no rescale error).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field
from scipy import ndimage

from node.plugins.api import PluginError, SeriesInput, Volume, plugin


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Width of the filter in pixels (odd).
    size: int = Field(3, ge=3, le=15)
    #: Also across slices (size along the slice axis 3); in-plane only by default.
    volumetric: bool = Field(False, alias="3d")

    def model_post_init(self, _context: object) -> None:
        if self.size % 2 == 0:
            raise ValueError(f"size must be odd, not {self.size}")


@plugin(name="smooth-series", version="1.0", params=Params)
def smooth_series(series: SeriesInput, params: Params) -> Volume:
    """Median-filtered copy of the series on its own grid."""
    values = series.rescaled()
    if values.ndim != 3:
        raise PluginError("smooth-series takes grey images (one sample per pixel)")
    footprint = (3 if params.volumetric else 1, params.size, params.size)
    out = np.empty_like(values)
    if params.volumetric:
        out = ndimage.median_filter(values, size=footprint, mode="nearest")
    else:
        for z in range(len(values)):  # slice by slice: no second temporary the size of the volume
            out[z] = ndimage.median_filter(values[z], size=params.size, mode="nearest")
    return Volume(
        out,
        name=f"{series.first.get('SeriesDescription', '') or series.modality} median {params.size}",
        description=f"median filter {params.size}x{params.size}" + (" x3 slices" if params.volumetric else " in plane"),
    )
