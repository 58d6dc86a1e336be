"""Build the example's ONNX model from its fixed weights: ``python -m dicom_node_example_onnx.make_model OUT.onnx``.

Nothing is downloaded: the graph is written with ``onnx.helper`` from :mod:`dicom_node_example_onnx.model`,
and the same weights always give the same file. The plugin calls :func:`ensure_model` in ``setup`` when the
file is missing, so a fresh environment works without this step; run it by hand to place the model
elsewhere (then point ``DICOM_NODE_ONNX_TISSUE_MODEL`` at it).

The graph (opset 13, IR version 8, so onnxruntime 1.10 and later load it)::

    hu (slices, rows, cols) float32
      -> Unsqueeze(axis 1) -> Clip(-1024, 3071) -> Pad(edge, 1 pixel in-plane)
      -> Conv 3x3 (binomial kernel x 1/1000)                 = x, (slices, 1, rows, cols)
      -> Concat(x, x*x) -> Conv 1x1 (4 classes, with bias)   = scores, (slices, 4, rows, cols)
      -> ArgMax(axis 1) -> Cast(uint8)                       = labels (slices, rows, cols)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from dicom_node_example_onnx import __version__
from dicom_node_example_onnx.model import CLASSES, HU_MAX, HU_MIN, KERNEL, SCALE, score_weights

#: Opset and IR version the graph is written for (old enough for onnxruntime >= 1.10).
OPSET = 13
IR_VERSION = 8

#: Environment variable naming the model file; otherwise :func:`default_model_path`.
MODEL_ENV = "DICOM_NODE_ONNX_TISSUE_MODEL"


def default_model_path() -> Path:
    """Where the plugin keeps its model when ``DICOM_NODE_ONNX_TISSUE_MODEL`` is not set: a per-user cache folder."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "dicom-node-example-onnx" / f"tissue-{__version__}.onnx"


def model_path() -> Path:
    """The model file the plugin loads: ``$DICOM_NODE_ONNX_TISSUE_MODEL``, else :func:`default_model_path`."""
    configured = os.environ.get(MODEL_ENV)
    return Path(configured) if configured else default_model_path()


def build():  # -> onnx.ModelProto (onnx is imported here, not at module level)
    """The model as an ``onnx.ModelProto``, checked by ``onnx.checker``."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w, b = score_weights()
    initializers = [
        numpy_helper.from_array(np.array([1], np.int64), "axis1"),
        numpy_helper.from_array(np.array(HU_MIN, np.float32), "hu_min"),
        numpy_helper.from_array(np.array(HU_MAX, np.float32), "hu_max"),
        # Pad's pads: begin (N, C, H, W) then end (N, C, H, W): one pixel on each side, in-plane only.
        numpy_helper.from_array(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads"),
        numpy_helper.from_array((KERNEL * SCALE).astype(np.float32).reshape(1, 1, 3, 3), "smooth_kernel"),
        numpy_helper.from_array(w.astype(np.float32).reshape(len(CLASSES), 2, 1, 1), "class_weights"),
        numpy_helper.from_array(b.astype(np.float32), "class_bias"),
    ]
    nodes = [
        helper.make_node("Unsqueeze", ["hu", "axis1"], ["hu4"]),
        helper.make_node("Clip", ["hu4", "hu_min", "hu_max"], ["clipped"]),
        helper.make_node("Pad", ["clipped", "pads"], ["padded"], mode="edge"),
        helper.make_node("Conv", ["padded", "smooth_kernel"], ["x"], kernel_shape=[3, 3]),
        helper.make_node("Mul", ["x", "x"], ["x2"]),
        helper.make_node("Concat", ["x", "x2"], ["features"], axis=1),
        helper.make_node("Conv", ["features", "class_weights", "class_bias"], ["scores"], kernel_shape=[1, 1]),
        helper.make_node("ArgMax", ["scores"], ["best"], axis=1, keepdims=0),
        helper.make_node("Cast", ["best"], ["labels"], to=TensorProto.UINT8),
    ]
    graph = helper.make_graph(
        nodes, "tissue_classes",
        [helper.make_tensor_value_info("hu", TensorProto.FLOAT, ["slices", "rows", "cols"])],
        [helper.make_tensor_value_info("labels", TensorProto.UINT8, ["slices", "rows", "cols"])],
        initializers,
        doc_string="CT tissue classes per voxel: " + ", ".join(f"{label} {name}" for label, name, _, _ in CLASSES),
    )  # fmt: skip
    model = helper.make_model(
        graph, producer_name="dicom_node_example_onnx", producer_version=__version__,
        opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
    )  # fmt: skip
    onnx.checker.check_model(model, full_check=True)
    return model


def write(path: Path) -> Path:
    """Write the model to ``path`` (atomically: a worker starting meanwhile never reads half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = build().SerializeToString()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def ensure_model(path: Path | None = None) -> Path:
    """The model file (``path`` or :func:`model_path`), built first if it does not exist."""
    path = Path(path) if path is not None else model_path()
    return path if path.is_file() else write(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dicom_node_example_onnx.make_model", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help=f"the .onnx file to write (default: ${MODEL_ENV}, else {default_model_path()})")
    args = parser.parse_args(argv)
    path = write(args.out if args.out is not None else model_path())
    print(f"wrote {path} ({path.stat().st_size} bytes, opset {OPSET})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
