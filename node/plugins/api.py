"""The plugin API, as the node imports it: the contract lives in the SDK (``dicom_node_sdk``).

One contract for plugins in the node's own environment and in environments of their own: existing
``from node.plugins.api import ...`` keeps working, and a plugin that imports ``dicom_node_sdk``
runs anywhere the SDK is installed. The node's side of it (``PluginInfo``, ``as_info``) is in
``dicom_node_sdk._info`` and ``dicom_node_sdk.loading``.
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
    "codes",
    "geometry",
    "plugin",
]


def __getattr__(name: str) -> Any:
    """``PluginInfo`` and ``as_info``, importable from here as before they moved to the SDK's node side."""
    import dicom_node_sdk

    if name in ("PluginInfo", "as_info"):
        return getattr(dicom_node_sdk, name)
    raise AttributeError(f"module 'node.plugins.api' has no attribute {name!r}")
