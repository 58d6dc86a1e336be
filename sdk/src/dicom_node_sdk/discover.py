"""``python -m dicom_node_sdk.discover``: what plugins this Python environment has, as the node asks it.

The node runs this with a plugin environment's interpreter (never importing the plugins itself):

    stdin:  {"local": {"name": "module:attr", ...}}     (optional; empty input means none)
    stdout: {"protocol": 1, "python": "3.x.y", "sdk": "0.1.0", "packages": {dist: version, ...},
             "plugins": {name: INFO, ...}, "errors": {name: "cannot be loaded: ...", ...}}

covering the entry points of group ``dicom_node.plugins`` here plus the given local entries (a local
entry wins over an entry point of the same name). Loading a plugin imports its module, so a plugin
imports heavy libraries (torch) in ``setup``, not at module level. A plugin that cannot be loaded is
an entry in ``errors``, never a failure of the whole listing; the exit status is 0 whenever the
answer was written, 2 for input that is not the JSON above.
"""

from __future__ import annotations

import json
import platform
import sys
from typing import Any

from dicom_node_sdk import __version__
from dicom_node_sdk._process import answer, forget_working_directory, take_stdout
from dicom_node_sdk.loading import PluginLoadError, installed_plugins, load, packages
from dicom_node_sdk.protocol import PROTOCOL, info_to_json


def _local_entries(request: Any) -> dict[str, str]:
    """``local`` of the request: name -> "module:attr" (a table with ``entry`` is taken too)."""
    if not isinstance(request, dict):
        raise ValueError("the request must be a JSON object")
    local = request.get("local") or {}
    if not isinstance(local, dict):
        raise ValueError('"local" must be an object of name: "module:attr"')
    out = {}
    for name, value in local.items():
        target = value.get("entry") if isinstance(value, dict) else value
        if not isinstance(target, str):
            raise ValueError(f'local plugin {name!r}: give "module:attr", not {value!r}')
        out[str(name)] = target
    return out


def discover(local: dict[str, str]) -> dict[str, Any]:
    """The answer for ``local`` entries plus this environment's entry points."""
    wanted: dict[str, tuple[str, str, str]] = {}
    for ep in installed_plugins():
        wanted[ep.name] = (ep.target, ep.dist, ep.dist_version)
    for name, target in local.items():
        wanted[name] = (target, "", "")
    plugins: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, (target, dist, dist_version) in sorted(wanted.items()):
        try:
            info = load(name, target)
            plugins[name] = info_to_json(info, target, dist, dist_version)
        except PluginLoadError as e:
            errors[name] = f"cannot be loaded: {e.reason} (entry {target})"
        except Exception as e:  # noqa: BLE001 (its parameters have no JSON schema, say)
            errors[name] = f"cannot be described: {type(e).__name__}: {e} (entry {target})"
    return {
        "protocol": PROTOCOL,
        "python": platform.python_version(),
        "sdk": __version__,
        "packages": packages(),
        "plugins": plugins,
        "errors": errors,
    }


def main() -> int:
    forget_working_directory()
    out = take_stdout()
    raw = sys.stdin.read()
    try:
        local = _local_entries(json.loads(raw) if raw.strip() else {})
    except ValueError as e:
        print(f"dicom_node_sdk.discover: bad request on stdin: {e}", file=sys.stderr)
        return 2
    answer(out, discover(local))
    return 0


if __name__ == "__main__":
    sys.exit(main())
