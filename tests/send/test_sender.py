"""The sender's parts: what a status means, the back-off, what is proposed (against real peers:
tests/e2e/send/test_sender_peers.py)."""

from __future__ import annotations

import random

import pytest

from node.config import RetrySection
from node.send.dispatch import backoff
from node.send.failures import classify_status
from node.send.transcode import proposals

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT, J2K, RLE = (
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
)


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (0x0000, "delivered"),
        (0xB000, "delivered"),
        (0xB006, "delivered"),
        (0xB007, "delivered"),
        (0x0111, "delivered"),
        (0xA700, "transient"),
        (0xA7FF, "transient"),
        (0x0110, "transient"),
        (0xA900, "permanent"),
        (0xA9FF, "permanent"),
        (0xC000, "permanent"),
        (0xC123, "permanent"),
        (0x0122, "permanent"),
        (0x0124, "permanent"),
        (0x0117, "permanent"),
        (0xFE00, "permanent"),
    ],
)
def test_status_classes(status, kind):
    got, text = classify_status(status, "why")
    assert got == kind
    if status:
        assert f"0x{status:04X}" in text and "why" in text  # the reason travels with the outcome


def test_backoff_grows_by_the_multiplier_to_its_maximum_with_bounded_jitter():
    policy = RetrySection(initial_delay=2, multiplier=3, max_delay=60, jitter=0.25)
    rng = random.Random(7)
    for n, base in enumerate([2, 6, 18, 54, 60, 60, 60], start=1):
        for _ in range(50):
            d = backoff(policy, n, rng)
            assert base * 0.75 - 1e-9 <= d <= min(60, base * 1.25) + 1e-9, (n, d)


def test_proposals_offer_the_stored_syntax_and_an_uncompressed_fallback():
    assert proposals({(CT, J2K)}, "as-stored") == {CT: [(J2K,), (EXPLICIT, IMPLICIT)]}
    assert proposals({(CT, EXPLICIT)}, "as-stored") == {CT: [(EXPLICIT,), (IMPLICIT,)]}
    # asked for lossless JPEG 2000: it comes first, the stored syntax and uncompressed after
    assert proposals({(CT, EXPLICIT)}, "jpeg2000") == {CT: [(J2K,), (EXPLICIT,), (IMPLICIT,)]}
    # "none": a compressed file is only ever sent decoded
    assert proposals({(CT, RLE)}, "none") == {CT: [(EXPLICIT, IMPLICIT)]}
    # a destination that only takes implicit VR
    assert proposals({(CT, J2K)}, "as-stored", (IMPLICIT,)) == {CT: [(IMPLICIT,)]}
