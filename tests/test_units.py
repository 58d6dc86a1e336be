"""Sizes for people: powers of 1024 with the unit df -h and du -h use."""

from __future__ import annotations

import pytest

from node.units import size


@pytest.mark.parametrize(
    ("n", "shown"),
    [
        (None, "0 bytes"),
        (0, "0 bytes"),
        (1023, "1023 bytes"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2, "5.0 MiB"),
        (3.25 * 1024**3, "3.2 GiB"),
        (2 * 1024**5, "2048.0 TiB"),  # no unit beyond TiB
        (-2048, "-2.0 KiB"),  # a shrinking size keeps its sign
    ],
)
def test_size(n: float | None, shown: str) -> None:
    assert size(n) == shown
