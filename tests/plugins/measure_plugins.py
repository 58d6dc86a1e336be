"""Test plugins that return Measurements (a DICOM SR): what the tests of node.derive.sr run in the node."""

from __future__ import annotations

import numpy as np

from node.plugins.api import (
    Code,
    Measurement,
    MeasurementGroup,
    Measurements,
    NoParams,
    PluginError,
    Segment,
    Segmentation,
    SeriesInput,
    codes,
    plugin,
)

VOXELS = Code("{voxels}", "UCUM", "voxels")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")


@plugin(name="measure", version="0.3", params=NoParams)
def measure(series: SeriesInput, params: NoParams) -> Measurements:
    """Per segment of the previous step's Segmentation: its voxel count, and the mean and maximum of its values."""
    segs = [r for r in series.previous if isinstance(r, Segmentation)]
    if not segs:
        raise PluginError("measure needs a Segmentation from an earlier step")
    seg = segs[-1]
    masks = (
        seg.masks if seg.masks.ndim == 4 else np.stack([seg.masks == k for k in range(1, len(seg.segments) + 1)], -1)
    )
    values = series.rescaled()
    groups = []
    for k, s in enumerate(seg.segments):
        m = masks[..., k].astype(bool)
        inside = values[m]
        groups.append(
            MeasurementGroup(
                tracking_id=s.label,
                finding=s.type,
                segment=k + 1,
                measurements=[
                    Measurement(codes.SCT.Volume, int(m.sum()), VOXELS),
                    Measurement(codes.SCT.Mean, float(inside.mean()) if inside.size else 0.0, HU, codes.SCT.Mean),
                    Measurement(codes.SCT.Maximum, float(inside.max()) if inside.size else 0.0, HU, codes.SCT.Maximum),
                ],
            )
        )
    return Measurements(groups, description="segment measurements")


@plugin(name="report-first", version="1.0", params=NoParams)
def report_first(series: SeriesInput, params: NoParams) -> list[Measurements | Segmentation]:
    """Its report before the Segmentation the report measures (``segmentation=1``): the node builds the SEG first."""
    mask = np.zeros((len(series), int(series.first.Rows), int(series.first.Columns)), dtype=bool)
    mask[2:5, 100:150, 100:150] = True
    seg = Segmentation(mask, [Segment("Box", codes.SCT.Tissue, codes.SCT.Tissue)])
    volume = Measurement(codes.SCT.Volume, int(mask.sum()), VOXELS)
    group = MeasurementGroup("Box", codes.SCT.Tissue, [volume], segment=1, segmentation=1)
    return [Measurements([group]), seg]


@plugin(name="label-boxes", version="1.0", params=NoParams)
def label_boxes(series: SeriesInput, params: NoParams) -> Segmentation:
    """A label map of two boxes (labels 1 and 2): what the node also writes as a BINARY SEG when asked."""
    labels = np.zeros((len(series), int(series.first.Rows), int(series.first.Columns)), np.uint8)
    labels[2:5, 100:150, 100:150] = 1
    labels[6:8, 200:220, 200:220] = 2
    segments = [
        Segment("Box A", codes.SCT.Tissue, codes.SCT.Tissue),
        Segment("Box B", codes.SCT.Tissue, codes.SCT.Bone),
    ]
    return Segmentation(labels, segments, kind="labelmap")


@plugin(name="busy-after-one", version="1.0", params=NoParams)
def busy_after_one(series: SeriesInput, params: NoParams) -> Segmentation:
    """A failure another attempt may cure (a busy service), after an earlier step returned a result."""
    raise PluginError("the service is busy", retryable=True)
