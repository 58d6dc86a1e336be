"""Child processes that cannot outlive the demo."""

from __future__ import annotations

import ctypes
import ctypes.util
import signal
import sys

_PR_SET_PDEATHSIG = 1


def child_preexec() -> None:
    """In the child, before exec: on Linux, ask for SIGTERM when the demo process dies.

    The demo stops its children itself on every normal path (and on Ctrl-C); this covers the
    demo being killed outright, so that no node or Orthanc is left running behind it.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except OSError:
        pass
