"""``threshold-seg``: segments from intensity ranges, e.g. bone as CT values above 300 HU.

Each segment is the voxels whose rescaled value (HU for CT) lies in
[lower, upper]; optionally only the largest 3-D connected component is kept
and holes are filled (slice by slice, so a hollow structure's inside is
filled where it is closed in the slice plane).
"""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from scipy import ndimage

from node.plugins.api import PluginError, Segment, Segmentation, SeriesInput, codes, plugin
from node.plugins.builtin.codes import sct


class Range(BaseModel):
    model_config = ConfigDict(extra="forbid")

    label: str = Field(min_length=1, max_length=64)
    lower: float | None = None
    upper: float | None = None
    #: SNOMED CT names from pydicom's code dictionary.
    category: str = "Tissue"
    type: str = "Tissue"

    _codes = field_validator("category", "type")(classmethod(lambda cls, v: (sct(v), v)[1]))

    @model_validator(mode="after")
    def _bounds(self) -> Range:
        if self.lower is None and self.upper is None:
            raise ValueError("give lower, upper or both")
        if self.lower is not None and self.upper is not None and self.lower > self.upper:
            raise ValueError(f"lower ({self.lower}) is above upper ({self.upper})")
        return self


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    segments: list[Range] = Field(
        default_factory=lambda: [Range(label="Bone", lower=300, category="Tissue", type="Bone")], min_length=1
    )
    largest_component: bool = False
    fill_holes: bool = False


def largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest: np.ndarray = labels == int(np.argmax(sizes))
    return largest


def fill_holes_2d(mask: np.ndarray) -> np.ndarray:
    out = np.empty_like(mask)
    for k in range(mask.shape[0]):
        out[k] = ndimage.binary_fill_holes(mask[k])
    return out


@plugin(name="threshold-seg", version="1.0", params=Params, family=codes.cid7162.HistogramAnalysis)
def threshold_seg(series: SeriesInput, params: Params) -> list[Segmentation]:
    """Segments from intensity ranges (rescaled values, HU for CT)."""
    stored = series.voxels()
    if stored.ndim != 3:
        raise PluginError("threshold-seg takes grey images (one sample per pixel), not colour")
    # With one rescale for the whole series, compare stored values against the bounds mapped back
    # (no float copy of the volume); otherwise compare rescaled values.
    slope, intercept = series.uniform_rescale()
    values = stored if slope is not None and slope > 0 else series.rescaled()

    def bound(v: float | None) -> float:
        assert v is not None  # only called for the bounds a segment has
        return (v - intercept) / slope if slope is not None and values is stored else v

    masks = np.zeros((*stored.shape, len(params.segments)), dtype=bool)
    for i, r in enumerate(params.segments):
        m = masks[..., i]
        # Slice by slice: no temporary the size of the volume.
        for z in range(len(m)):
            if r.lower is not None and r.upper is not None:
                np.logical_and(values[z] >= bound(r.lower), values[z] <= bound(r.upper), out=m[z])
            elif r.lower is not None:
                np.greater_equal(values[z], bound(r.lower), out=m[z])
            else:
                np.less_equal(values[z], bound(r.upper), out=m[z])
        if params.largest_component:
            m = largest_component(m)
        if params.fill_holes:
            m = fill_holes_2d(m)
        masks[..., i] = m
    segments = [Segment(r.label, sct(r.category), sct(r.type)) for r in params.segments]
    return [Segmentation(masks, segments, description="threshold-seg")]
