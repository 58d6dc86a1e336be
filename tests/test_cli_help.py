"""Every ``--help`` of the command line reads as written: no bracketed config name is lost on the way."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import typer
from typer.testing import CliRunner

from node.cli import app

#: A config name as the help writes it: [retention], [[web.users]], [plugins.local].
CONFIG_NAME = re.compile(r"\[\[?[a-z_][\w.]*\]\]?")


def commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    """Every command and sub-command under ``command`` (typer's own click objects), with the words that invoke it."""
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from commands(sub, (*path, name))


def written_help(cmd: Any) -> str:
    """The help texts the command's author wrote: its docstring and its visible options' and arguments' help."""
    texts = [cmd.help or ""]
    texts += [getattr(p, "help", None) or "" for p in cmd.params if not getattr(p, "hidden", False)]
    return "\n".join(texts)


def flat(text: str) -> str:
    return " ".join(text.split())


def test_every_help_shows_every_config_name_it_was_written_with():
    tree = list(commands(typer.main.get_command(app)))
    assert len(tree) > 20, [" ".join(p) for p, _ in tree]  # the walk reached the sub-commands
    checked = 0
    for path, cmd in tree:
        r = CliRunner().invoke(app, [*path, "--help"], terminal_width=100)
        assert r.exit_code == 0, f"dicom-node {' '.join(path)} --help: {r.output}"
        shown = flat(r.output)
        assert flat(cmd.help or "").split(".")[0] in shown, f"dicom-node {' '.join(path)} --help:\n{r.output}"
        for name in CONFIG_NAME.findall(written_help(cmd)):
            assert name in shown, f"dicom-node {' '.join(path)} --help lost {name!r}:\n{r.output}"
            checked += 1
    # The help names config sections in several places ([[web.users]], [retention], ...): they were checked.
    assert checked >= 2


def test_an_error_message_keeps_its_brackets(tmp_path):
    """An error names the setting to change; a bracketed section in it is printed, not read as markup."""
    missing = tmp_path / "[retention]" / "x.dcm"
    r = CliRunner().invoke(app, ["send", "127.0.0.1", "104", str(missing)])
    assert r.exit_code == 2
    assert f"no such file or folder: {missing}" in flat(r.output)


def test_the_demo_error_keeps_its_brackets():
    r = CliRunner().invoke(app, ["demo", "--pacs", "[retention]"])
    assert r.exit_code == 2
    assert "not '[retention]'" in r.output, r.output
