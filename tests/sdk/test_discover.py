"""``python -m dicom_node_sdk.discover`` in another environment: installed entry points, local entries, and
plugins that cannot be loaded, each with its reason, in one JSON answer on stdout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import plugin_env, python_of

PACKAGE = {
    "pyproject.toml": """
[build-system]
requires = ["setuptools>=64"]
build-backend = "setuptools.build_meta"

[project]
name = "sdk-demo-plugin"
version = "0.3"
dependencies = ["dicom-node-sdk"]

[project.entry-points."dicom_node.plugins"]
demo-sphere = "demo_pkg:sphere"
demo-broken = "demo_pkg:missing"

[tool.setuptools]
packages = ["demo_pkg"]
""",
    "demo_pkg/__init__.py": '''
"""A plugin package as a user would install it; it prints when imported (that must not reach stdout)."""
from dataclasses import dataclass

from dicom_node_sdk import plugin

print("demo_pkg imported")


@dataclass
class Params:
    radius_mm: float = 20.0


@plugin(name="demo-sphere", version="0.3", params=Params, gpu="required")
def sphere(series, params):
    """A sphere in the middle."""
    return []
''',
}


@pytest.fixture(scope="module")
def demo_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The package built as a wheel (offline, with the node's setuptools)."""
    src = tmp_path_factory.mktemp("demo-src")
    for name, text in PACKAGE.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_text(text)
    out = tmp_path_factory.mktemp("wheels")
    r = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    return next(out.glob("*.whl"))


def discover(python: str, request: object, path: list[Path] = ()) -> tuple[int, dict, str]:  # type: ignore[assignment]
    r = subprocess.run(
        [python, "-m", "dicom_node_sdk.discover"],
        input=json.dumps(request),
        capture_output=True,
        text=True,
        timeout=120,
        env=plugin_env(path),
    )
    return r.returncode, json.loads(r.stdout) if r.returncode == 0 else {}, r.stderr


@pytest.mark.parametrize("kind", ["old", "py39"])
def test_discovery_lists_installed_and_local_plugins_and_why_others_cannot_load(kind, demo_wheel, tmp_path):
    python = python_of(kind)
    site = tmp_path / "site"
    r = subprocess.run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--disable-pip-version-check",
            "--target",
            str(site),
            str(demo_wheel),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    local = {
        "sdk-organs": "sdk_plugins:Organs",
        "nope": "no_such_module:plugin",
        "number": "sdk_plugins:not_a_plugin",
        "short": {"entry": "sdk_plugins:plain", "environment": "x"},
    }
    code, out, err = discover(python, {"local": local}, [site])
    assert code == 0, err
    assert "demo_pkg imported" in err  # a plugin's print goes to the log, stdout stays JSON
    assert out["protocol"] == 1 and out["python"].startswith("3.9." if kind == "py39" else "3.11.")
    assert out["packages"]["numpy"].startswith("1.") and out["packages"]["pydicom"].startswith("2.")
    assert out["packages"]["sdk-demo-plugin"] == "0.3" and "pydantic" not in out["packages"]
    assert sorted(out["plugins"]) == ["demo-sphere", "sdk-organs", "short"]
    demo = out["plugins"]["demo-sphere"]
    assert {
        k: demo[k] for k in ("name", "version", "target", "gpu", "setup", "dist", "dist_version", "description")
    } == {
        "name": "demo-sphere",
        "version": "0.3",
        "target": "demo_pkg:sphere",
        "gpu": "required",
        "setup": False,
        "dist": "sdk-demo-plugin",
        "dist_version": "0.3",
        "description": "A sphere in the middle.",
    }
    assert demo["schema"]["properties"]["radius_mm"] == {"title": "Radius Mm", "type": "number", "default": 20.0}
    assert demo["family"] == ["123110", "DCM", "Artificial Intelligence"]
    organs = out["plugins"]["sdk-organs"]
    assert (organs["setup"], organs["gpu"], organs["dist"]) == (True, "optional", "")
    assert organs["schema"]["properties"]["kind"] == {
        "title": "Kind",
        "enum": ["labelmap", "binary"],
        "type": "string",
        "default": "labelmap",
    }
    assert out["errors"] == {
        "demo-broken": "cannot be loaded: AttributeError: module 'demo_pkg' has no attribute 'missing' "
        "(entry demo_pkg:missing)",
        "nope": "cannot be loaded: ModuleNotFoundError: No module named 'no_such_module' (entry no_such_module:plugin)",
        "number": "cannot be loaded: plugin 'number' is a int; decorate a function with @plugin(...) or subclass "
        "dicom_node_sdk.Plugin (node.plugins.api.Plugin) (entry sdk_plugins:not_a_plugin)",
    }


def test_discovery_in_the_nodes_own_python_sees_the_built_in_plugins():
    code, out, err = discover(sys.executable, {})
    assert code == 0, err
    threshold = out["plugins"]["threshold-seg"]
    assert threshold["dist"] == "dicom-node" and threshold["target"] == "node.plugins.builtin.threshold:threshold_seg"
    assert "segments" in threshold["schema"]["properties"]  # a pydantic model's schema


def test_a_request_that_is_not_json_is_refused_with_the_reason():
    r = subprocess.run(
        [sys.executable, "-m", "dicom_node_sdk.discover"], input="local = 1", capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 2 and r.stdout == ""
    assert "bad request on stdin" in r.stderr
    code, out, err = discover(sys.executable, {"local": ["a:b"]})
    assert code == 2 and '"local" must be an object' in err
