"""Keeping stdout for the one JSON answer: whatever a plugin prints goes to stderr (the node's log)."""

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
