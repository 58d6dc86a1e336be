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
