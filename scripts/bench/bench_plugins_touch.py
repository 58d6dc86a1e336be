"""The plugin scripts/bench/bench_plugins.py hands a volume to: it reads one element of every 4 KiB page and returns nothing.

It runs in the plugin environment's worker (``PYTHONPATH`` = this folder), so it imports only the SDK
and numpy. Touching every page is what any model does to its input at least once; reading one element
per page makes the kernel map (or, for ``np.load``, already have copied) every page without adding the
arithmetic of a real model, so the figures are the transfer alone.
"""

from __future__ import annotations

import numpy as np
from dicom_node_sdk import plugin

PAGE = 4096


def touch_pages(a: np.ndarray) -> int:
    """Sum of one element per 4 KiB page of ``a`` (a C-contiguous array): every page is read once."""
    flat = a.reshape(-1)
    return int(flat[:: max(1, PAGE // a.itemsize)].sum(dtype=np.int64))


@plugin("bench-touch", "1.0", description="Reads one voxel per 4 KiB page of the input and returns nothing.")
def touch(series, params):  # type: ignore[no-untyped-def]
    touch_pages(series.voxels())
    return []
