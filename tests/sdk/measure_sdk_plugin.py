"""A plugin that measures the segments of the Segmentation it is handed (``previous``): run in a warm worker."""

from __future__ import annotations

import numpy as np
from dicom_node_sdk import Code, Measurement, MeasurementGroup, Measurements, Segmentation, codes, plugin

VOXELS = Code("{voxels}", "UCUM", "voxels")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")


def compute(series, seg: Segmentation) -> Measurements:  # type: ignore[no-untyped-def]
    values = series.rescaled()
    groups = []
    for k, s in enumerate(seg.segments, 1):
        mask = np.asarray(seg.masks == k) if seg.masks.ndim == 3 else np.asarray(seg.masks[..., k - 1], dtype=bool)
        groups.append(
            MeasurementGroup(
                s.label,
                s.type,
                [
                    Measurement(codes.SCT.Volume, int(mask.sum()), VOXELS),
                    Measurement(codes.SCT.Mean, float(values[mask].astype(np.float64).mean()), HU, codes.SCT.Mean),
                ],
                segment=k,
            )
        )
    return Measurements(groups, description=f"numpy {np.__version__}")


@plugin(name="sdk-measure", version="1.0")
def measure(series, params):  # type: ignore[no-untyped-def]
    return compute(series, [r for r in series.previous if isinstance(r, Segmentation)][-1])
