"""Compiling the rules (node.decide.compile): every problem a ConfigError naming the file and the key to change.

Loading the config only reads its tables; compiling checks command plugins' templates, discovers the
plugins, lets each plugin check its parameters and compiles the rules. An administrator sees the same
messages as when loading did all of it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from node.config import ConfigError, load_config
from node.decide.compile import compile_rules, load_checked_config

HEADER = """
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 104

[plugins]
local = { seg = "node.plugins.builtin.threshold:threshold_seg" }
"""

RULE = """
[[rules]]
name = "bones"
match = { Modality = "CT" }
[[rules.actions]]
type = "plugin"
plugin = "seg"
params = { segments = [{ label = "Bone", lower = 300 }] }
send_to = ["pacs"]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "node.toml"
    path.write_text(text)
    return path


def compile_error(path: Path) -> list[str]:
    cfg = load_config(path, environ={})  # the tables themselves are valid
    with pytest.raises(ConfigError) as e:
        compile_rules(cfg)
    return str(e.value).splitlines()


def test_loading_reads_the_rules_as_tables_and_compiling_makes_the_ruleset(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, HEADER + RULE), environ={})
    assert cfg.rules[0]["name"] == "bones"
    assert cfg.ruleset is None
    ruleset = compile_rules(cfg)
    assert [r.name for r in ruleset] == ["bones"]
    assert load_checked_config(write(tmp_path, HEADER + RULE), environ={}).ruleset.get("bones") is not None


def test_a_parameter_the_plugin_refuses_names_its_key(tmp_path: Path) -> None:
    bad = RULE.replace("lower = 300", "lower = 900, upper = 100")
    path = write(tmp_path, HEADER + bad)
    lines = compile_error(path)
    assert lines[0] == f"invalid rules in {path}:"
    assert lines[1].startswith('  rules[0] ("bones").actions[0].params.segments[0]: '), lines
    assert "lower (900.0) is above upper (100.0)" in lines[1], lines


def test_an_unknown_parameter_names_its_key(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + RULE.replace("params = {", "params = { threshold = 3,"))
    lines = compile_error(path)
    assert lines[1] == '  rules[0] ("bones").actions[0].params.threshold: Extra inputs are not permitted', lines


def test_an_unknown_plugin_names_the_action(tmp_path: Path) -> None:
    path = write(tmp_path, HEADER + RULE.replace('plugin = "seg"', 'plugin = "lung-seg"'))
    lines = compile_error(path)
    assert lines[0] == f"invalid rules in {path}:"
    assert lines[1].startswith("  rules[0] (\"bones\").actions[0].plugin: unknown plugin 'lung-seg' (installed: "), (
        lines
    )


def test_a_plugin_that_cannot_be_imported_is_reported_for_the_rule_that_uses_it(tmp_path: Path) -> None:
    header = HEADER.replace("node.plugins.builtin.threshold:threshold_seg", "no_such_module_here:seg")
    path = write(tmp_path, header + RULE)
    lines = compile_error(path)
    assert lines[0] == f"invalid rules in {path}:"
    assert "rules[0] (\"bones\").actions[0].plugin: plugin 'seg' (no_such_module_here:seg) cannot be loaded" in lines[1]


def test_an_unusable_environment_is_reported_as_invalid_plugins(tmp_path: Path) -> None:
    """An environment whose interpreter has no dicom-node-sdk cannot list its plugins."""
    plain = tmp_path / "python-without-the-sdk"
    plain.write_text("#!/bin/sh\nexit 1\n")
    plain.chmod(0o755)
    path = write(tmp_path, HEADER + f'[plugins.environments.bare]\npython = "{plain}"\n')
    cfg = load_config(path, environ={})
    with pytest.raises(ConfigError) as e:
        compile_rules(cfg)
    assert str(e.value).startswith(f"invalid plugins in {path}: "), e.value
    assert "bare" in str(e.value)


def test_a_command_plugins_template_that_is_not_json_names_the_key(tmp_path: Path) -> None:
    """A [plugins.commands.NAME] metainfo is read when the rules are compiled, reported as the config's key."""
    notjson = tmp_path / "metainfo.json"
    notjson.write_text("segments: bone\n")
    command = f'[plugins.commands.labels]\ncommand = ["{sys.executable}", "{{input}}", "{{output}}"]\n'
    path = write(tmp_path, HEADER + command + f'metainfo = "{notjson}"\n')
    lines = compile_error(path)
    assert lines[0] == f"invalid configuration in {path}:"
    assert lines[1].startswith(f"  plugins.commands.labels.metainfo: {notjson} is not JSON"), lines
    assert lines[1].endswith(f"(got {str(notjson)!r})"), lines


def test_a_bad_template_and_bad_rules_are_named_in_one_error(tmp_path: Path) -> None:
    """rules check names every problem of the file: a command plugin's template does not hide the rules' mistakes."""
    missing = tmp_path / "nowhere.json"
    command = f'[plugins.commands.labels]\ncommand = ["{sys.executable}"]\nmetainfo = "{missing}"\n'
    rule = RULE.replace("Modality", "Modalty").replace('send_to = ["pacs"]', 'send_to = ["pascs"]')
    path = write(tmp_path, HEADER + command + rule)
    lines = compile_error(path)
    assert lines[0] == f"invalid configuration in {path}:"
    assert lines[1].startswith("  plugins.commands.labels.metainfo: cannot read the segment template"), lines
    assert lines[2] == f"invalid rules in {path}:", lines
    assert [line.split(":")[0] for line in lines[3:]] == [
        '  rules[0] ("bones").actions[0].send_to',
        '  rules[0] ("bones").match.Modalty',
    ], lines


def test_a_command_plugins_missing_template_names_the_key(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere.json"
    command = f'[plugins.commands.labels]\ncommand = ["{sys.executable}"]\nmetainfo = "{missing}"\n'
    lines = compile_error(write(tmp_path, HEADER + command))
    assert lines[1].startswith(f"  plugins.commands.labels.metainfo: cannot read the segment template {missing}"), lines


def test_source_names_where_the_config_came_from(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, HEADER + RULE.replace('plugin = "seg"', 'plugin = "nope"')), environ={})
    with pytest.raises(ConfigError, match=r"^invalid rules in the dashboard's copy:"):
        compile_rules(cfg, "the dashboard's copy")
