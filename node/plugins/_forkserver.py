"""Imported only in the plugin fork server (as a preload): it must not outlive the node.

Python's fork server stays up while any plugin process it forked runs, and a
plugin process would outlive a node killed with SIGKILL, writing into a data
directory the next start has cleaned. The kernel's parent-death signal ties
the fork server to the node, and (set again in each child, see
:func:`die_with_parent`) each plugin process to the fork server.
"""

from __future__ import annotations

import ctypes
import os
import signal

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent ends (Linux)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the timeout still bounds a plugin run
        return
    if os.getppid() == 1:  # the parent died before the request took effect
        os._exit(1)


die_with_parent()


def warm_up() -> None:
    """Load once, here, what every plugin job would otherwise load itself (shared copy-on-write by the jobs)."""
    try:
        import scipy.ndimage  # noqa: F401  (the built-in plugins use it)
        from highdicom._standard_utils import get_module_attribute_map

        get_module_attribute_map()  # highdicom's standard tables: ~65 MiB and 0.3 s on first use
    except Exception:  # a private helper may move in another highdicom version: only slower then
        pass


warm_up()
