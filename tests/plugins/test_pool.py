"""The warm worker pool on its own: real worker processes (the node's own Python as the environment).

Leasing reuses an idle worker; max_jobs_per_worker replaces one; idle_timeout stops idle ones beyond
keep_warm, and keep_warm replaces a worker that died; a setup that fails or takes longer than
setup_timeout is a clear WorkerStartError; discard and close kill; workers die with the node process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from node.config import WarmSettings
from node.plugins.pool import WorkerKey, WorkerPool, WorkerSpec, WorkerStartError
from tests.helpers import wait_for

HERE = Path(__file__).resolve().parent


def spec(**settings: float) -> WorkerSpec:
    return WorkerSpec(sys.executable, {"PYTHONPATH": str(HERE)}, WarmSettings(**settings))


def key(plugin: str = "env-bone", target: str = "env_plugins:Bone") -> WorkerKey:
    return WorkerKey("test", plugin, target)


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def pool(tmp_path: Path):
    p = WorkerPool(tmp_path / "logs")
    yield p
    p.close()


def test_an_idle_worker_is_reused_and_replaced_after_max_jobs(pool: WorkerPool) -> None:
    s = spec(max_jobs_per_worker=2)
    w1 = pool.lease(key(), s)
    assert w1.setup_seconds >= 0.3 and w1.plugin["name"] == "env-bone"
    pool.release(w1)
    w2 = pool.lease(key(), s)
    assert w2 is w1  # the same process, setup not run again
    pool.release(w2)  # its second job: max_jobs_per_worker reached
    wait_for(lambda: gone(w1.pid), 10, "the used-up worker to end")
    w3 = pool.lease(key(), s)
    assert w3.pid != w1.pid
    pool.release(w3)


def test_idle_workers_beyond_keep_warm_stop_and_keep_warm_replaces_the_dead(pool: WorkerPool) -> None:
    s = spec(keep_warm=1, idle_timeout=0.2)
    a = pool.lease(key(), s)
    b = pool.lease(key(), s)  # a is busy: a second worker
    pool.release(a)
    pool.release(b)
    time.sleep(0.3)
    pool.reap()
    alive = [w for w in (a, b) if not gone(w.pid)]
    assert len(alive) == 1, "keep_warm = 1 keeps one of the two idle workers"
    os.kill(alive[0].pid, signal.SIGKILL)
    wait_for(lambda: gone(alive[0].pid), 10, "the killed worker to end")
    pool.reap()  # forgets the dead one and starts its replacement
    wait_for(lambda: any(not w["busy"] for w in pool.state()), 30, "a replacement to be warm")
    (replacement,) = pool._workers  # (compared as objects: a pid can be reused once the dead one is reaped)
    assert replacement is not a and replacement is not b and replacement.alive()


def test_a_setup_that_fails_or_hangs_is_a_clear_start_error(pool: WorkerPool) -> None:
    with pytest.raises(WorkerStartError) as e:
        pool.lease(key("env-broken", "env_plugins:BrokenSetup"), spec())
    assert "could not set up its plugin" in str(e.value) and "weights file /models/missing.onnx" in str(e.value)
    t = time.monotonic()
    with pytest.raises(WorkerStartError) as e:
        pool.lease(key("env-slow-setup", "env_plugins:SlowSetup"), spec(setup_timeout=1))
    assert "did not finish its setup within setup_timeout = 1 s" in str(e.value), e.value
    assert time.monotonic() - t < 15
    assert pool.state() == []
    workers = [p for p in psutil.Process().children() if "dicom_node_sdk.worker" in " ".join(p.cmdline())]
    assert all(p.status() == psutil.STATUS_ZOMBIE for p in workers), workers


def test_an_environment_that_prints_json_before_the_worker_is_a_clear_start_error(
    pool: WorkerPool, tmp_path: Path
) -> None:
    """Startup code of the environment (here a sitecustomize) printing a JSON number where the ready line goes."""
    (tmp_path / "sitecustomize.py").write_text("print(42, flush=True)\n")
    s = WorkerSpec(sys.executable, {"PYTHONPATH": f"{tmp_path}{os.pathsep}{HERE}"}, WarmSettings())
    with pytest.raises(WorkerStartError) as e:
        pool.lease(key(), s)
    assert "printed b'42' instead of its ready line" in str(e.value), e.value
    assert pool.state() == []


def test_discard_and_close_kill_their_workers(pool: WorkerPool) -> None:
    a = pool.lease(key(), spec())
    pool.discard(a, "its job timed out")
    assert gone(a.pid)
    b = pool.lease(key(), spec())
    pool.release(b)
    pool.close()
    assert gone(b.pid)


def test_workers_die_with_the_node_process(tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys, time
        from pathlib import Path
        from node.config import WarmSettings
        from node.plugins.pool import WorkerKey, WorkerPool, WorkerSpec
        pool = WorkerPool(Path({str(tmp_path)!r}))
        w = pool.lease(WorkerKey("test", "env-bone", "env_plugins:Bone"),
                       WorkerSpec(sys.executable, {{"PYTHONPATH": {str(HERE)!r}}}, WarmSettings()))
        print(w.pid, flush=True)
        time.sleep(600)
    """)
    node = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pid = int(node.stdout.readline())
        assert not gone(pid)
        node.kill()  # SIGKILL: no clean-up of its own
        node.wait(10)
        wait_for(lambda: gone(pid), 10, "the worker to die with the process that started it")
    finally:
        if node.poll() is None:
            node.kill()


def test_a_job_waits_for_the_keep_warm_worker_that_is_starting(pool: WorkerPool) -> None:
    s = spec(keep_warm=1)
    pool.keep_warm({key(): s})  # the node's start: one worker being set up in the background
    said: list[str] = []
    w = pool.lease(key(), s, on_wait=said.append)  # the first job arrives meanwhile
    assert any("waiting for the worker" in m for m in said), said
    assert len(pool.state()) == 1  # the same worker: no second setup
    pool.release(w)
