"""Where plugins come from, and what each one is: one place for the node's three kinds of plugin.

- **local**: importable in the node's own Python: the ``dicom_node.plugins`` entry point group, and
  ``[plugins] local`` entries written as ``name = "module:attr"``. Names are known without importing
  anything; compiling the rules (node.decide.compile) imports the plugins they use, to check their parameters.
- **environment**: installed in a Python environment of its own (``[plugins.environments.NAME]``), or a
  ``[plugins] local`` entry that names one. Found by running that interpreter's
  ``python -m dicom_node_sdk.discover`` (which imports them there, never here); their parameters are
  checked here against the JSON schema the environment reports. Run in warm workers (node.plugins.pool).
- **command**: ``[plugins.commands.NAME]``, a program or a container image (node.plugins.commands).

A rule naming a plugin that cannot be loaded is a config error that says why (and
``dicom-node plugins`` lists every plugin, loadable or not, with its environment).
"""

from __future__ import annotations

import glob
import importlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from dicom_node_sdk._info import PluginInfo

    from node.config import EnvironmentSection, PluginsSection

GROUP = "dicom_node.plugins"
#: The worker protocol this node speaks (dicom_node_sdk.protocol.PROTOCOL must match).
PROTOCOL = 1
#: Seconds an environment may take to list its plugins (it imports each one's module).
DISCOVERY_TIMEOUT = 300.0
#: Variables of the node's own environment that would make another interpreter import the node's packages.
_NOT_INHERITED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "PYTHONUSERBASE")


@dataclass(frozen=True)
class PluginRef:
    name: str
    #: "module:attribute" (for a command plugin: its name)
    target: str
    #: The distribution that installed it, "config" for [plugins] local entries, "command" for commands.
    source: str
    version: str = ""
    kind: Literal["local", "environment", "command"] = "local"
    #: The [plugins.environments] name of an environment plugin.
    environment: str | None = None
    #: An environment plugin as its environment describes it (dicom_node_sdk's plugin info).
    remote: Mapping[str, Any] | None = field(default=None, hash=False, compare=False)
    #: Why an environment plugin cannot be loaded there ("" when it can).
    error: str = ""


class PluginLoadError(Exception):
    pass


class EnvironmentError_(PluginLoadError):
    """An environment cannot be used (missing SDK, a broken interpreter); names its config key."""


def worker_environ(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment variables another interpreter runs with: the node's, less its Python paths, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in _NOT_INHERITED}
    env.update(extra or {})
    return env


def neutral_cwd(python: str) -> str:
    """Where another interpreter runs: its environment's root, never the node's folder.

    ``python -m`` puts the working folder first on sys.path: run from a source checkout it would find the
    node's own packages (and their entry points) there.
    """
    root = Path(python).parent.parent
    return str(root) if root.is_dir() else "/"


# -- environments --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EnvironmentInfo:
    name: str
    python: str
    python_version: str
    #: Versions of numpy, pydicom, dicom-node-sdk ... as that environment has them.
    packages: Mapping[str, str]
    plugins: Mapping[str, Mapping[str, Any]]
    errors: Mapping[str, str]


_cache: dict[str, tuple[tuple[Any, ...], EnvironmentInfo]] = {}
_cache_lock = threading.Lock()


def _stamp(python: str) -> tuple[Any, ...]:
    """Changes when packages are installed into or removed from the environment (its site-packages folders)."""
    root = Path(python).parent.parent  # venv and conda layouts: ROOT/bin/python
    dirs = sorted(glob.glob(str(root / "lib" / "python*" / "site-packages")))
    stamp: list[Any] = []
    for d in [python, *dirs]:
        try:
            stamp.append((d, os.stat(d).st_mtime_ns))
        except OSError:
            stamp.append((d, None))
    return tuple(stamp)


def discover_environment(name: str, env: EnvironmentSection, local: Mapping[str, str]) -> EnvironmentInfo:
    """The plugins of one environment, by running its interpreter (cached until its site-packages change)."""
    key = json.dumps([name, env.python, sorted(local.items()), sorted(env.env.items())])
    stamp = _stamp(env.python)
    with _cache_lock:
        hit = _cache.get(key)
        if hit is not None and hit[0] == stamp:
            return hit[1]
    where = f"[plugins.environments.{name}] python = {env.python}"
    try:
        done = subprocess.run(
            [env.python, "-m", "dicom_node_sdk.discover"],
            input=json.dumps({"local": dict(local)}),
            capture_output=True,
            text=True,
            timeout=DISCOVERY_TIMEOUT,
            env=worker_environ(env.env),
            cwd=neutral_cwd(env.python),
        )
    except subprocess.TimeoutExpired:
        raise EnvironmentError_(
            f"{where}: listing its plugins took longer than {DISCOVERY_TIMEOUT:g} s "
            "(a plugin module that loads a model when imported? load it in setup())"
        ) from None
    except OSError as e:
        raise EnvironmentError_(f"{where}: cannot run it: {e.strerror or e}") from None
    if done.returncode != 0:
        tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        if "No module named 'dicom_node_sdk'" in done.stderr or "No module named dicom_node_sdk" in done.stderr:
            tail = "dicom-node-sdk is not installed there (pip install it into that environment: pip install ./sdk)"
        raise EnvironmentError_(f"{where}: cannot list its plugins: {tail}")
    try:
        data = json.loads(done.stdout)
    except json.JSONDecodeError:
        raise EnvironmentError_(f"{where}: its plugin listing is not JSON: {done.stdout[:200]!r}") from None
    if data.get("protocol") != PROTOCOL:
        raise EnvironmentError_(
            f"{where}: its dicom-node-sdk speaks protocol {data.get('protocol')}, this node "
            f"{PROTOCOL}: install the SDK of this node's version there"
        )
    info = EnvironmentInfo(
        name,
        env.python,
        str(data.get("python", "")),
        dict(data.get("packages", {})),
        dict(data.get("plugins", {})),
        dict(data.get("errors", {})),
    )
    with _cache_lock:
        _cache[key] = (stamp, info)
    return info


# -- all plugins ------------------------------------------------------------------------------------------


def use_paths(paths: list[Path]) -> None:
    """Make the ``[plugins] paths`` folders importable in this process (first on sys.path, each once).

    The node's fork server is started after the rules are compiled (which discovers the plugins) and
    takes this sys.path with it, so the job processes it forks import local plugins from there too.
    """
    for p in reversed(paths):
        folder = str(p)
        if folder not in sys.path:
            sys.path.insert(0, folder)
    if paths:
        importlib.invalidate_caches()


def discover(plugins: PluginsSection | Mapping[str, str] | None = None) -> dict[str, PluginRef]:
    """Every plugin by name: entry points, then environments, then local entries, then commands (later wins).

    Raises EnvironmentError_ when a configured environment cannot list its plugins.
    """
    found: dict[str, PluginRef] = {}
    for ep in entry_points(group=GROUP):
        dist = ep.dist
        found[ep.name] = PluginRef(ep.name, ep.value, dist.name if dist else "", dist.version if dist else "")
    if plugins is None or isinstance(plugins, Mapping):
        for name, target in (plugins or {}).items():
            found[name] = PluginRef(name, target, "config")
        return found
    use_paths(plugins.paths)  # before anything imports a local plugin module
    own = dict(found)  # the node's own entry points

    def add(ref: PluginRef, where: str) -> None:
        """One name, one plugin: a second source for a name is a config error naming both."""
        seen = found.get(ref.name)
        if (
            seen is not None
            and ref.name in own
            and seen is own[ref.name]
            and ref.kind == "environment"
            and ref.target == seen.target
        ):
            return  # the node's own plugin, seen again through an environment's system site-packages
        if seen is not None:
            raise PluginLoadError(
                f"plugin name {ref.name!r} is used twice: {_where(seen)} and {where}; "
                "rename one (a [plugins] local entry can give a plugin another name)"
            )
        found[ref.name] = ref

    for env_name, env in plugins.environments.items():
        local = plugins.local_entries(env_name)
        info = discover_environment(env_name, env, local)
        for name, remote in info.plugins.items():
            source = "config" if name in local else str(remote.get("dist") or "")
            add(
                PluginRef(
                    name,
                    str(remote.get("target", "")),
                    source,
                    str(remote.get("dist_version") or ""),
                    kind="environment",
                    environment=env_name,
                    remote=remote,
                ),
                f"environment {env_name}",
            )
        for name, error in info.errors.items():
            source = "config" if name in local else ""
            add(
                PluginRef(name, local.get(name, ""), source, kind="environment", environment=env_name, error=error),
                f"environment {env_name}",
            )
        for name in local:
            if name not in info.plugins and name not in info.errors:
                raise PluginLoadError(
                    f"[plugins] local {name} names environment {env_name!r}, whose listing does "
                    "not have it (an older dicom-node-sdk there?)"
                )
    for name, target in plugins.local_entries(None).items():
        if name in found and found[name].kind != "local":
            add(PluginRef(name, target, "config"), "[plugins] local")
        found[name] = PluginRef(name, target, "config")  # a local entry may replace an installed plugin, as before
    for name, cmd in getattr(plugins, "commands", {}).items():
        add(PluginRef(name, name, "command", cmd.version, kind="command"), "[plugins.commands]")
    return found


def _where(ref: PluginRef) -> str:
    if ref.kind == "command":
        return "[plugins.commands]"
    if ref.kind == "environment":
        return f"environment {ref.environment}"
    return "[plugins] local" if ref.source == "config" else f"package {ref.source or '?'} in the node's Python"


def load(name: str, target: str) -> PluginInfo:
    """Import a plugin's ``module:attribute`` (in the node's Python) and return it as a PluginInfo."""
    from dicom_node_sdk.loading import as_info

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


@dataclass(frozen=True)
class Described:
    """What any plugin is, whatever its kind: for listings, parameter checks and scheduling."""

    name: str
    version: str
    description: str
    schema: Mapping[str, Any]
    #: "none", "optional" or "required".
    gpu: str
    #: The local plugin itself (kind "local" only).
    info: PluginInfo | None = None
    #: "series" or "study" (a study rule's named inputs: dicom_node_sdk.StudyInput).
    takes: str = "series"


_NO_PARAMS = {"type": "object", "properties": {}, "additionalProperties": False}


def describe(ref: PluginRef, plugins: PluginsSection | None = None) -> Described:
    """A plugin of any kind as a Described; PluginLoadError says why it cannot be used."""
    if ref.kind == "local":
        info = load(ref.name, ref.target)
        return Described(
            info.name,
            info.version,
            info.description,
            info.schema(),
            getattr(info, "gpu", "none"),
            info,
            takes=getattr(info, "takes", "series"),
        )
    if ref.kind == "environment":
        if ref.error or ref.remote is None:
            raise PluginLoadError(
                f"plugin {ref.name!r} in environment {ref.environment!r} cannot be loaded there: "
                f"{ref.error or 'no description'}"
            )
        r = ref.remote
        return Described(
            str(r.get("name") or ref.name),
            str(r.get("version", "")),
            str(r.get("description", "")),
            r.get("schema") or _NO_PARAMS,
            str(r.get("gpu") or "none"),
            takes=str(r.get("takes") or "series"),
        )
    cmd = getattr(plugins, "commands", {}).get(ref.name) if plugins is not None else None
    if cmd is None:
        raise PluginLoadError(f"command plugin {ref.name!r} is not configured")
    return Described(ref.name, cmd.version, cmd.description, _NO_PARAMS, cmd.gpu)


def check_params(described: Described, params: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, message) for each problem with ``params``; [] when they are valid for the plugin.

    A local plugin validates them itself (its Params; raises dicom_node_sdk's ParamsError); the others by
    the JSON schema they report.
    """
    if described.info is not None:
        try:
            described.info.validate_params(dict(params))
        except Exception as e:  # ParamsError (one per problem, pydantic's shape) is formatted by the caller
            if type(e).__name__ == "ParamsError" and hasattr(e, "errors"):
                raise
            return [("", str(e))]
        return []
    import jsonschema

    validator = jsonschema.Draft202012Validator(dict(described.schema))
    out = []
    for err in sorted(validator.iter_errors(dict(params)), key=lambda e: list(e.absolute_path)):
        key = ".".join(str(p) for p in err.absolute_path)
        out.append((key, err.message))
    return out
