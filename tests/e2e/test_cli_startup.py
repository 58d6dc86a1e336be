"""What the command line imports at start: read-only commands never import plugin code or heavy libraries.

An on-call admin runs ``dicom-node status`` / ``queue`` / ``jobs`` where a local plugin's module may not be
importable (the service's PYTHONPATH is not the shell's): those commands only read the index. ``--help`` imports
typer and rich only. Which modules a command imports is checked with ``python -X importtime`` in a fresh process
(scripts/bench/bench_cli_startup.py measures the time; no time is asserted here).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO
from helpers.site_plugin import VERSION, write_site_plugin

from node.config import ConfigError, load_config

#: Libraries a read-only command has no use for (the DICOM stack, the web server, migrations, plugin code).
HEAVY = ("numpy", "pydicom", "highdicom", "pynetdicom", "fastapi", "starlette", "PIL", "alembic", "dicom_node_sdk")
#: Parts of the node that compile rules, import plugins or speak DICOM.
NOT_FOR_READING = ("node.plugins", "node.decide", "node.derive", "node.send", "node.receive", "node.web")
#: What an index on SQLite has no use for: SQLAlchemy's PostgreSQL dialect (~20 ms; loaded by a PostgreSQL engine).
NOT_ON_SQLITE = ("sqlalchemy.dialects.postgresql",)


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """``python -m node ARGS`` in a fresh process; its result and every module it imported."""
    r = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "node", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    modules = {
        line.split("|")[2].strip()
        for line in r.stderr.splitlines()
        if line.startswith("import time:") and "imported package" not in line
    }
    return r, modules


def offending(modules: set[str]) -> list[str]:
    return sorted(
        m
        for m in modules
        if m.split(".")[0] in HEAVY or any(m == p or m.startswith(p + ".") for p in NOT_FOR_READING + NOT_ON_SQLITE)
    )


def messages(r: subprocess.CompletedProcess[str]) -> str:
    """stderr without importtime's lines."""
    return "\n".join(line for line in r.stderr.splitlines() if not line.startswith("import time:"))


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A node's config whose rule uses a local plugin, and an index the node has made (migrated, empty)."""
    from node.index.db import make_engine, migrate

    data = tmp_path / "data"
    data.mkdir()
    local = write_site_plugin(tmp_path / "opt-plugins", "site_bone_h4")
    config = tmp_path / "node.toml"
    config.write_text(f"""
[node]
data_dir = "{data}"
[plugins]
local = {{ bone = "{local}" }}
[[rules]]
name = "ct-bone"
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "bone", params = {{ lower = 250 }} }}]
""")
    engine = make_engine(load_config(config, environ={}).database_url)
    try:
        migrate(engine)
    finally:
        engine.dispose()
    return config


def test_help_imports_only_the_command_line():
    r, modules = run_cli("--help")
    assert r.returncode == 0, messages(r)
    assert "Usage" in r.stdout and "status" in r.stdout
    assert offending(modules) == []
    assert sorted(m for m in modules if m.startswith("node")) == ["node", "node.cli", "node.demo"]
    assert "node.config" not in modules and "sqlalchemy" not in modules


@pytest.mark.parametrize(
    ("args", "shows"),
    [
        (["status"], "patients: 0"),
        (["queue"], "nothing was ever queued"),
        (["queue", "--state", "failed"], "deliveries (failed)"),
        (["jobs"], "jobs"),
        (["jobs", "--state", "failed"], "jobs (failed)"),
        (["audit"], "(no events)"),
    ],
)
def test_read_only_commands_answer_without_the_plugin_code(site: Path, args: list[str], shows: str):
    """The plugin's module is not importable here (its folder is not on any path): reading still works.

    The index is SQLite, so the PostgreSQL dialect is not imported either.
    """
    r, modules = run_cli(*args, "--config", str(site))
    assert r.returncode == 0, messages(r)
    assert shows in r.stdout
    assert offending(modules) == [], f"dicom-node {' '.join(args)} imported them"


def test_commands_that_compile_the_rules_import_local_plugins_from_plugin_paths(site: Path):
    # Without [plugins] paths the rules cannot be checked: the error names the module that is missing.
    r, _ = run_cli("rules", "check", "--config", str(site))
    assert r.returncode == 2
    assert "No module named 'site_bone_h4'" in messages(r)

    folder = site.parent / "opt-plugins"
    site.write_text(site.read_text().replace("[plugins]\n", f'[plugins]\npaths = ["{folder}"]\n'))
    r, _ = run_cli("rules", "check", "--config", str(site))
    assert r.returncode == 0, messages(r)
    assert "ct-bone" in r.stdout and "bone" in r.stdout
    r, _ = run_cli("plugins", "--config", str(site))
    assert r.returncode == 0, messages(r)
    assert f"bone {VERSION}" in r.stdout and "lower: number = 300" in r.stdout


def test_a_plugin_path_that_is_not_a_folder_is_a_config_error_naming_the_key(tmp_path: Path):
    config = tmp_path / "node.toml"
    config.write_text(f'[plugins]\npaths = ["{tmp_path / "no-such-folder"}"]\n')
    with pytest.raises(ConfigError) as e:
        load_config(config, environ={})
    assert "plugins.paths:" in str(e.value) and "no-such-folder' does not exist" in str(e.value)
    config.write_text(f'[plugins]\npaths = ["{config}"]\n')
    with pytest.raises(ConfigError, match=r"plugins\.paths: .*node\.toml' is not a folder"):
        load_config(config, environ={})


def test_plugin_paths_are_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A relative folder is taken from where the node starts, as data_dir is, and kept absolute."""
    (tmp_path / "plugins").mkdir()
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "node.toml"
    config.write_text('[plugins]\npaths = ["plugins"]\n')
    assert load_config(config, environ={}).plugins.paths == [tmp_path / "plugins"]
