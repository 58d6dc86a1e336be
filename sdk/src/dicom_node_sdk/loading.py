"""Importing a plugin from its ``module:attribute``: one place for the worker and discovery."""

from __future__ import annotations

import importlib
from typing import Any

from dicom_node_sdk.api import PluginInfo, as_info


class PluginLoadError(Exception):
    """A plugin that cannot be imported or is not a plugin; the message says which and why."""


def load_target(target: str) -> Any:
    """The object ``module:attr.sub`` names (any exception from importing it propagates)."""
    module, _, attr = target.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else []:
        obj = getattr(obj, part)
    return obj


def load(name: str, target: str) -> PluginInfo:
    """A plugin's ``module:attr`` as a PluginInfo; PluginLoadError saying why when it cannot be."""
    if ":" not in target:
        raise PluginLoadError(f"plugin {name!r}: {target!r} is not a 'module:attribute' entry")
    try:
        obj = load_target(target)
    except (Exception, SystemExit) as e:  # a module that calls sys.exit() on import is a broken plugin, too
        raise PluginLoadError(f"plugin {name!r} ({target}) cannot be loaded: {type(e).__name__}: {e}") from None
    try:
        return as_info(obj, name)
    except (TypeError, ValueError) as e:
        raise PluginLoadError(str(e)) from None
