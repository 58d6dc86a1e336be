"""How a study's series are named as a study plugin's inputs when no rule names them.

A study rule without declared inputs (node.decide.rules) and ``dicom-node plugins run --study``
(node.plugins.offline) give a plugin every series of a study; both key them the same way here, so a
plugin written against one finds its inputs under the same names in the other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

T = TypeVar("T")


def input_keys(series: Iterable[T], number: Callable[[T], int | None], uid: Callable[[T], str]) -> dict[str, T]:
    """``series`` keyed ``series-<SeriesNumber>`` in number order; by Series Instance UID when a series has no
    number or shares it with another (then no key could say which is which)."""
    ordered = sorted(series, key=lambda s: (number(s) is None, number(s) or 0, uid(s)))
    numbers = [number(s) for s in ordered]
    return {f"series-{n}" if (n := number(s)) is not None and numbers.count(n) == 1 else uid(s): s for s in ordered}
