"""The ``onnx-tissue`` plugin: an ONNX model run with onnxruntime, loaded once per worker in ``setup``.

A warm worker (a plugin environment, see docs/plugins.md) makes one :class:`TissuePlugin`, calls
``setup`` once (the onnxruntime session: what a real model spends seconds on), then ``run`` for each
series. Each result's description says which setup of which process ran it, so a test or an
administrator can see a worker being reused: ``onnx-tissue setup #1 in pid 4242, job 3 (CPU)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Literal, Optional

import numpy as np
from dicom_node_sdk import Code, Plugin, PluginError, Segment, Segmentation, SeriesInput, codes

from dicom_node_example_onnx import __version__
from dicom_node_example_onnx.make_model import ensure_model

#: Setups run in this process (a warm worker runs one; each setup of a new instance counts).
_setups = 0

# Segment types of DICOM CID 7166 "Tissue Segmentation Property Types" (SNOMED CT), written by value:
# pydicom 2.4's code dictionary predates their current codes (it has "BodyFat", "Bone" 272673000), and
# the plugin runs with pydicom 2 or 3. They equal pydicom 3's codes.cid7166.AdiposeTissue, .SoftTissue
# and .BoneTissue (the tests check that).
ADIPOSE_TISSUE = Code("55603005", "SCT", "Fat")
SOFT_TISSUE = Code("87784001", "SCT", "Soft tissue")
BONE_TISSUE = Code("3138006", "SCT", "Bone")

#: One segment per label of the model (label 0, air, is background); category Tissue (CID 7150).
SEGMENTS = (
    Segment("Fat", codes.SCT.Tissue, ADIPOSE_TISSUE, color=(230, 210, 60), description="-295 to -25 HU, smoothed"),
    Segment("Soft tissue", codes.SCT.Tissue, SOFT_TISSUE, color=(205, 90, 80), description="-25 to 167 HU, smoothed"),
    Segment("Bone", codes.SCT.Tissue, BONE_TISSUE, color=(241, 214, 145), description="above 167 HU, smoothed"),
)


@dataclass
class Params:
    """Parameters of onnx-tissue."""

    batch_size: int = field(default=16, metadata={"description": "Slices per onnxruntime call (1-512): bounds the "
                                                                  "memory a job takes beyond its volume."})
    kind: Literal["binary", "labelmap"] = field(default="binary", metadata={
        "description": "SEG encoding: BINARY (every viewer) or a Label Map SEG."})

    def __post_init__(self) -> None:
        if not 1 <= self.batch_size <= 512:
            raise ValueError(f"batch_size must be between 1 and 512 (got {self.batch_size})")


class TissuePlugin(Plugin):
    """Fat, soft tissue and bone in a CT, by a small ONNX model (an example of a real model in a warm worker)."""

    name = "onnx-tissue"
    version = __version__
    Params = Params
    gpu = "optional"

    def __init__(self) -> None:
        self.session: Any = None  # onnxruntime.InferenceSession, made in setup
        self.setup_number = 0
        self.jobs = 0
        self.device = "CPU"

    def setup(self) -> None:
        """Create the onnxruntime session once: on CUDA when the node gave this worker a GPU and onnxruntime has it."""
        global _setups
        import onnxruntime  # heavy: imported here, not when the node lists the plugin

        path = ensure_model()
        available = onnxruntime.get_available_providers()
        providers = ["CPUExecutionProvider"]
        if os.environ.get("DICOM_NODE_DEVICE") == "cuda" and "CUDAExecutionProvider" in available:
            providers.insert(0, "CUDAExecutionProvider")
        try:
            self.session = onnxruntime.InferenceSession(str(path), providers=providers)
        except Exception as e:  # a damaged or foreign file at the configured path
            raise PluginError(f"cannot load the model {path}: {e}; delete it (setup rebuilds it) or run "
                              "python -m dicom_node_example_onnx.make_model PATH") from e  # fmt: skip
        self.device = "CUDA" if self.session.get_providers()[0] == "CUDAExecutionProvider" else "CPU"
        _setups += 1
        self.setup_number = _setups

    def run(self, series: SeriesInput, params: Optional[Params] = None) -> list[Segmentation]:
        if params is None:
            params = Params()
        if self.session is None:  # called outside a worker (a script, a unit test)
            self.setup()
        if series.modality != "CT":
            raise PluginError(f"onnx-tissue classifies CT values (HU); this series is {series.modality or 'of no modality'}")
        hu = series.rescaled()
        if hu.ndim != 3:
            raise PluginError(f"onnx-tissue needs grey images; this series has voxels of shape {hu.shape}")
        labels = np.empty(hu.shape, np.uint8)
        for start in range(0, len(hu), params.batch_size):
            batch = np.ascontiguousarray(hu[start : start + params.batch_size], dtype=np.float32)
            (labels[start : start + len(batch)],) = self.session.run(["labels"], {"hu": batch})
        self.jobs += 1
        # At most 64 characters (it may become the Series Description): the worker's identity, not timings.
        note = f"onnx-tissue setup #{self.setup_number} in pid {os.getpid()}, job {self.jobs} ({self.device})"
        return [Segmentation(labels, list(SEGMENTS), kind=params.kind, description=note)]

