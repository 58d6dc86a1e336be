"""Plugins for the SDK tests, imported by workers in the node's Python and in another environment (numpy 1,
pydicom 2, no pydantic): only the SDK, numpy and pydicom here, never the node (tests/sdk on PYTHONPATH).
"""

from __future__ import annotations

import os
import signal
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from dicom_node_sdk import Images, Plugin, PluginError, Segment, Segmentation, Volume, codes, plugin
from pydicom.sr.coding import Code


@dataclass
class OrganParams:
    """Thresholds of the two segments, in rescaled values (HU for CT)."""

    bone: float = field(default=300.0, metadata={"description": "lower bound of bone"})
    tissue: list[float] = field(default_factory=lambda: [-100.0, 100.0])
    kind: Literal["labelmap", "binary"] = "labelmap"
    label: str | None = None

    def __post_init__(self) -> None:
        if len(self.tissue) != 2 or self.tissue[0] >= self.tissue[1]:
            raise ValueError("tissue is [lower, upper] with lower < upper")


def compute(series, params: OrganParams) -> list:  # type: ignore[no-untyped-def]
    """The reference computation: what the plugin returns, as plain numpy (the tests run it locally too)."""
    hu = series.rescaled()
    labels = np.zeros(hu.shape, np.uint8)
    labels[(hu >= params.tissue[0]) & (hu < params.tissue[1])] = 1
    labels[hu >= params.bone] = 2
    segments = [
        Segment("Soft tissue", codes.SCT.Tissue, Code("87784001", "SCT", "Soft tissue"), color=(200, 120, 100)),
        Segment(
            params.label or "Bone",
            codes.SCT.Tissue,
            codes.SCT.Bone,
            anatomic_region=codes.SCT.Skull,
            type_modifier=Code("7771000", "SCT", "Left"),
        ),
    ]
    mip = hu.max(axis=1)  # a coronal projection
    lo, hi = float(mip.min()), float(mip.max())
    picture = ((mip - lo) / max(hi - lo, 1.0) * 255).astype(np.uint8)[None]
    return [
        Segmentation(labels, segments, kind=params.kind, description="organs"),
        Volume(hu * 0.5 + 10, name="half", precision=0.5, units=Code("[hnsf'U]", "UCUM", "Hounsfield unit")),
        Images(picture, source_slices=[None], patient_orientation=("L", "F"), pixel_spacing=(5.0, 0.5)),
    ]


class Organs(Plugin):
    """Soft tissue and bone as a label map, half the values as a volume and a projection; setup counted."""

    name = "sdk-organs"
    version = "1.2"
    Params = OrganParams
    gpu = "optional"
    setups = 0

    def setup(self) -> None:
        type(self).setups += 1
        self.runs = 0

    def run(self, series, params):  # type: ignore[no-untyped-def]
        self.runs += 1
        out = compute(series, params)
        out[0].description = f"setups={self.setups} runs={self.runs} pid={os.getpid()}"
        return out


@dataclass
class FailParams:
    mode: Literal[
        "ok",
        "plugin-error",
        "retry",
        "crash",
        "bad-result",
        "wrong-result",
        "slices-last",
        "exit",
        "die",
        "sleep",
        "print",
        "scribble",
    ] = "ok"
    seconds: float = 0.0


@plugin(name="sdk-faulty", version="0.1", params=FailParams)
def faulty(series, params: FailParams):  # type: ignore[no-untyped-def]
    """Fails in the way it is asked to."""
    if params.mode == "plugin-error":
        raise PluginError("the model found no head in this series")
    if params.mode == "retry":
        raise PluginError("the licence server did not answer", retryable=True)
    if params.mode == "crash":
        return [1 / 0]
    if params.mode == "bad-result":
        return ["not a result"]
    if params.mode == "wrong-result":  # probabilities where a label map belongs: refused where it is made
        return [
            Segmentation(
                np.zeros((len(series), 4, 4), np.float32), [Segment("Nothing", codes.SCT.Tissue, codes.SCT.Tissue)]
            )
        ]
    if params.mode == "slices-last":  # (rows, columns, slices), as NIfTI tools keep them: refused against the series
        shape = (int(series.first.Rows), int(series.first.Columns), len(series))
        return [Segmentation(np.zeros(shape, bool), [Segment("Nothing", codes.SCT.Tissue, codes.SCT.Tissue)])]
    if params.mode == "exit":
        raise SystemExit(3)
    if params.mode == "die":  # what the OOM killer does
        os.kill(os.getpid(), signal.SIGKILL)
    if params.mode == "sleep":
        time.sleep(params.seconds)
    if params.mode == "print":
        print("a plugin printing to stdout")
    if params.mode == "scribble":  # its input must be as the node sent it, then changed here only
        v = series.voxels()
        if int(v.max()) == 0:
            raise PluginError("the input was changed by an earlier job")
        v[...] = 0
        assert int(series.voxels().max()) == 0
        return [
            Segmentation(
                np.zeros((len(series), 4, 4), bool),
                [Segment("Nothing", codes.SCT.Tissue, codes.SCT.Tissue)],
                description="scribbled",
            )
        ]
    return [Segmentation(np.zeros((len(series), 4, 4), bool), [Segment("Nothing", codes.SCT.Tissue, codes.SCT.Tissue)])]


@plugin(name="sdk-plain", version="1.0")
def plain(series, params):  # type: ignore[no-untyped-def]
    """No parameters; returns nothing."""
    return None


class BadSetup(Plugin):
    name = "sdk-bad-setup"
    version = "1.0"

    def setup(self) -> None:
        raise RuntimeError("weights file /models/missing.onnx not found")


not_a_plugin = 42
