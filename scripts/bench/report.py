"""The benchmarks' statistics and tables, one place for all of them.

Every benchmark repeats each measurement and reports the median with its spread (min-max over the
repetitions, or the interquartile range), ratios of medians between two setups, and the same table as
plain text for the terminal or Markdown for docs/benchmarks.md.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence


def median(values: Sequence[float]) -> float | None:
    """The median, or None when nothing was measured."""
    return statistics.median(values) if values else None


def spread(values: Sequence[float]) -> tuple[float, float, float] | None:
    """(median, min, max), or None when nothing was measured."""
    return (statistics.median(values), min(values), max(values)) if values else None


def iqr(values: Sequence[float]) -> tuple[float, float] | None:
    """The interquartile range (first, third quartile; inclusive method), or None for fewer than two values."""
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q3


def ratio(a: Sequence[float], b: Sequence[float]) -> float | None:
    """median(a) / median(b), or None when either is missing or b's median is not positive."""
    ma, mb = median(a), median(b)
    return ma / mb if ma is not None and mb is not None and mb > 0 else None


def cell(values: Sequence[float], fmt: str = "{:.2f}", *, scale: float = 1.0, spread: bool = True) -> str:
    """``median (min-max)`` of ``values`` times ``scale``, or ``n/a``; the spread only for repeated values."""
    s = _spread(values)
    if s is None:
        return "n/a"
    med, lo, hi = (v * scale for v in s)
    text = fmt.format(med)
    if spread and len(values) > 1:
        text += f" ({fmt.format(lo)}-{fmt.format(hi)})"
    return text


_spread = spread  # cell() has a keyword of the same name


def table(rows: Sequence[Sequence[str]], header: Sequence[str], markdown: bool = False) -> str:
    """Rows under a header: Markdown (numbers right-aligned) or plain text (first column left-aligned, the
    others right-aligned, each column as wide as its widest cell)."""
    if markdown:
        out = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in rows])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]

    def line(cells: Sequence[str]) -> str:
        pairs = enumerate(zip(cells, widths, strict=True))
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in pairs)

    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])
