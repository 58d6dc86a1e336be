"""Where plugins come from: the ``dicom_node.plugins`` entry point group, and local ones named in the config.

Names are known without importing anything, so validating the rules at
start-up costs nothing and a broken plugin cannot stop the node from
starting; it fails the jobs that use it, with the import error.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points

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
