"""Plugins for the job tests: a label map of two segments, from the series' own values."""

from __future__ import annotations

import numpy as np

from node.plugins.api import Segment, Segmentation, SeriesInput, codes, plugin

SEGMENTS = [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone), Segment("Soft", codes.SCT.Tissue, codes.SCT.SoftTissue)]


def label_map(series: SeriesInput) -> np.ndarray:
    """1 where the CT is bone (>= 300 HU), 2 where soft tissue (0..80 HU), else 0."""
    v = series.rescaled()
    return ((v >= 300) * 1 + ((v >= 0) & (v <= 80)) * 2).astype(np.uint8)


@plugin(name="two-labels", version="1.0")
def two_labels(series: SeriesInput, params: object) -> Segmentation:
    return Segmentation(label_map(series), SEGMENTS, "labelmap", "bone and soft tissue")


@plugin(name="bad-label", version="1.0")
def bad_label(series: SeriesInput, params: object) -> list[Segmentation]:
    """Two SEGs; the second's segment label holds a backslash, which a Long String (LO) may not."""
    labels = label_map(series)
    return [
        Segmentation(labels == 1, SEGMENTS[:1], "binary"),
        Segmentation(labels == 2, [Segment("Left\\Right", codes.SCT.Tissue, codes.SCT.SoftTissue)], "binary"),
    ]
