"""dicom-node-sdk: the plugin contract of dicom-node, and the worker that runs plugins in their own environment.

Plugin authors import everything from here (``from dicom_node_sdk import plugin, Segmentation, ...``);
inside the node the same objects are ``node.plugins.api``.
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

__version__ = "0.1.0"

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
    "__version__",
    "as_info",
    "codes",
    "plugin",
]
