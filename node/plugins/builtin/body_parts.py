"""``body-parts-seg``: body outline, lungs and bone of a CT, by classical image processing.

The algorithm, on Hounsfield units:

1. **Body.** Voxels above ``body_threshold`` (-500 HU: tissue, not air or
   lung). If ``table_opening_mm`` > 0, a slice-wise binary opening with a disk
   of that radius (in mm, elliptical in pixels when the pixels are not square)
   first removes structures thinner than its diameter, such as a table top or
   head holder that touches the patient (where the patient lies flat on it,
   the part of the table right under the contact stays: there the two make
   one thick structure). The largest 3-D connected component
   (6-connected) is the body, which drops a table that does not touch the
   patient, clothing and noise; its holes are filled slice by slice, so the
   lungs, airways and bowel gas enclosed in the slice plane belong to it. The
   opening is off by default: a table usually lies on a foam mattress below
   -500 HU and is dropped by the component step alone, while the opening also
   removes real structures thinner than its diameter (ears, a thin skull).
2. **Lungs.** Air below ``lung_threshold`` (-400 HU) inside the body that is
   not connected (in 3-D) to the air around the patient, i.e. to air at the
   in-plane edge of any slice; this drops the nose, mouth, ear canals and
   air beside the body that the slice-wise filling closed in. Each remaining
   3-D component counts if its volume (voxel count x voxel volume from the
   spacing) is at least ``min_lung_ml`` and, unless ``lung_min_median_hu`` is
   None, its median is above that value: lung parenchyma is a mix of air and
   tissue (median about -850 HU), whereas pure gas such as bowel gas or an
   air-filled phantom sits near -1000 HU. Vessels inside the lungs are then
   filled in slice by slice (``fill_lung_holes``). The trachea and bronchi
   inside the chest are part of the lung segment. Known limits: lungs that
   touch the edge of the field of view, or whose airway reaches outside air
   within the scan (a scan from the face down with an open airway), count as
   outside air.
3. **Bone** (``include_bone``): voxels above ``bone_threshold`` (250 HU)
   inside the body; contrast-filled vessels and metal above it count too.

The result is one SEG with stacked binary masks (the body overlaps the
lungs and bone) and a fixed segment list, so segment numbers do not change
from one series to the next with the same parameters: Body, then Lungs and
Bone if included. A segment that is not found (no lungs in a head CT) stays
in the list with an empty mask. When the whole series shares one rescale,
the thresholds are compared with the stored values (no float copy of the
volume).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator
from scipy import ndimage

from node.plugins.api import PluginError, Segment, Segmentation, SeriesInput, codes, plugin
from node.plugins.builtin.codes import sct
from node.plugins.builtin.threshold import fill_holes_2d, largest_component

#: Display colours (RGB), after 3D Slicer's generic anatomy colours where they are distinct enough on grey.
BODY_COLOR = (177, 122, 101)
LUNG_COLOR = (0, 151, 206)
BONE_COLOR = (241, 214, 145)


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Body: voxels above this (HU).
    body_threshold: float = -500
    #: Radius (mm) of the slice-wise opening that detaches a table touching the body; 0 turns it off.
    table_opening_mm: float = Field(0, ge=0, le=50)
    include_lungs: bool = True
    #: Lungs: air below this (HU) inside the body.
    lung_threshold: float = -400
    #: Lungs: smallest 3-D component kept (ml); sinuses, trapped air and noise are smaller.
    min_lung_ml: float = Field(100, ge=0)
    #: Lungs: a component whose median is at or below this (HU) is pure gas, not lung; None turns the check off.
    lung_min_median_hu: float | None = -950
    #: Lungs: fill holes (vessels) slice by slice.
    fill_lung_holes: bool = True
    include_bone: bool = True
    #: Bone: voxels above this (HU) inside the body.
    bone_threshold: float = 250

    @model_validator(mode="after")
    def _order(self) -> Params:
        if self.include_bone and self.bone_threshold <= self.body_threshold:
            raise ValueError(
                f"bone_threshold ({self.bone_threshold}) must be above body_threshold ({self.body_threshold})"
            )
        return self


@dataclass(frozen=True)
class Values:
    """A series' voxels for comparisons and projections, and the rescale between them and rescaled values.

    When one Rescale Slope (> 0) and Intercept hold for the whole series, ``array`` is the stored values
    (no float copy of the volume: a threshold maps to stored units instead); otherwise it is the rescaled
    values with slope 1 and intercept 0. Either way the map is increasing, so comparisons, maxima and
    medians agree with the rescaled values.
    """

    array: np.ndarray
    slope: float = 1.0
    intercept: float = 0.0

    def units(self, rescaled: float) -> float:
        """A rescaled value (HU for CT) in the units of ``array``."""
        return (rescaled - self.intercept) / self.slope

    def rescaled(self, a: np.ndarray) -> np.ndarray:
        """Part of ``array`` (e.g. a slice or a projection) as rescaled float32 values."""
        if self.slope == 1 and self.intercept == 0:
            return a.astype(np.float32)
        return a.astype(np.float32) * np.float32(self.slope) + np.float32(self.intercept)


def values_of(series: SeriesInput) -> Values:
    """The :class:`Values` of ``series``."""
    slope, intercept = series.uniform_rescale()
    if slope is not None and slope > 0:
        return Values(series.voxels(), slope, intercept)
    return Values(series.rescaled())


def disk(radius_mm: float, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """A 2-D structuring element: the pixels within ``radius_mm`` of the centre (an ellipse in pixels)."""
    ry, rx = radius_mm / pixel_spacing[0], radius_mm / pixel_spacing[1]
    ny, nx = math.floor(ry), math.floor(rx)
    y, x = np.mgrid[-ny : ny + 1, -nx : nx + 1]
    inside: np.ndarray = (y / max(ry, 1e-9)) ** 2 + (x / max(rx, 1e-9)) ** 2 <= 1.0
    return inside


def body_mask(values: Values, params: Params, pixel_spacing: tuple[float, float]) -> np.ndarray:
    """Step 1 of the module docstring."""
    tissue = values.array > values.units(params.body_threshold)
    if params.table_opening_mm > 0:
        se = disk(params.table_opening_mm, pixel_spacing)
        if se.sum() > 1:
            for k in range(tissue.shape[0]):
                tissue[k] = ndimage.binary_opening(tissue[k], se)
    if not tissue.any():
        return tissue
    return fill_holes_2d(largest_component(tissue))


def outside_air(air: np.ndarray) -> np.ndarray:
    """The air that is 3-D connected to air at the in-plane edge of any slice."""
    labels, n = ndimage.label(air)
    if n == 0:
        return air
    edge = np.concatenate(
        [labels[:, 0, :].ravel(), labels[:, -1, :].ravel(), labels[:, :, 0].ravel(), labels[:, :, -1].ravel()]
    )
    outside = np.zeros(n + 1, dtype=bool)
    outside[np.unique(edge)] = True
    outside[0] = False
    connected: np.ndarray = outside[labels]
    return connected


def lung_mask(values: Values, body: np.ndarray, params: Params, voxel_ml: float) -> np.ndarray:
    """Step 2 of the module docstring."""
    air = values.array < values.units(params.lung_threshold)
    candidates: np.ndarray = air & body & ~outside_air(air)
    labels, n = ndimage.label(candidates)
    if n == 0:
        return candidates
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    sizes[0] = 0
    keep = sizes * voxel_ml >= params.min_lung_ml
    keep[0] = False
    ids = np.nonzero(keep)[0]
    if params.lung_min_median_hu is not None and len(ids):
        medians = np.atleast_1d(ndimage.median(values.array, labels, ids))
        keep[ids[medians <= values.units(params.lung_min_median_hu)]] = False
    lungs: np.ndarray = keep[labels]
    if params.fill_lung_holes and lungs.any():
        lungs = fill_holes_2d(lungs) & body
    return lungs


@plugin(name="body-parts-seg", version="1.0", params=Params, family=codes.cid7162.MorphologicalOperations)
def body_parts_seg(series: SeriesInput, params: Params) -> list[Segmentation]:
    """Body outline, lungs and bone of a CT by thresholds, connected components and hole filling."""
    if series.modality != "CT":
        raise PluginError(
            f"body-parts-seg works on CT (Hounsfield units); this series is {series.modality or 'without a Modality'}"
        )
    spacing = series.spacing
    if spacing is None:
        raise PluginError("body-parts-seg needs Pixel Spacing to measure volumes and distances in mm")
    dz = spacing[0]
    if not math.isfinite(dz) or dz <= 0:
        try:
            dz = float(series.first.get("SliceThickness") or 0)
        except (TypeError, ValueError):
            dz = 0.0
        if dz <= 0:
            raise PluginError("body-parts-seg cannot tell the slice spacing (one slice without Slice Thickness)")
    values = values_of(series)
    if values.array.ndim != 3:
        raise PluginError("body-parts-seg takes grey CT images (one sample per pixel)")
    voxel_ml = dz * spacing[1] * spacing[2] / 1000.0

    body = body_mask(values, params, (spacing[1], spacing[2]))
    if not body.any():
        raise PluginError(f"no body found: no voxel is above body_threshold ({params.body_threshold} HU)")
    masks = [body]
    segments = [Segment("Body", sct("AnatomicalStructure"), sct("EntireBody"), BODY_COLOR)]
    if params.include_lungs:
        masks.append(lung_mask(values, body, params, voxel_ml))
        segments.append(Segment("Lungs", sct("AnatomicalStructure"), sct("Lung"), LUNG_COLOR))
    if params.include_bone:
        masks.append(body & (values.array > values.units(params.bone_threshold)))
        segments.append(Segment("Bone", sct("Tissue"), sct("BoneTissue"), BONE_COLOR))
    return [Segmentation(np.stack(masks, axis=-1), segments, description="body-parts-seg")]
