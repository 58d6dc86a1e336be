"""Sizes for people, the same in logs, reports and the dashboard."""

from __future__ import annotations

_UNITS = ("bytes", "KiB", "MiB", "GiB", "TiB")


def size(n: float | None) -> str:
    """``1536`` -> ``"1.5 KiB"`` (powers of 1024, as df -h and du -h count)."""
    value, i = float(n or 0), 0
    while abs(value) >= 1024 and i < len(_UNITS) - 1:
        value /= 1024
        i += 1
    return f"{value:.0f} bytes" if i == 0 else f"{value:.1f} {_UNITS[i]}"
