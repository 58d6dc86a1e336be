"""node.app.Receivers, the supervisor of ``[node] processes``, with real child processes.

The children here are small Python programs speaking the receivers' pipe protocol through the real
:class:`node.app.ParentLink` (the node itself is exercised end to end in
tests/e2e/receive/test_processes.py): a child's "jobs made" reaches the job runner's wake through the
pipe alone (nothing here polls), a child that dies is started again and /readyz says so meanwhile,
and stopping sends SIGTERM and waits for the child to finish.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from pathlib import Path

import psutil
from helpers import wait_for

from node.app import Receivers

# A receiver stand-in: says it listens, makes "jobs" once, and on SIGTERM writes a marker and exits 0.
CHILD = """
import os, signal, sys, time
from node.app import JOBS, READY, ParentLink
link = ParentLink(int(sys.argv[1]), int(sys.argv[2]))
def stop(*_):
    open(sys.argv[3], "a").write(f"{os.getpid()} stopped\\n")
    sys.exit(0)
signal.signal(signal.SIGTERM, stop)
link.tell(READY)
link.tell(JOBS)
while True:
    time.sleep(0.1)
"""


class StandIns(Receivers):
    def __init__(self, marker: Path, on_jobs: threading.Event) -> None:
        super().__init__(1, None, on_jobs=on_jobs.set)
        self.marker = marker

    def command(self, fd: int) -> list[str]:
        return [sys.executable, "-c", CHILD, str(os.getpid()), str(fd), str(self.marker)]


def child_pid(r: Receivers) -> int | None:
    c = r.children[0]
    return c.proc.pid if c.proc is not None and c.ready else None


def test_jobs_wake_restart_after_kill_and_clean_stop(tmp_path: Path) -> None:
    marker = tmp_path / "stopped.txt"
    jobs = threading.Event()
    r = StandIns(marker, jobs)
    assert r.problems() == "receiver 1 is not started"
    r.start(port=0)
    try:
        first = wait_for(lambda: child_pid(r), 30, "the receiver to say it listens")
        assert r.problems() == ""
        assert jobs.wait(10), "the receiver's jobs did not wake the job runner"

        # Killed outright: /readyz says so, and it is started again after the back-off.
        jobs.clear()
        os.kill(first, signal.SIGKILL)
        wait_for(lambda: "was killed by SIGKILL" in r.problems(), 10, "the supervisor to see the death")
        second = wait_for(lambda: child_pid(r), 30, "the receiver to be started again")
        assert second != first
        assert jobs.wait(10), "the new receiver's jobs did not wake the job runner"
    finally:
        r.join()
    # Stopping: SIGTERM, and the child finished in its own time (its handler ran).
    assert marker.read_text().split() == [str(second), "stopped"]
    assert not psutil.pid_exists(second) or psutil.Process(second).status() == psutil.STATUS_ZOMBIE
    assert r.problems() == "receiver 1 is stopped"
