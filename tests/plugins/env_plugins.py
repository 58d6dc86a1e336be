"""Plugins for the plugin-environment tests: imported in *another* Python environment (numpy 1, pydicom 2).

Only the SDK is imported here, never the node. Each plugin says in its Segmentation's description what
it saw (setup count, worker pid, numpy/pydicom versions, CUDA_VISIBLE_DEVICES), which the SEG's
Series Description carries back to the test.
"""

from __future__ import annotations

import os
import time

import numpy
import pydicom
from dicom_node_sdk import Plugin, PluginError, Segment, Segmentation, codes


class Bone(Plugin):
    """Bone above 300 HU; setup pretends to load weights (and counts how often it ran)."""

    name = "env-bone"
    version = "2.0"
    setups = 0

    def setup(self) -> None:
        type(self).setups += 1
        time.sleep(0.3)
        self.pid = os.getpid()

    def run(self, series, params):  # type: ignore[no-untyped-def]
        mask = series.rescaled() > 300
        seen = (
            f"setup {self.setups} pid {self.pid} numpy {numpy.__version__} pydicom {pydicom.__version__} "
            f"gpu [{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}]"
        )
        return [Segmentation(mask, [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone)], description=seen[:64])]


class GpuBone(Bone):
    """The same, for a GPU: what CUDA_VISIBLE_DEVICES its worker was given."""

    name = "env-gpu-bone"
    gpu = "required"

    def run(self, series, params):  # type: ignore[no-untyped-def]
        time.sleep(float(os.environ.get("ENV_PLUGIN_HOLD", "0")))  # keeps the device busy for a while
        mask = series.rescaled() > 300
        seen = f"gpu [{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}] pid {os.getpid()}"
        return [Segmentation(mask, [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone)], description=seen)]


class Hang(Plugin):
    """Never returns."""

    name = "env-hang"
    version = "1.0"

    def run(self, series, params):  # type: ignore[no-untyped-def]
        time.sleep(3600)


class Hog(Plugin):
    """Takes far more memory than its limit (and touches it, so it is resident)."""

    name = "env-hog"
    version = "1.0"

    def run(self, series, params):  # type: ignore[no-untyped-def]
        blocks = []
        for _ in range(40):
            blocks.append(numpy.ones(64 * 2**20 // 8))  # 64 MiB each, written
            time.sleep(0.05)
        raise PluginError("should have been stopped before it got here")


class BrokenSetup(Plugin):
    """Its weights are missing: setup says so."""

    name = "env-broken"
    version = "1.0"

    def setup(self) -> None:
        raise PluginError("weights file /models/missing.onnx not found: set MODEL_PATH in the environment's env")

    def run(self, series, params):  # type: ignore[no-untyped-def]
        return []


class SlowSetup(Plugin):
    """Its setup takes far longer than any setup_timeout in the tests."""

    name = "env-slow-setup"
    version = "1.0"

    def setup(self) -> None:
        time.sleep(3600)

    def run(self, series, params):  # type: ignore[no-untyped-def]
        return []


class DiesLeavingAChild(Plugin):
    """Forks a child that keeps the job's connection open (a data loader would), then dies mid-job."""

    name = "env-dies"
    version = "1.0"

    def run(self, series, params):  # type: ignore[no-untyped-def]
        import signal

        if os.fork() == 0:  # the child: holds every inherited descriptor, the connection included
            time.sleep(3600)
            os._exit(0)
        os.kill(os.getpid(), signal.SIGKILL)
