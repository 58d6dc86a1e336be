"""The plugin API, as the node imports it: the contract lives in the SDK (``dicom_node_sdk``).

One contract for plugins in the node's own environment and in environments of their own: existing
``from node.plugins.api import ...`` keeps working, and a plugin that imports ``dicom_node_sdk``
runs anywhere the SDK is installed.
"""

from dicom_node_sdk.api import (
    GPU_MODES,
    Code,
    GeometryError,
    Images,
    NoParams,
    ParamsError,
    Plugin,
    PluginError,
    PluginInfo,
    Result,
    Segment,
    Segmentation,
    SeriesInput,
    Volume,
    as_info,
    codes,
    plugin,
)

__all__ = [
    "GPU_MODES",
    "Code",
    "GeometryError",
    "Images",
    "NoParams",
    "ParamsError",
    "Plugin",
    "PluginError",
    "PluginInfo",
    "Result",
    "Segment",
    "Segmentation",
    "SeriesInput",
    "Volume",
    "as_info",
    "codes",
    "plugin",
]
