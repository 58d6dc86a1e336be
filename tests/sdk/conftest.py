"""Fixtures for the SDK tests: interpreters (the node's own and other environments), a real series, workers."""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # sdk_plugins, for the reference computation in this process

from helpers import REPO, series_files  # noqa: E402
from helpers.envs import OLD_STACK, make_env, sdk_env  # noqa: E402


def _python39() -> str | None:
    """An older Python for the SDK's "3.9+" promise, where this machine has one (a pyenv shim may not run)."""
    candidates = [*sorted(Path.home().glob(".pyenv/versions/3.9*/bin/python")), shutil.which("python3.9")]
    for c in filter(None, candidates):
        if subprocess.run([str(c), "-c", "import venv"], capture_output=True).returncode == 0:
            return str(c)
    return None


PY39 = _python39()


def python_of(kind: str) -> str:
    """The interpreter of an environment kind: "node" (this one), "old" (numpy 1, pydicom 2), "py39"."""
    if kind == "node":
        return sys.executable
    if kind == "old":
        return str(sdk_env())
    if PY39 is None:
        pytest.skip("no Python 3.9 on this machine")
    return str(make_env(OLD_STACK, [REPO / "sdk"], tag="sdk", python=PY39))


@pytest.fixture(scope="module", params=["node", "old", "py39"])
def python(request: pytest.FixtureRequest) -> str:
    return python_of(request.param)


@pytest.fixture(scope="module")
def old_python() -> str:
    return python_of("old")


def plugin_env(extra_path: list[Path] = ()) -> dict[str, str]:  # type: ignore[assignment]
    """The environment a plugin process gets: the test plugins importable, nothing of this process's path."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME")}
    env["PYTHONPATH"] = os.pathsep.join(str(p) for p in [*extra_path, HERE])
    return env


@dataclass
class WorkerProcess:
    proc: subprocess.Popen
    socket: str
    ready: dict[str, Any]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)

    def stderr(self) -> str:
        self.stop()
        return self.proc.stderr.read() if self.proc.stderr else ""


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """The first line of a process's stdout, waiting at most ``timeout`` s."""
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    if not ready:
        proc.kill()
        raise AssertionError(f"no line on stdout within {timeout} s")
    return proc.stdout.readline()  # type: ignore[union-attr]


def start_worker(python: str, plugin: str, folder: Path) -> WorkerProcess:
    sock = str(folder / f"w{len(list(folder.glob('*.sock')))}.sock")
    proc = subprocess.Popen(
        [python, "-m", "dicom_node_sdk.worker", "--socket", sock, "--plugin", plugin],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=plugin_env(),
    )
    line = read_line(proc, 120)
    return WorkerProcess(proc, sock, json.loads(line) if line.strip() else {"ready": False, "error": "no line"})


@pytest.fixture
def workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """Starts workers (in a short folder: a Unix socket path has at most 107 bytes); kills them afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="sdk-", dir="/tmp"))
    started: list[WorkerProcess] = []

    def start(python: str, plugin: str) -> WorkerProcess:
        w = start_worker(python, plugin, folder)
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop()
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def ct_series(shared_data: Path) -> Any:
    """The 28-slice CT head (512x512) as the node loads it for a plugin."""
    from node.plugins.series import load_series

    return load_series(series_files("ct-head-philips-5mm"))


@pytest.fixture
def exchange(tmp_path: Path) -> Path:
    """Where the arrays of one test's requests go (the node uses /dev/shm the same way)."""
    d = Path(tempfile.mkdtemp(prefix="sdk-x-", dir="/dev/shm" if os.access("/dev/shm", os.W_OK) else tmp_path))
    yield d
    shutil.rmtree(d, ignore_errors=True)
