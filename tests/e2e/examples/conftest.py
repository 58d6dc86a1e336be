"""The example model package's environment and its numpy reference, shared by the example's tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.helpers import REPO
from tests.helpers.envs import OLD_STACK, make_env

EXAMPLE = REPO / "examples" / "onnx-organs"


@pytest.fixture(scope="session")
def onnx_python() -> Path:
    """A venv with the old numpy/pydicom, onnxruntime, onnx, the SDK and the example (editable)."""
    return make_env([*OLD_STACK, "onnxruntime", "onnx"], [REPO / "sdk", EXAMPLE], tag="onnx")


@pytest.fixture(scope="session")
def reference():
    """The example's reference module, imported in the node's own Python (numpy only, no onnxruntime)."""
    sys.path.insert(0, str(EXAMPLE))
    try:
        from dicom_node_example_onnx import reference as module
    finally:
        sys.path.remove(str(EXAMPLE))
    return module
