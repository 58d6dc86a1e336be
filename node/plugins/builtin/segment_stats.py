"""``segment-stats``: each segment's volume (ml) and the statistics of the values inside it, as an SR.

Chain it after a segmentation plugin (``plugins = [{ name = "threshold-seg" }, { name = "segment-stats" }]``):
it takes the last Segmentation an earlier step returned and, for every segment, measures

- its volume in ml, and
- the mean, standard deviation, minimum and maximum of the rescaled values inside it (Hounsfield
  units for CT),

and returns them as :class:`Measurements`, which the node writes as a TID 1500 Structured Report
whose measurement groups reference the segments of the SEG written by the same job.

**Volumes in patient space.** A voxel's volume is its pixel area times its slice's slab thickness
along the slice normal (:func:`dicom_node_sdk.geometry.voxel_volumes`): a slice stands for the slab
from halfway to one neighbour to halfway to the next, so unevenly spaced slices (dropped or
irregular) count with their own thickness, and a tilted gantry's sheared voxels count as the
leaning prisms they are (base times height along the normal, not times the longer step between
positions).

**Statistics in patient space too.** Mean and standard deviation weight each voxel by its volume,
so a thick slab counts as much as the thin slices covering the same depth would; on an evenly
spaced series that is the plain mean and (population) standard deviation of the voxels.
A fractional (probability) mask counts a voxel as inside from 0.5 up (``Segmentation.segment_masks``).
An empty segment is reported with volume 0 and no value statistics.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.plugins.api import (
    Measurement,
    MeasurementGroup,
    Measurements,
    NoParams,
    PluginError,
    Segmentation,
    SeriesInput,
    plugin,
)
from node.plugins.geometry import voxel_volumes

log = logging.getLogger(__name__)

MILLILITER = Code("ml", "UCUM", "milliliter")
#: The finding of a segment without a description (a label map no template described).
UNDESCRIBED = codes.SCT.Tissue
#: CID 7464 (General Region of Interest Measurement Modifiers): how each value statistic is derived.
DERIVATIONS = {
    "mean": codes.SCT.Mean,
    "sd": codes.SCT.StandardDeviation,
    "min": codes.SCT.Minimum,
    "max": codes.SCT.Maximum,
}


@dataclass(frozen=True)
class Quantity:
    """What the voxel values are, by modality: the concept a mean or maximum is of, and its unit."""

    name: Code
    unit: Code


def quantity(modality: str) -> Quantity:
    """CT values are attenuation in HU; MR signal and anything else are rescaled values without a unit."""
    if modality == "CT":
        return Quantity(codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit)
    if modality == "MR":
        return Quantity(codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits)
    return Quantity(Code("246205007", "SCT", "Quantity"), codes.UCUM.NoUnits)


@dataclass(frozen=True)
class Stats:
    """One segment's figures: volume (ml) and, when it is not empty, the volume-weighted value statistics."""

    volume_ml: float
    voxels: int
    mean: float | None = None
    sd: float | None = None
    min: float | None = None
    max: float | None = None


def stats(mask: np.ndarray, values: np.ndarray, slice_volumes: np.ndarray) -> Stats:
    """Volume and value statistics of one mask over ``values``, each voxel weighted by its slice's volume (mm³)."""
    per_slice = np.count_nonzero(mask.reshape(len(mask), -1), axis=1)
    volume_ml = float(per_slice @ slice_volumes) / 1000.0
    count = int(per_slice.sum())
    if count == 0:
        return Stats(0.0, 0)
    k = np.nonzero(mask)[0]
    inside = values[mask].astype(np.float64)
    w = slice_volumes[k]
    mean = float(np.average(inside, weights=w))
    sd = float(np.sqrt(np.average((inside - mean) ** 2, weights=w)))
    return Stats(volume_ml, count, mean, sd, float(inside.min()), float(inside.max()))


def tracking_ids(seg: Segmentation, count: int) -> list[str]:
    """The tracking id of each of ``count`` segments: its label ("Segment N" without a description); a label
    used before gets its segment number, so each finding has its own id (and a follow-up the same one)."""
    used: set[str] = set()
    out = []
    for number in range(1, count + 1):
        label = seg.segments[number - 1].label if number <= len(seg.segments) else f"Segment {number}"
        tid = label if label not in used else f"{label} (segment {number})"
        used.add(tid)
        out.append(tid)
    return out


def group(
    number: int, tracking_id: str, seg: Segmentation, index: int, figures: Stats, what: Quantity
) -> MeasurementGroup:
    """The measurement group of segment ``number`` (1-based) of ``seg`` (result ``index`` of the job): volume,
    then mean, SD, min and max."""
    described = seg.segments[number - 1] if number <= len(seg.segments) else None
    measurements = [Measurement(codes.SCT.Volume, figures.volume_ml, MILLILITER)]
    for key, derivation in DERIVATIONS.items():
        value = getattr(figures, key)
        if value is not None:
            measurements.append(Measurement(what.name, value, what.unit, derivation))
    return MeasurementGroup(
        tracking_id=tracking_id,
        finding=described.type if described is not None else UNDESCRIBED,
        measurements=measurements,
        segment=number,
        segmentation=index,
    )


@plugin(name="segment-stats", version="1.0", params=NoParams, family=codes.cid7162.HistogramAnalysis)
def segment_stats(series: SeriesInput, params: NoParams) -> Measurements:
    """Volume (ml) and mean, SD, min, max of the values (HU for CT) of every segment from an earlier step."""
    found = [(i, r) for i, r in enumerate(series.previous) if isinstance(r, Segmentation)]
    if not found:
        raise PluginError(
            "segment-stats needs a segmentation from an earlier step: chain it after a segmentation "
            'plugin (plugins = [{ name = "threshold-seg" }, { name = "segment-stats" }])'
        )
    index, seg = found[-1]
    volumes = voxel_volumes(series, "segment-stats")
    values = series.rescaled()
    if values.ndim != 3:
        raise PluginError("segment-stats takes grey images (one sample per pixel), not colour")
    stacked = seg.segment_masks()
    masks = [stacked[..., n] for n in range(stacked.shape[-1])]
    if not masks:
        raise PluginError("the segmentation from the earlier step has no segments: there is nothing to measure")
    if masks[0].shape != values.shape:
        raise PluginError(
            f"the segmentation's masks are {masks[0].shape} (slices, rows, columns) but the series is {values.shape}"
        )
    what = quantity(series.modality)
    groups = []
    for (number, mask), tid in zip(enumerate(masks, start=1), tracking_ids(seg, len(masks)), strict=True):
        figures = stats(mask, values, volumes)
        if figures.voxels == 0:
            log.info("segment-stats: segment %d is empty: volume 0, no value statistics", number)
        groups.append(group(number, tid, seg, index, figures, what))
    return Measurements(groups, description="segment-stats")
