"""Segmentation.segment_masks: the one reading of a plugin's masks that segment-stats, distance-map and
overlay-sc (and any plugin measuring an earlier step's segments) share, in every form ``masks`` takes."""

from __future__ import annotations

import numpy as np
import pytest
from dicom_node_sdk import Segment, Segmentation, codes


def _segments(n: int) -> list[Segment]:
    return [Segment(f"S{i}", codes.SCT.Tissue, codes.SCT.Bone) for i in range(1, n + 1)]


def test_a_boolean_mask_is_one_segment() -> None:
    m = np.zeros((2, 3, 4), bool)
    m[1, 2, 3] = True
    out = Segmentation(m, _segments(1)).segment_masks()
    assert out.shape == (2, 3, 4, 1) and out.dtype == bool
    assert np.array_equal(out[..., 0], m)


def test_a_label_map_gives_each_label_its_mask_even_an_absent_one() -> None:
    m = np.array([[[0, 1], [2, 2]], [[1, 0], [0, 0]]], np.uint8)
    out = Segmentation(m, _segments(3), kind="labelmap").segment_masks()
    assert out.shape == (2, 2, 2, 3)
    for n in (1, 2, 3):
        assert np.array_equal(out[..., n - 1], m == n)
    assert not out[..., 2].any()  # label 3 is described but empty: still segment 3


def test_a_label_map_without_descriptions_goes_up_to_its_largest_label() -> None:
    m = np.array([[[0, 4], [1, 0]]], np.int16)
    out = Segmentation(m, []).segment_masks()
    assert out.shape == (1, 2, 2, 4) and [int(out[..., i].sum()) for i in range(4)] == [1, 0, 0, 1]
    assert Segmentation(np.zeros((1, 2, 2), np.uint8), []).segment_masks().shape == (1, 2, 2, 0)


def test_stacked_masks_count_where_non_zero_as_the_seg_encodes_them() -> None:
    m = np.zeros((1, 2, 2, 2), np.uint8)
    m[0, 0, 0, 0] = 1
    m[0, 0, 0, 1] = 255  # overlapping, and not 0/1: still inside, as the BINARY SEG stores it
    m[0, 1, 1, 1] = 1
    out = Segmentation(m, _segments(2)).segment_masks()
    assert out.dtype == bool and out.shape == m.shape
    assert np.array_equal(out, m != 0)
    assert np.array_equal(Segmentation(m.astype(bool), _segments(2)).segment_masks(), m != 0)


@pytest.mark.parametrize("stacked", [False, True])
def test_a_fractional_mask_counts_from_one_half_up(stacked: bool) -> None:
    p = np.array([[[0.0, 0.49999], [0.5, 1.0]]], np.float32)
    masks = p[..., None] if stacked else p
    out = Segmentation(masks, _segments(1), kind="fractional").segment_masks()
    assert out.shape == (1, 2, 2, 1)
    assert out[..., 0].tolist() == [[[False, False], [True, True]]]  # 0.5 exactly is inside


def test_the_masks_are_read_as_they_are_now() -> None:
    """A plugin may change ``masks`` after making the result; the masks are read when asked for."""
    seg = Segmentation(np.zeros((1, 2, 2), bool), _segments(1))
    seg.masks[0, 0, 0] = True
    assert seg.segment_masks()[0, 0, 0, 0]
