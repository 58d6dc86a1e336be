"""The model computed in plain numpy (float64, no onnxruntime, no scipy): what the ONNX graph must give.

The tests run the ONNX model in the plugin's environment and compare its label map with this one,
computed in another Python environment with another numpy: the graph is then known to compute what
:mod:`dicom_node_example_onnx.model` says.
"""

from __future__ import annotations

import numpy as np

from dicom_node_example_onnx.model import HU_MAX, HU_MIN, KERNEL, SCALE, score_weights


def smoothed(hu: np.ndarray) -> np.ndarray:
    """(slices, rows, cols) HU -> the clipped, 3x3-smoothed values in units of 1000 HU (float64)."""
    x = np.clip(np.asarray(hu, dtype=np.float64), HU_MIN, HU_MAX)
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1)), mode="edge")
    rows, cols = x.shape[1:]
    out = np.zeros_like(x)
    for i in range(3):
        for j in range(3):
            out += KERNEL[i, j] * padded[:, i : i + rows, j : j + cols]
    return out * SCALE


def scores(hu: np.ndarray) -> np.ndarray:
    """(slices, classes, rows, cols): each class's score (log-likelihood) per voxel."""
    x = smoothed(hu)[:, None]  # (slices, 1, rows, cols)
    w, b = score_weights()
    per_class = (1, len(b), 1, 1)
    return w[:, 0].reshape(per_class) * x + w[:, 1].reshape(per_class) * (x * x) + b.reshape(per_class)


def labels(hu: np.ndarray, batch: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, margin)`` per voxel: the best class (uint8) and how far its score leads the second best.

    A small margin marks a voxel on a class boundary, where float32 rounding in the graph may pick the
    other class. Computed ``batch`` slices at a time to bound memory.
    """
    hu = np.asarray(hu)
    out = np.empty(hu.shape, np.uint8)
    margin = np.empty(hu.shape, np.float64)
    for start in range(0, len(hu), batch):
        s = scores(hu[start : start + batch])
        out[start : start + batch] = s.argmax(axis=1)
        top2 = np.sort(s, axis=1)[:, -2:]
        margin[start : start + batch] = top2[:, 1] - top2[:, 0]
    return out, margin
