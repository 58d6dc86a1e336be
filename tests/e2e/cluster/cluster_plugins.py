"""A test plugin for the cluster tests: a job that stays running until the test lets it finish.

The node's plugin processes import it by name (``[plugins.local] held-box = "cluster_plugins:held_box"``),
so the cluster's nodes run with this folder on their PYTHONPATH.
"""

from __future__ import annotations

import time
from pathlib import Path

from faulty_plugins import centre_box
from pydantic import BaseModel, ConfigDict

from node.plugins.api import Segmentation, SeriesInput, plugin


class HeldParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: The plugin returns once this file exists (the test creates it).
    release: str
    #: ... or after this many seconds, so that a failed test leaves nothing waiting.
    timeout: float = 60.0


@plugin(name="held-box", version="0.1", params=HeldParams)
def held_box(series: SeriesInput, params: HeldParams) -> list[Segmentation]:
    """Waits until the test releases it, then returns the central box of every slice.

    A fixed sleep would make "the job is still running when the process is killed" depend on the
    machine's speed; this job runs for exactly as long as the test needs, and a run after the release
    (a job taken over from a killed process) returns at once.
    """
    deadline = time.monotonic() + params.timeout
    while not Path(params.release).exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    return [centre_box(series)]
