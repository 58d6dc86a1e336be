"""Imported only in the plugin fork server (as a preload): it must not outlive the node, nor let plugins outlive it.

Python's fork server stays up while any plugin process it forked runs, and a
plugin process would outlive a node killed with SIGKILL, writing into a data
directory the next start has cleaned. The kernel's parent-death signal ties
the fork server to the node, and (set again in each child, see
:func:`contain`) each plugin process to the fork server.

A plugin may start processes of its own, and they may leave its process
group and session (setsid). Each plugin process leads a process group and is
a child subreaper, so its orphans stay under it where the node's
``runtime.kill_tree`` finds them; the fork server is a subreaper too (it
adopts what a plugin process that ended left behind) and, when the node
ends, kills every process under it before it exits.
"""

from __future__ import annotations

import atexit
import os
import signal
import warnings
from types import FrameType

import psutil

from node.plugins.runtime import PR_SET_CHILD_SUBREAPER, die_with_parent, kill_descendants, prctl

#: This fork server's pid, which its plugin processes inherit (their expected parent).
_server_pid = 0


def contain() -> None:
    """In a plugin process, first thing: lead a process group, adopt orphans, die with the fork server."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the fork server's handler below
    try:
        os.setpgid(0, 0)
    except OSError:  # the tree is still found through the subreaper's parent links
        pass
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    die_with_parent(signal.SIGKILL, _server_pid)


def _end_everything(signum: int, frame: FrameType | None) -> None:
    """The node ended: kill every plugin process with all it started, then end the fork server."""
    try:
        kill_descendants(psutil.Process())
    finally:
        os._exit(0)


def _serve_contained() -> None:
    global _server_pid
    _server_pid = os.getpid()
    signal.signal(signal.SIGTERM, _end_everything)
    # The fork server also ends by itself when the node closes its pipe (a clean stop), possibly before
    # the parent-death signal: what a killed plugin process left behind was adopted here and goes too.
    atexit.register(lambda: kill_descendants(psutil.Process()) if os.getpid() == _server_pid else None)
    prctl(PR_SET_CHILD_SUBREAPER, 1)
    # The fork server reaps the adopted orphans too, and would warn about each one.
    warnings.filterwarnings("ignore", message="forkserver: waitpid returned unexpected pid")
    die_with_parent(signal.SIGTERM, os.getppid())


_serve_contained()


def warm_up() -> None:
    """Load once, here, what every plugin job would otherwise load itself (shared copy-on-write by the jobs)."""
    try:
        import scipy.ndimage  # noqa: F401  (the built-in plugins use it)
        from highdicom._standard_utils import get_module_attribute_map

        get_module_attribute_map()  # highdicom's standard tables: ~65 MiB and 0.3 s on first use
    except Exception:  # a private helper may move in another highdicom version: only slower then
        pass
    from node.derive.validate import preload

    preload()  # the IOD tables every output is validated against: ~0.6 s once here, not in every job


warm_up()
