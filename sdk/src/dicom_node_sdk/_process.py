"""What the worker and discovery do to their own process: stdout kept for the one JSON answer (whatever a
plugin prints goes to stderr, the node's log), and an import path free of the directory they were started in."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, TextIO


def take_stdout() -> TextIO:
    """A private handle on the real stdout; from now on fd 1 (print, C libraries) writes to stderr.

    A plugin that prints while it is imported or set up would otherwise corrupt the answer the node
    parses, and a worker whose stdout nobody reads any more would block once the pipe is full.
    """
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    return os.fdopen(saved, "w", encoding="utf-8")


def answer(out: TextIO, obj: Any) -> None:
    """One JSON line on the saved stdout, which is then closed (the node reads to the end of the line)."""
    out.write(json.dumps(obj, separators=(",", ":")) + "\n")
    out.flush()
    out.close()


def forget_working_directory() -> None:
    """Drop the current directory that ``python -m`` puts first on sys.path.

    A worker or discovery run must see the environment's packages, not whatever lies in the directory
    the node was started from (a checkout with ``*.egg-info`` would add its entry points, a folder named
    like a module would shadow it). PYTHONPATH entries stay.
    """
    if sys.path and sys.path[0] in ("", os.getcwd()):
        del sys.path[0]
