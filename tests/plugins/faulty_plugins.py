"""Plugins that misbehave on purpose, for tests/plugins/test_plugin_runtime.py.

The node imports this module by name in its plugin processes (``[plugins] local = { raiser =
"faulty_plugins:raiser", ... }``), so the tests put this folder on the node's PYTHONPATH.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict

from node.plugins.api import PluginError, Segment, Segmentation, SeriesInput, codes, plugin

RAISER_MESSAGE = "the model weights are corrupt (checksum 1f2e3d4c != 00000000)"
FLAKY_MESSAGE = "the GPU is busy, try again later"
REFUSER_MESSAGE = "this series has no contrast; the model needs a contrast-enhanced CT"


def centre_box(series: SeriesInput) -> Segmentation:
    """A small result: the central quarter of every slice."""
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    mask = np.zeros((len(series), rows, cols), dtype=bool)
    mask[:, rows // 4 : 3 * rows // 4, cols // 4 : 3 * cols // 4] = True
    return Segmentation(mask, [Segment("Box", codes.SCT.Tissue, codes.SCT.Tissue)])


@plugin(name="raiser", version="0.1")
def raiser(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """Raises an ordinary exception (a bug in the plugin)."""
    raise ValueError(RAISER_MESSAGE)


@plugin(name="aborter", version="0.1")
def aborter(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """Kills its own process with SIGABRT, as a crashing C extension would."""
    os.abort()


@plugin(name="sleeper", version="0.1")
def sleeper(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """Hangs far longer than any test's timeout."""
    time.sleep(120)
    return [centre_box(series)]


@plugin(name="hog", version="0.1")
def hog(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """Allocates 4 GiB (and touches it), far past a 1500 MB limit."""
    big = np.ones(4 * 2**30, dtype=np.uint8)
    raise AssertionError(f"allocated {big.nbytes} bytes in spite of the memory limit")


class MarkerParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: A file the plugin creates on its first attempt; later attempts succeed.
    marker: str = ""


@plugin(name="flaky", version="0.1", params=MarkerParams)
def flaky(series: SeriesInput, params: MarkerParams) -> list[Segmentation]:
    """Fails with a retryable PluginError; with a marker, only on the first attempt."""
    if params.marker:
        m = Path(params.marker)
        if m.exists():
            return [centre_box(series)]
        m.write_text("attempted\n")
    raise PluginError(FLAKY_MESSAGE, retryable=True)


@plugin(name="flaky-capped", version="0.1", max_attempts=2)
def flaky_capped(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """Always fails with a retryable PluginError, but its own policy allows only 2 attempts."""
    raise PluginError(FLAKY_MESSAGE, retryable=True)


@plugin(name="refuser", version="0.1")
def refuser(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """Fails with a PluginError that is not retryable (the input is wrong for this plugin)."""
    raise PluginError(REFUSER_MESSAGE)


class SlowParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    seconds: float = 3.0


@plugin(name="slow-box", version="0.1", params=SlowParams)
def slow_box(series: SeriesInput, params: SlowParams) -> list[Segmentation]:
    """Sleeps, then returns the central box of every slice."""
    time.sleep(params.seconds)
    return [centre_box(series)]


@plugin(name="templated", version="0.1", segment_template="templated-metainfo.json")
def templated(series: SeriesInput, params: BaseModel) -> list[Segmentation]:
    """A label map (labels 1 and 2) without descriptions: its own metainfo.json beside this file names them."""
    rows, cols = int(series.first.Rows), int(series.first.Columns)
    labels = np.zeros((len(series), rows, cols), dtype=np.uint8)
    labels[:, : rows // 2, : cols // 2] = 1
    labels[:, rows // 2 :, cols // 2 :] = 2
    return [Segmentation(labels, [])]


class SpawnParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    #: Put on the command line of every process the plugin starts, so a test can find them.
    marker: str
    #: Return a result once they run, instead of hanging.
    then_return: bool = False
    #: Die with SIGKILL once they run (as the kernel's OOM killer would end it), instead of hanging.
    then_crash: bool = False


#: A Python process that sleeps (its argv, and so its command line, carries the marker).
HANG = "import time; time.sleep(300)"
#: An intermediate that starts HANG in a new session (setsid) and exits at once, leaving it orphaned.
DAEMONIZE = (
    "import subprocess, sys; subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2]], start_new_session=True)"
)


@plugin(name="spawner", version="0.1", params=SpawnParams)
def spawner(series: SeriesInput, params: SpawnParams) -> list[Segmentation]:
    """Starts a child that hangs and a grandchild that leaves its session and parent (setsid, orphaned); hangs."""
    subprocess.Popen([sys.executable, "-c", HANG, params.marker])
    subprocess.run([sys.executable, "-c", DAEMONIZE, HANG, params.marker], check=True)
    if params.then_crash:
        os.kill(os.getpid(), signal.SIGKILL)
    if not params.then_return:
        time.sleep(120)
    return [centre_box(series)]
