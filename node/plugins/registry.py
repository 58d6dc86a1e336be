"""Where plugins come from: the ``dicom_node.plugins`` entry point group, and local ones named in the config.

Names are known without importing anything. Loading the config then imports
the plugins its rules use, to check their parameters: a rule naming a plugin
that cannot be imported is a config error that says why (and
``dicom-node plugins`` lists every plugin, loadable or not).
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from node.plugins.api import PluginInfo

GROUP = "dicom_node.plugins"


@dataclass(frozen=True)
class PluginRef:
    name: str
    #: "module:attribute"
    target: str
    #: The distribution that installed it, or "config" for [plugins.local] entries.
    source: str
    version: str = ""


def discover(local: Mapping[str, str] | None = None) -> dict[str, PluginRef]:
    """Installed plugins by name; a local one of the same name wins over an entry point."""
    found: dict[str, PluginRef] = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        found[ep.name] = PluginRef(ep.name, ep.value, dist.name if dist else "", dist.version if dist else "")
    for name, target in (local or {}).items():
        found[name] = PluginRef(name, target, "config")
    return found


class PluginLoadError(Exception):
    pass


def load(name: str, target: str) -> PluginInfo:
    """Import a plugin's ``module:attribute`` and return it as a PluginInfo."""
    from node.plugins.api import as_info

    module, _, attr = target.partition(":")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise PluginLoadError(f"plugin {name!r} ({target}) cannot be loaded: {type(e).__name__}: {e}") from None
    try:
        info = as_info(obj, name)
    except TypeError as e:
        raise PluginLoadError(str(e)) from None
    return info
