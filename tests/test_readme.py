"""README.md works as written, from a clone: its commands exist, and the runnable ones run.

- Every ``dicom-node ...`` the README shows (in a shell block or in the command table) names a command that
  exists, with options that command has (checked against the command line's own tree, as ``--help`` shows it).
- Every line of every ``sh`` block is either run here or listed in ``SKIPPED`` with the reason: a new line in
  README makes this test fail until it is one or the other.
- The runnable lines run in a copy of the repository's files (what a clone has), with a node started there as
  ``scripts/run.sh`` starts it (free ports instead of 11112 and 8080, loopback only).
- Every repository path the README names exists.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import typer
from helpers import REPO, free_port

from node.cli import app
from node.demo.peers import NodeRun

README = REPO / "README.md"

#: Lines of README's sh blocks that are not run here, with the reason.
SKIPPED = {
    "python3 -m pip install -e ./sdk -e .": "installs packages: the tests run in the environment it made",
    "dicom-node demo": "keeps running until Ctrl-C; the demo is tested by tests/e2e/test_demo.py",
    "dicom-node demo --no-keep-running": "takes half a minute with its PACS; tests/e2e/test_demo.py runs it",
    "dicom-node demo --fresh": "tests/e2e/test_demo.py runs the demo twice in one folder",
    "bash scripts/run.sh": "installs packages, then runs until stopped: the node is started here as it starts it",
    "bash scripts/test.sh": "runs this whole test suite",
    "docker compose -f docker/docker-compose.yml up -d": "needs container images and a network: "
    "tests/e2e/test_docker_files.py checks the files",
}

#: Lines run in the clone with the node started: what each must print (besides exiting 0).
RUN_WITH_NODE = {
    "dicom-node echo 127.0.0.1 11112 --aec DICOM_NODE": "status 0x0000",
    "dicom-node send 127.0.0.1 11112 node/demo/data/ct-head --aec DICOM_NODE": "28 sent, 0 failed",
    "dicom-node status": "instances: 28",
    'curl -s -H "Authorization: Bearer $(cat var/web-token)" http://127.0.0.1:8080/api/overview': '"instances"',
}

#: Lines run in the clone without a node.
RUN_ALONE = {
    "cp docker/.env.example docker/.env": "",
}

#: A path in the repository, as the README writes one in backticks.
REPO_PATH = re.compile(r"^(?:docs|scripts|node|config|docker|sdk|examples|tests)/[\w./-]*$")


def fenced_blocks(text: str) -> list[tuple[str, list[str]]]:
    """(language, lines) of each fenced code block."""
    return [(m[1], m[2].splitlines()) for m in re.finditer(r"(?ms)^```(\w*)\n(.*?)^```", text)]


def shell_lines() -> list[str]:
    """Each command of README's sh blocks, without its comment."""
    lines = []
    for lang, block in fenced_blocks(README.read_text()):
        if lang != "sh":
            continue
        for line in block:
            command = _strip_comment(line).strip()
            if command:
                lines.append(command)
    return lines


def _strip_comment(line: str) -> str:
    """The line up to a ``#`` that starts a shell comment (at the start or after a blank, outside quotes)."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i]
    return line


def documented_invocations() -> list[list[str]]:
    """Each ``dicom-node ...`` the README shows, as words after ``dicom-node``.

    In the command table a cell may continue a command: `dicom-node jobs ...` / `jobs show ID` / `retry ID`
    means ``jobs show`` and ``jobs retry``: a continuation that does not start with a command is read under
    the first one's.
    """
    text = README.read_text()
    top = set(command_tree().commands)
    found = [shlex.split(line)[1:] for line in shell_lines() if line.startswith("dicom-node ")]
    for row in re.findall(r"(?m)^\|(.*)\|\s*$", text):
        first_cell = row.split(" | ")[0]
        spans = [s.replace("\\|", "|") for s in re.findall(r"`([^`]+)`", first_cell)]
        if not spans or not spans[0].startswith("dicom-node"):
            continue
        head = spans[0].split()[1:]
        found.append(head)
        for span in spans[1:]:
            words = span.split()
            if words[:1] == ["dicom-node"]:
                found.append(words[1:])
                continue
            group = head[:1] if words and words[0] not in top else []
            found.append(group + words)
    return found


def command_tree() -> Any:
    return typer.main.get_command(app)


def resolve(words: list[str]) -> tuple[Any, list[str], list[str]]:
    """The click command the words name, the sub-command path, and the words after it."""
    cmd, path = command_tree(), []
    rest = list(words)
    while rest and not rest[0].startswith("-") and rest[0] in getattr(cmd, "commands", {}):
        path.append(rest[0])
        cmd = cmd.commands[rest.pop(0)]
    return cmd, path, rest


def option_names(words: list[str]) -> list[str]:
    """The options a documented invocation uses: ``[--state S]`` -> ``--state``, ``--keep-running/--no-...``."""
    names = []
    for w in words:
        w = w.strip("[]()")
        if w.startswith("-") and w not in ("-", "--", "..."):
            names.extend(part for part in w.split("|") if part.startswith("-"))
    return names


def test_every_documented_command_exists_with_its_options():
    invocations = documented_invocations()
    assert len(invocations) >= 20, invocations  # the table and the blocks were read
    for words in invocations:
        if words[:1] == ["COMMAND"]:  # `dicom-node COMMAND --help`: any command
            continue
        cmd, path, rest = resolve(words)
        known = {opt for p in cmd.params for opt in [*p.opts, *p.secondary_opts]} | {"--help", "-h"}
        if not path:
            known |= {"--version"}
        shown = f"dicom-node {' '.join(words)}"
        leftover = [w for w in rest if re.fullmatch(r"[a-z][a-z0-9-]*", w)]
        if getattr(cmd, "commands", None) and leftover:
            pytest.fail(f"README shows `{shown}`: {leftover[0]!r} is not a sub-command of {' '.join(path) or 'it'}")
        for name in option_names(rest):
            assert name in known, f"README shows `{shown}`: dicom-node {' '.join(path)} has no option {name}"


def test_every_readme_shell_line_is_run_or_skipped_with_a_reason():
    lines = shell_lines()
    assert lines, "README.md has no sh blocks"
    unknown = [line for line in lines if line not in SKIPPED and line not in RUN_WITH_NODE and line not in RUN_ALONE]
    assert unknown == [], "run these in tests/test_readme.py or list them in SKIPPED with the reason"
    stale = [line for line in [*SKIPPED, *RUN_WITH_NODE, *RUN_ALONE] if line not in lines]
    assert stale == [], "README no longer has these lines: drop them here"


def test_every_path_the_readme_names_exists():
    text = README.read_text()
    names = {s for s in re.findall(r"`([^`\s]+)`", text) if REPO_PATH.match(s)}
    names |= {m for m in re.findall(r"\]\(((?:docs|scripts|docker)/[^)#\s]+)\)", text)}
    assert len(names) > 10, names
    missing = sorted(n for n in names if not (REPO / n).exists())
    assert missing == []


def clone(into: Path) -> Path:
    """The repository's files as a clone has them (tracked and new ones, none that git ignores)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (n.decode() for n in listed)):
        src = REPO / name
        if src.is_file():
            dst = into / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)
    return into


def run_line(line: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A README line in bash, ``dicom-node`` being this Python's ``python -m node`` (README: the same)."""
    script = f'dicom-node() {{ "{sys.executable}" -m node "$@"; }}\n{line}'
    return subprocess.run(["bash", "-c", script], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.e2e
def test_the_runnable_readme_lines_run_in_a_clone(tmp_path: Path):
    root = clone(tmp_path / "dicom-node")
    port, web_port = free_port(), free_port()
    env = {
        **os.environ,
        "DICOM_NODE_NODE__PORT": str(port),
        "DICOM_NODE_NODE__HOST": "127.0.0.1",
        "DICOM_NODE_NODE__MIN_FREE_MB": "0",
        "DICOM_NODE_WEB__PORT": str(web_port),
    }
    for line, shows in RUN_ALONE.items():
        r = run_line(line, root, env)
        assert r.returncode == 0, f"{line}\n{r.stdout}{r.stderr}"
        assert shows in r.stdout
    assert (root / "docker" / ".env").is_file()

    node = NodeRun(root / "config" / "node.toml", port, tmp_path / "node.log", cwd=root, env=env)
    node.start(timeout=60)
    try:
        for line, shows in RUN_WITH_NODE.items():
            as_here = line.replace("11112", str(port)).replace("8080", str(web_port))
            r = run_line(as_here, root, env)
            assert r.returncode == 0, f"{line}\n{r.stdout}{r.stderr}"
            assert shows in r.stdout, f"{line}\n{r.stdout}{r.stderr}"
    finally:
        node.stop(30)
    assert "Traceback" not in (tmp_path / "node.log").read_text(errors="replace")
