"""segment-stats, distance-map and overlay-sc read an earlier step's masks the one way
(Segmentation.segment_masks): on a real head CT, a fractional bone mask of exactly 0.5 counts as inside
for all three, 0.49 for none; a segment number the segmentation lacks is named as missing."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from node.plugins.api import PluginError, Segment, Segmentation, SeriesInput, codes
from node.plugins.builtin.distance import distance_map
from node.plugins.builtin.overlay import overlay_sc
from node.plugins.builtin.segment_stats import segment_stats
from node.plugins.series import load_series
from tests.helpers import variants

BONE_HU = 300.0
BONE = [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone, color=(255, 0, 0))]


def run(info: Any, series: SeriesInput, **params: Any) -> Any:
    return info.run(series, info.validate_params(params))


@pytest.fixture(scope="module")
def series(tmp_path_factory: pytest.TempPathFactory) -> SeriesInput:
    folder = tmp_path_factory.mktemp("mask-rule")
    return load_series(variants.write(variants.make("ct-head"), folder / "ct-head"))


def test_a_probability_of_one_half_is_inside_for_every_plugin(series: SeriesInput) -> None:
    bone = series.rescaled() >= BONE_HU
    probability = np.where(bone, np.float32(0.5), np.float32(0.49))
    series.previous = [Segmentation(probability, BONE, kind="fractional")]

    distances = run(distance_map, series).values
    assert (distances[bone] <= 0).all() and (distances[~bone] > 0).all()

    report = run(segment_stats, series)
    by_binary = Segmentation(bone, BONE)
    series.previous = [by_binary]
    assert run(segment_stats, series).groups == report.groups

    series.previous = [Segmentation(probability, BONE, kind="fractional")]
    (images,) = run(overlay_sc, series, opacity=1.0, legend=False, slices="all")
    red = (images.pixels[..., 0] == 255) & (images.pixels[..., 1] == 0) & (images.pixels[..., 2] == 0)
    assert np.array_equal(red, bone)


def test_a_missing_segment_number_is_named(series: SeriesInput) -> None:
    bone = series.rescaled() >= BONE_HU
    series.previous = [Segmentation(bone.astype(np.uint8), [*BONE, *BONE], kind="labelmap")]
    with pytest.raises(PluginError, match=r"has 2 segment\(s\); segment = 3 does not exist"):
        run(distance_map, series, segment=3)
