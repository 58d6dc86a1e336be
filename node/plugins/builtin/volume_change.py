"""``volume-change``: each segment's volume now and in the patient's prior study, and the change, as an SR.

A follow-up example for rules that ask for priors (``priors = { from = "pacs", ... }`` on the action).
It segments the current series and the matching series of the newest prior study with the same
intensity ranges (threshold-seg's parameters and function), measures every segment's volume in patient
space (:func:`dicom_node_sdk.geometry.segment_volume_ml`: uneven spacing and tilted gantries counted
right), and returns

- the current series' Segmentation (the SEG the node writes), and
- :class:`Measurements`: one group per segment, tracked as segment-stats tracks it (the segment's
  label), referencing that SEG's segment, with its volume (SCT 118565006, ml) and, when a prior was
  measured, the prior's volume, the difference in ml and the relative change in percent (DCM 125314
  "Fractional Change", UCUM "%").

DICOM has no standard concept for "the same quantity in the prior study" or "volume change", so those
two use the local coding scheme ``99DICOMNODE`` (codes ``VOL-PRIOR`` and ``VOL-CHANGE``).

The prior series measured is the newest prior study's series of the same modality whose Series
Description equals the current one's, else the one with the slice count nearest to it. Without a prior
(none found, or none with a series of the modality) the report holds the current volumes only. Older
priors than the newest are not compared.
"""

from __future__ import annotations

import logging

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.plugins.api import (
    Measurement,
    MeasurementGroup,
    Measurements,
    PluginError,
    Segmentation,
    SeriesInput,
    StudyInput,
    geometry,
    plugin,
)
from node.plugins.builtin.threshold import Params, threshold_seg

log = logging.getLogger(__name__)

MILLILITER = Code("ml", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
#: Local codes (scheme 99DICOMNODE): no standard code says "in the prior study" or "change since".
PRIOR_VOLUME = Code("VOL-PRIOR", "99DICOMNODE", "Volume in prior study")
VOLUME_CHANGE = Code("VOL-CHANGE", "99DICOMNODE", "Volume change since prior study")


def masks_of(seg: Segmentation) -> list[np.ndarray]:
    """threshold-seg's masks (slices, rows, columns, segments) as one boolean mask per segment."""
    m = np.asarray(seg.masks)
    return [m[..., n] for n in range(m.shape[-1])]


def volumes_ml(series: SeriesInput, seg: Segmentation) -> list[float]:
    """Each segment's volume in ml, in patient space."""
    if series.positions is None or series.orientation is None or series.pixel_spacing is None:
        raise PluginError(
            "volume-change needs Image Position, Image Orientation (Patient) and Pixel Spacing on every slice"
        )
    first = series.first
    single = first.get("SpacingBetweenSlices") or first.get("SliceThickness")
    return [
        geometry.segment_volume_ml(
            mask, series.positions, series.orientation, series.pixel_spacing, float(single or 0) or None
        )
        for mask in masks_of(seg)
    ]


def matching_series(current: SeriesInput, prior: StudyInput) -> SeriesInput | None:
    """The prior study's series to compare with: same modality; same description first, else nearest slice count."""
    same = [s for s in prior.inputs.values() if s.modality == current.modality]
    if not same:
        return None
    description = str(current.first.get("SeriesDescription", ""))
    named = [s for s in same if str(s.first.get("SeriesDescription", "")) == description]
    pool = named or same
    return min(pool, key=lambda s: abs(len(s.datasets) - len(current.datasets)))


def tracking_ids(seg: Segmentation) -> list[str]:
    """The segment labels, as segment-stats names its groups (a repeated label gets its segment number)."""
    used: set[str] = set()
    out = []
    for number, segment in enumerate(seg.segments, start=1):
        tid = segment.label if segment.label not in used else f"{segment.label} (segment {number})"
        used.add(tid)
        out.append(tid)
    return out


def _group(tid: str, number: int, seg: Segmentation, now: float, before: float | None) -> MeasurementGroup:
    measurements = [Measurement(codes.SCT.Volume, now, MILLILITER)]
    if before is not None:
        measurements.append(Measurement(PRIOR_VOLUME, before, MILLILITER))
        measurements.append(Measurement(VOLUME_CHANGE, now - before, MILLILITER))
        if before > 0:
            measurements.append(Measurement(codes.DCM.FractionalChange, 100.0 * (now - before) / before, PERCENT))
    described = seg.segments[number - 1]
    return MeasurementGroup(tracking_id=tid, finding=described.type, measurements=measurements, segment=number)


@plugin(name="volume-change", version="1.0", params=Params, family=codes.cid7162.HistogramAnalysis)
def volume_change(series: SeriesInput, params: Params) -> list[Segmentation | Measurements]:
    """Segment volumes (threshold ranges) now and in the newest prior study, with the change in ml and %."""
    [seg] = threshold_seg(series, params)
    now = volumes_ml(series, seg)
    before: list[float | None] = [None] * len(now)
    description = "volume-change: no prior study"
    if series.priors:
        prior = series.priors[0]
        other = matching_series(series, prior)
        if other is None:
            log.info("volume-change: the prior study %s has no %s series", prior.study_uid, series.modality)
            description = f"volume-change: prior {prior.study_date} has no {series.modality} series"
        else:
            [prior_seg] = threshold_seg(other, params)
            before = list(volumes_ml(other, prior_seg))
            description = f"volume-change against prior of {prior.study_date}"
    groups = [
        _group(tid, number, seg, now[number - 1], before[number - 1])
        for number, tid in enumerate(tracking_ids(seg), start=1)
    ]
    return [seg, Measurements(groups, description=description[:64])]
