"""scripts/bench/report.py: the benchmarks' one place for medians, spreads, ratios and tables."""

from __future__ import annotations

import sys

import pytest
from helpers import REPO

sys.path.insert(0, str(REPO / "scripts" / "bench"))

import report  # noqa: E402


def test_median_spread_and_quartiles() -> None:
    assert report.median([3.0, 1.0, 2.0]) == 2.0 and report.median([]) is None
    assert report.spread([3.0, 1.0, 2.0, 10.0]) == (2.5, 1.0, 10.0) and report.spread([]) is None
    assert report.iqr([1.0, 2.0, 3.0, 4.0]) == (1.75, 3.25) and report.iqr([1.0]) is None


def test_ratio_of_medians_needs_both_and_a_positive_divisor() -> None:
    assert report.ratio([2.0, 4.0, 6.0], [1.0, 2.0]) == pytest.approx(4.0 / 1.5)
    assert report.ratio([], [1.0]) is None and report.ratio([1.0], []) is None and report.ratio([1.0], [0.0]) is None


def test_a_cell_is_the_median_with_its_range_when_repeated() -> None:
    assert report.cell([0.2, 0.1, 0.4]) == "0.20 (0.10-0.40)"
    assert report.cell([0.25], "{:.0f}", scale=1000) == "250"  # one run: no range
    assert report.cell([1.0, 3.0], spread=False) == "2.00"
    assert report.cell([]) == "n/a"


def test_tables_plain_and_markdown() -> None:
    rows = [["node", "1.5"], ["storescp", "12.25"]]
    assert report.table(rows, ["receiver", "s"]).splitlines() == [
        "receiver      s",
        "--------  -----",
        "node        1.5",
        "storescp  12.25",
    ]
    assert report.table(rows, ["receiver", "s"], markdown=True).splitlines() == [
        "| receiver | s |",
        "|---|---:|",
        "| node | 1.5 |",
        "| storescp | 12.25 |",
    ]
