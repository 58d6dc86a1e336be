"""A plugin's processes end with its job, and a memory limit too small to start says so.

- A plugin that starts a child (which hangs) and a grandchild that leaves its session with setsid and
  is orphaned: when the job times out, is cancelled, or the node stops or is killed, no process of
  that tree is left (found by a marker on their command lines), and the job says why it ended;
  nor when the plugin returns a result and leaves them running.
- memory_limit_mb below what a plugin process takes after its imports: the job fails with "ran out
  of memory (limit N MB)" and what to raise; ``rules check`` warns about such a limit (exit 0).

The plugins are in faulty_plugins.py beside this file (see test_plugin_runtime.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
from faulty_plugins import HANG
from helpers import REPO, NodeProcess, storescu, wait_for
from test_plugin_runtime import LOCAL_PLUGINS, jobs_by_rule, labelled_ct, rule, with_faulty_plugins


def marked(marker: str) -> list[psutil.Process]:
    """Running (not zombie) processes whose command line carries ``marker``.

    The marker is this test's own, so other tests' processes (in parallel workers) are never counted;
    ``p.info`` is read once while listing, so a process that ends meanwhile is not asked again.
    """
    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if marker in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(p)
    return found


def described(procs: list[psutil.Process]) -> list[str]:
    return [f"{p.pid} ({' '.join(p.info['cmdline'] or [])})" for p in procs]


def gone(marker: str, within: float = 5.0) -> list[str]:
    """The marked processes still running after ``within`` seconds (the kill itself is asynchronous)."""
    deadline = time.monotonic() + within
    while marked(marker) and time.monotonic() < deadline:
        time.sleep(0.1)
    return described(marked(marker))


@pytest.fixture
def marker():
    """A string no other process has on its command line; whatever carries it is killed afterwards."""
    m = f"plugin-tree-{uuid.uuid4().hex}"
    yield m
    procs = marked(m)
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=5)


def start_spawner(node: NodeProcess, tmp_path: Path, marker: str, timeout: float) -> None:
    """A node whose "spawn" job runs the spawner plugin; returns once its child and grandchild run."""
    with_faulty_plugins(node)
    node.extra_config = f"[tracker]\nstable_after = 30\n{LOCAL_PLUGINS}\n" + rule(
        "spawn", f'plugin = "spawner", params = {{ marker = "{marker}" }}, timeout = {timeout}'
    )
    node.start()
    assert storescu(node.port, labelled_ct(tmp_path, "spawn")).returncode == 0

    def hanging() -> list[psutil.Process]:  # not the short-lived intermediate
        return [p for p in marked(marker) if (p.info["cmdline"] or [])[1:3] == ["-c", HANG]]

    wait_for(lambda: len(hanging()) == 2, 30, "the plugin's child and grandchild to start")
    # What the test is about: the grandchild has left the plugin's session and group.
    sessions = {os.getsid(p.pid) for p in hanging()}
    assert len(sessions) == 2, "expected one of the processes in a session of its own"


def test_a_timed_out_plugin_leaves_none_of_its_processes(node, tmp_path, marker):
    start_spawner(node, tmp_path, marker, timeout=8)
    wait_for(lambda: jobs_by_rule(node)["spawn"]["state"] == "failed", 30, "the job to time out")
    job = jobs_by_rule(node)["spawn"]
    assert "did not finish within its timeout of 8 s" in job["last_error"], job
    assert gone(marker) == [], "processes of the timed-out plugin still running"


def test_a_cancelled_plugin_leaves_none_of_its_processes(node, tmp_path, marker):
    start_spawner(node, tmp_path, marker, timeout=120)
    job_id = jobs_by_rule(node)["spawn"]["id"]
    r = subprocess.run(
        [sys.executable, "-m", "node", "jobs", "cancel", str(job_id), "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        env={**os.environ, **node.env},
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert gone(marker, within=10) == [], "processes of the cancelled plugin still running"
    wait_for(lambda: "cancelled while it ran" in node.log(), 10, "the runner to note the cancel")
    assert jobs_by_rule(node)["spawn"]["state"] == "cancelled"


@pytest.mark.parametrize("how", ["stop", "kill9"])
def test_a_node_that_ends_leaves_none_of_its_plugins_processes(node, tmp_path, marker, how):
    start_spawner(node, tmp_path, marker, timeout=120)
    if how == "stop":
        assert node.stop() == 0
    else:
        node.kill9()
    assert gone(marker) == [], f"processes of a plugin still running after the node's {how}"


def test_a_plugin_that_returns_leaves_none_of_its_processes(tmp_path, marker):
    """What a plugin started and left running is ended with its process (here without a node)."""
    from node.plugins.runtime import run_in_process
    from node.plugins.worker import StepSpec, WorkSpec

    files = labelled_ct(tmp_path, "spawn")
    out = tmp_path / "out"
    out.mkdir()
    step = StepSpec("spawner", "faulty_plugins:spawner", {"marker": marker, "then_return": True})
    result = run_in_process(
        WorkSpec(files=[str(f) for f in files], steps=[step], out_dir=str(out), job_key=("1.2.3", 1, "spawn", 0)),
        timeout=120,
    )
    assert result.ok, result.error
    assert len(result.outputs) == 1
    assert gone(marker) == [], "processes started by a plugin that returned still running"


def test_a_crashed_plugin_leaves_nothing_of_its_process_group(tmp_path, marker):
    """Killed by SIGKILL (the OOM killer's way) after starting a child: the child goes with the group.

    (Its detached grandchild, in a session of its own, stays under the fork server until the node stops.)
    """
    from node.plugins.runtime import PluginRunError, run_in_process
    from node.plugins.worker import StepSpec, WorkSpec

    files = labelled_ct(tmp_path, "crash")
    out = tmp_path / "out"
    out.mkdir()
    step = StepSpec("spawner", "faulty_plugins:spawner", {"marker": marker, "then_crash": True})
    with pytest.raises(PluginRunError, match="crashed with SIGKILL"):
        run_in_process(
            WorkSpec(files=[str(f) for f in files], steps=[step], out_dir=str(out), job_key=("1.2.3", 1, "crash", 0)),
            timeout=120,
        )

    def in_group() -> list[int]:  # the marked processes but the setsid grandchild (a session leader)
        out = []
        for p in marked(marker):
            try:
                if os.getsid(p.pid) != p.pid:
                    out.append(p.pid)
            except ProcessLookupError:
                pass
        return out

    deadline = time.monotonic() + 5
    while in_group() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert in_group() == [], "the crashed plugin's child is still running"


def test_a_memory_limit_below_the_baseline_says_so(node, tmp_path):
    with_faulty_plugins(node)
    node.extra_config = f"[tracker]\nstable_after = 30\n[jobs]\nretry_delay = 0\n{LOCAL_PLUGINS}\n" + rule(
        "small", 'plugin = "slow-box", params = { seconds = 0 }, memory_limit_mb = 50'
    )
    node.start()
    assert storescu(node.port, labelled_ct(tmp_path, "small")).returncode == 0
    wait_for(lambda: jobs_by_rule(node).get("small", {}).get("state") == "failed", 30, "the job to fail")
    job = jobs_by_rule(node)["small"]
    error = job["last_error"]
    assert "ran out of memory (limit 50 MB)" in error, job
    assert "raise memory_limit_mb" in error and "after its imports" in error, job
    assert job["attempts"] == 1, "another attempt would fail the same way"


def test_rules_check_warns_about_a_memory_limit_below_the_baseline(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[node]
data_dir = "{tmp_path / "data"}"
[plugins]
memory_limit_mb = 100
{rule("tiny", 'plugin = "threshold-seg", memory_limit_mb = 50')}
{rule("inherits", 'plugin = "threshold-seg"')}
{rule("roomy", 'plugin = "threshold-seg", memory_limit_mb = 4096')}
{rule("unlimited", 'plugin = "threshold-seg", memory_limit_mb = 0')}
""")
    r = subprocess.run(
        [sys.executable, "-m", "node", "rules", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "configuration valid, 4 rule(s)" in r.stdout
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, r.stderr
    tiny, inherits = warnings
    assert tiny.startswith('warning: rules[0] ("tiny").actions[0].memory_limit_mb = 50 is below the '), tiny
    assert inherits.startswith('warning: [plugins] memory_limit_mb = 100 (used by rule "inherits") is below '), inherits
    assert all("raise it" in w for w in warnings)
    # A config whose limits are all above the baseline gets no warning.
    roomy = rule("roomy", 'plugin = "threshold-seg"')  # the default [plugins] memory_limit_mb
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{roomy}')
    r = subprocess.run(
        [sys.executable, "-m", "node", "rules", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert r.returncode == 0 and "warning" not in r.stderr, r.stdout + r.stderr


def test_a_result_sent_just_as_the_wait_for_it_timed_out_is_kept(tmp_path, marker, monkeypatch):
    """The process sends its result and ends right after one of the runner's polls of the pipe timed out.

    The runner then sees a process that has ended: it must still read the result waiting in the pipe,
    not report a process that "exited with code 0 without a result" (seen once in CI under load).
    """
    from node.plugins import runtime
    from node.plugins.worker import StepSpec, WorkSpec

    real = runtime._context()

    class LateReceiver:
        """The first poll returns False only once the result is in the pipe and its sender has ended."""

        def __init__(self, conn):
            self.conn, self.first = conn, True

        def poll(self, timeout=0.0):
            if self.first and timeout:
                self.first = False
                assert self.conn.poll(60), "the plugin sent nothing within 60 s"
                deadline = time.monotonic() + 10
                while sender_alive() and time.monotonic() < deadline:
                    time.sleep(0.05)
                return False
            return self.conn.poll(timeout)

        def __getattr__(self, name):
            return getattr(self.conn, name)

    started = []

    class Context:
        def Pipe(self, duplex=True):
            receiver, sender = real.Pipe(duplex=duplex)
            return LateReceiver(receiver), sender

        def Process(self, *args, **kwargs):
            proc = real.Process(*args, **kwargs)
            started.append(proc)
            return proc

    def sender_alive():
        return started[0].is_alive()

    monkeypatch.setattr(runtime, "_context", lambda: Context())
    files = labelled_ct(tmp_path, "late")
    out = tmp_path / "out"
    out.mkdir()
    step = StepSpec("spawner", "faulty_plugins:spawner", {"marker": marker, "then_return": True})
    result = runtime.run_in_process(
        WorkSpec(files=[str(f) for f in files], steps=[step], out_dir=str(out), job_key=("1.2.3", 1, "late", 0)),
        timeout=120,
    )
    assert result.ok, result.error
    assert len(result.outputs) == 1
