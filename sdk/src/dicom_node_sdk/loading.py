"""Finding and importing plugins: one place for the worker and for discovery.

Works on Python 3.9+: entry points are read per distribution (``Distribution.entry_points``), not
through ``entry_points(group=...)`` (3.10+) or ``EntryPoint.dist`` (3.10+).
"""

from __future__ import annotations

import importlib
from importlib import metadata
from typing import Any, NamedTuple

from dicom_node_sdk._info import PluginInfo
from dicom_node_sdk.api import Plugin

#: The entry point group plugin packages register in (the left side is the plugin's name in rules).
GROUP = "dicom_node.plugins"


class PluginLoadError(Exception):
    """A plugin that cannot be imported or is not a plugin; ``reason`` says why, the message says which, too."""

    def __init__(self, name: str, target: str, reason: str) -> None:
        super().__init__(f"plugin {name!r} ({target}) cannot be loaded: {reason}")
        self.name, self.target, self.reason = name, target, reason


class EntryPoint(NamedTuple):
    name: str
    #: "module:attr"
    target: str
    dist: str
    dist_version: str


def _dist_name(dist: metadata.Distribution) -> str:
    return str(dist.metadata["Name"] or "")


def installed_plugins(group: str = GROUP) -> list[EntryPoint]:
    """The entry points of ``group`` in this environment, each with the distribution that declares it.

    A distribution found twice on sys.path counts once (the first, as import would find it).
    """
    seen: set[str] = set()
    found: list[EntryPoint] = []
    for dist in metadata.distributions():
        name = _dist_name(dist)
        key = name.lower().replace("_", "-")
        if key in seen:
            continue
        seen.add(key)
        for ep in dist.entry_points:
            if ep.group == group:
                found.append(EntryPoint(ep.name, ep.value, name, str(dist.version)))
    return found


def packages() -> dict[str, str]:
    """Every distribution installed in this environment, with its version."""
    out: dict[str, str] = {}
    for dist in metadata.distributions():
        out.setdefault(_dist_name(dist), str(dist.version))
    return dict(sorted(out.items(), key=lambda kv: kv[0].lower()))


def load_target(target: str) -> Any:
    """The object ``module:attr.sub`` names (any exception from importing it propagates)."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def as_info(obj: Any, name: str) -> PluginInfo:
    """Whatever an entry point or config names, as a PluginInfo (or a TypeError saying what it should be).

    A function decorated with ``@plugin`` already is one (a callable PluginInfo); a Plugin subclass
    describes itself with ``info()``.
    """
    if isinstance(obj, PluginInfo):
        return obj
    if isinstance(obj, type) and issubclass(obj, Plugin):
        return obj.info()
    raise TypeError(
        f"plugin {name!r} is a {type(obj).__name__}; decorate a function with @plugin(...) or "
        "subclass dicom_node_sdk.Plugin (node.plugins.api.Plugin)"
    )


def load(name: str, target: str) -> PluginInfo:
    """A plugin's ``module:attr`` as a PluginInfo; PluginLoadError saying why when it cannot be."""
    if ":" not in target:
        raise PluginLoadError(name, target, "the entry is not written as 'module:attribute'")
    try:
        obj = load_target(target)
    except (Exception, SystemExit) as e:  # a module that calls sys.exit() on import is a broken plugin, too
        raise PluginLoadError(name, target, f"{type(e).__name__}: {e}") from None
    try:
        return as_info(obj, name)
    except (TypeError, ValueError) as e:
        raise PluginLoadError(name, target, str(e)) from None
