"""Python environments for plugin tests: real venvs whose packages differ from the node's.

A plugin environment in production is a separate interpreter (a venv, a conda env) with its own
numpy, pydicom, torch...; the tests make such venvs with ``python -m venv`` and pip, once per
content (cached under ``~/.cache/dicom-node-test-envs/<hash>``, so a second run and the CI run on the
same machine reuse them). Editable installs of the repo's ``sdk/`` and ``examples/`` keep a cached
env current with the working tree.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

CACHE = Path(os.environ.get("DICOM_NODE_TEST_ENVS", Path.home() / ".cache" / "dicom-node-test-envs"))

#: numpy and pydicom of the previous major versions: what the node itself does not run.
OLD_STACK = ["numpy<2", "pydicom<3"]


def make_env(
    packages: list[str],
    editable: list[Path] = (),
    *,
    tag: str = "env",  # type: ignore[assignment]
    python: str | Path | None = None,
) -> Path:
    """The python of a venv with ``packages`` (pip requirement strings) and ``editable`` folders installed.

    ``python`` makes the venv (another Python version; default: the one running the tests). Built once
    per distinct content and kept; built under a lock, so concurrent test processes wait for one build.
    Raises RuntimeError with pip's output when the environment cannot be built.
    """
    base = str(python or sys.executable)
    version = (
        sys.version_info[:2]
        if python is None
        else subprocess.run(
            [base, "-c", "import sys; print(sys.version_info[:2])"], capture_output=True, text=True, check=True
        ).stdout.strip()
    )
    key = json.dumps(
        [version, sorted(packages), [str(Path(p).resolve()) for p in editable]] + ([base] if python else [])
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = CACHE / f"{tag}-{digest}"
    python = root / "bin" / "python"
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / f"{tag}-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / ".complete").exists() and python.exists():
            return python
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run([base, "-m", "venv", str(root)], check=True, capture_output=True, timeout=300)
        args = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", *packages]
        for folder in editable:
            args += ["-e", str(folder)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=900)
        if done.returncode:
            raise RuntimeError(f"could not build the test environment {root}: {done.stdout}\n{done.stderr}")
        (root / ".complete").write_text(key)
        return python


def sdk_env(packages: list[str] = OLD_STACK, editable: list[Path] = ()) -> Path:  # type: ignore[assignment]
    """A venv with the SDK (editable, from this repo) plus ``packages``: the old numpy/pydicom by default."""
    return make_env(list(packages), [REPO / "sdk", *editable], tag="sdk")
