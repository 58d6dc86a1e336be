"""``volume-change``: each segment's volume now and in the patient's prior study, and the change, as an SR.

A follow-up example for rules that ask for priors (``priors = { from = "pacs", ... }`` on the action).
It segments the current series and the matching series of the newest prior study with the same
intensity ranges (threshold-seg's parameters and function), measures every segment's volume in patient
space as segment-stats does (:func:`node.plugins.geometry.voxel_volumes`: uneven spacing and tilted
gantries counted right), and returns

- the current series' Segmentation (the SEG the node writes), and
- :class:`Measurements`: one group per segment, tracked as segment-stats tracks it (the segment's
  label), referencing that SEG's segment, with its volume (SCT 118565006, ml) and, when a prior was
  measured, the prior's volume, the difference in ml and the relative change in percent (DCM 125314
  "Fractional Change", UCUM "%"). The prior series measured is named in ``evidence_series``: the SR
  lists it under Pertinent Other Evidence. Its findings have the Tracking UIDs segment-stats gives the
  same segments (the node derives them from the patient and the tracking id only).

DICOM has no standard concept for "the same quantity in the prior study" or "volume change", so those
two use the local coding scheme ``99DICOMNODE`` (codes ``VOL-PRIOR`` and ``VOL-CHANGE``).

The prior series measured is the newest prior study's series of the same modality whose Series
Description equals the current one's, else the one with the slice count nearest to it. Without a prior
(none found, or none with a series of the modality) the report holds the current volumes only. Older
priors than the newest are not compared.
"""

from __future__ import annotations

import logging

from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from node.plugins.api import (
    Measurement,
    MeasurementGroup,
    Measurements,
    Segmentation,
    SeriesInput,
    StudyInput,
    plugin,
)
from node.plugins.builtin.segment_stats import tracking_ids
from node.plugins.builtin.threshold import Params, threshold_seg
from node.plugins.geometry import voxel_volumes

log = logging.getLogger(__name__)

MILLILITER = Code("ml", "UCUM", "milliliter")
PERCENT = Code("%", "UCUM", "percent")
#: Local codes (scheme 99DICOMNODE): no standard code says "in the prior study" or "change since".
PRIOR_VOLUME = Code("VOL-PRIOR", "99DICOMNODE", "Volume in prior study")
VOLUME_CHANGE = Code("VOL-CHANGE", "99DICOMNODE", "Volume change since prior study")


def volumes_ml(series: SeriesInput, seg: Segmentation) -> list[float]:
    """Each segment's volume in ml, in patient space (each slice's voxels times that slice's voxel volume)."""
    per_slice_mm3 = voxel_volumes(series, "volume-change")
    masks = seg.segment_masks()
    counts = masks.reshape(masks.shape[0], -1, masks.shape[-1]).sum(axis=1)  # (slices, segments)
    return [float(v) / 1000.0 for v in per_slice_mm3 @ counts]


def matching_series(current: SeriesInput, prior: StudyInput) -> SeriesInput | None:
    """The prior study's series to compare with: same modality; same description first, else nearest slice count."""
    same = [s for s in prior.inputs.values() if s.modality == current.modality]
    if not same:
        return None
    description = str(current.first.get("SeriesDescription", ""))
    named = [s for s in same if str(s.first.get("SeriesDescription", "")) == description]
    pool = named or same
    return min(pool, key=lambda s: abs(len(s.datasets) - len(current.datasets)))


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
    evidence: list[str] = []
    if series.priors:
        prior = series.priors[0]
        other = matching_series(series, prior)
        if other is None:
            log.info("volume-change: the prior study %s has no %s series", prior.study_uid, series.modality)
            description = f"volume-change: prior {prior.study_date} has no {series.modality} series"
        else:
            [prior_seg] = threshold_seg(other, params)
            before = list(volumes_ml(other, prior_seg))
            evidence.append(str(other.first.SeriesInstanceUID))
            description = f"volume-change against prior of {prior.study_date}"
    groups = [
        _group(tid, number, seg, now[number - 1], before[number - 1])
        for number, tid in enumerate(tracking_ids(seg, len(seg.segments)), start=1)
    ]
    return [seg, Measurements(groups, description=description[:64], evidence_series=evidence)]
