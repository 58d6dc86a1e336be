"""The demo's data directory: made by the demo, marked as such, and the only thing ``--fresh`` ever deletes."""

from __future__ import annotations

import fcntl
import os
import shutil
from pathlib import Path
from typing import IO

MARKER = ".dicom-node-demo"
LOCK = "demo.lock"


class WorkdirError(RuntimeError):
    pass


def _remove(p: Path) -> None:
    if p.is_symlink() or not p.is_dir():
        p.unlink()
    else:
        shutil.rmtree(p)


def prepare(path: Path, *, fresh: bool) -> IO[str]:
    """Make ``path`` ready for a demo run and return its lock (held, open, for as long as the demo runs).

    A directory is only ever emptied when it carries the marker file this function writes, so a
    mistyped ``--data-dir`` pointing at real data is refused, never deleted.
    """
    if path.exists() and not path.is_dir():
        raise WorkdirError(f"{path} exists and is not a directory; choose another --data-dir")
    marker = path / MARKER
    if path.is_dir() and not marker.is_file() and any(path.iterdir()):
        raise WorkdirError(
            f"{path} is not empty and was not made by `dicom-node demo` (no {MARKER} file in it); "
            "nothing in it was touched. Choose an empty or new folder with --data-dir."
        )
    path.mkdir(parents=True, exist_ok=True)
    lock = open(path / LOCK, "a+")  # noqa: SIM115 - held open until the demo ends
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        lock.close()
        raise WorkdirError(
            f"another demo is running with {path}; stop it (Ctrl-C) or choose another --data-dir"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    leftovers = [p for p in path.iterdir() if p.name not in (MARKER, LOCK)]
    if leftovers and not fresh:
        lock.close()
        raise WorkdirError(
            f"{path} holds an earlier demo run; pass --fresh to delete it and start again "
            "(or choose another --data-dir)"
        )
    for p in leftovers:
        _remove(p)
    marker.write_text("This folder was made by `dicom-node demo`; `dicom-node demo --fresh` may delete its contents.\n")
    return lock
