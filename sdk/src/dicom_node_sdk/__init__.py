"""dicom-node-sdk: the plugin contract of dicom-node, and the worker that runs plugins in their own environment.

Plugin authors import everything from here (``from dicom_node_sdk import plugin, Segmentation, ...``);
inside the node the same objects are ``node.plugins.api``. The geometry of a series is in
:mod:`dicom_node_sdk.geometry`.
"""

from __future__ import annotations

from typing import Any

from dicom_node_sdk import geometry
from dicom_node_sdk.api import (
    GPU_MODES,
    Code,
    GeometryError,
    Images,
    NoParams,
    ParamsError,
    Plugin,
    PluginError,
    PluginFunction,
    Result,
    ResultError,
    Returned,
    Segment,
    Segmentation,
    SeriesInput,
    StudyInput,
    Volume,
    codes,
    plugin,
)
from dicom_node_sdk.results import Measurement, MeasurementGroup, Measurements, QualitativeFinding

__version__ = "0.1.0"

__all__ = [
    "GPU_MODES",
    "Code",
    "GeometryError",
    "Images",
    "Measurement",
    "MeasurementGroup",
    "Measurements",
    "NoParams",
    "ParamsError",
    "Plugin",
    "PluginError",
    "PluginFunction",
    "QualitativeFinding",
    "Result",
    "ResultError",
    "Returned",
    "Segment",
    "Segmentation",
    "SeriesInput",
    "StudyInput",
    "Volume",
    "__version__",
    "codes",
    "geometry",
    "plugin",
]

#: The node's side of the contract, importable from here as before (not part of it: use
#: ``dicom_node_sdk.loading.as_info`` and ``dicom_node_sdk._info.PluginInfo``).
_MOVED = {"PluginInfo": "dicom_node_sdk._info", "as_info": "dicom_node_sdk.loading"}


def __getattr__(name: str) -> Any:
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'dicom_node_sdk' has no attribute {name!r}")
