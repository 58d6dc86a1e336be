"""Plugins in environments of their own, run by warm workers: a node in a subprocess, Orthanc downstream.

The environment is a real venv with numpy 1 and pydicom 2 (the node runs numpy 2 and pydicom 3) and the
SDK; the plugins (tests/plugins/env_plugins.py) are ``[plugins] local`` entries that name it.

- Three series: one worker serves all three jobs (its setup ran once), each SEG reaches Orthanc once,
  and its masks equal the threshold computed here.
- A job that hangs past its timeout, or takes more memory than its limit, kills its own worker only:
  the warm worker of another plugin lives on and serves the next job.
- GPU slots without a GPU: a worker gets the device its job was given (CUDA_VISIBLE_DEVICES), two jobs at
  once get two devices, and a plugin that requires a GPU on a node without one waits, saying so.
- A bad environment is a config error naming its key; parameters are checked against the plugin's schema.
"""

from __future__ import annotations

import io
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pydicom
import pytest
from helpers import REPO, TEST_PLUGINS, NodeProcess, alive_cmdline, storescu, wait_for
from helpers.envs import sdk_env
from helpers.variants import make_files

from node.plugins.series import load_series

SEG = "1.2.840.10008.5.1.4.1.1.66.4"

pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")


@pytest.fixture(scope="module")
def old_python() -> Path:
    return sdk_env()


def env_config(python: Path, *, warm_bone: bool = False, extra_plugins: str = "", gpus: str = "[]") -> str:
    return f"""
[plugins]
gpus = {gpus}
[plugins.local]
env-bone = {{ entry = "env_plugins:Bone", environment = "old" }}
env-gpu-bone = {{ entry = "env_plugins:GpuBone", environment = "old" }}
env-hang = {{ entry = "env_plugins:Hang", environment = "old" }}
env-hog = {{ entry = "env_plugins:Hog", environment = "old" }}
env-dies = {{ entry = "env_plugins:DiesLeavingAChild", environment = "old" }}
{extra_plugins}
[plugins.environments.old]
python = "{python}"
env = {{ PYTHONPATH = "{TEST_PLUGINS}" }}
[plugins.environments.old.plugins.env-bone]
keep_warm = {int(warm_bone)}
"""


def jobs(node: NodeProcess) -> list[tuple]:
    return node.query("select id, state, result, last_error from job order by id")


def series(tmp_path: Path, *variants: str) -> list[Path]:
    return make_files(tmp_path / "-".join(variants or ("original",)), "ct-head", *variants)


def bone(files: list[Path]) -> np.ndarray:
    return load_series(files).rescaled() > 300


def seg_masks(data: bytes, shape: tuple[int, ...], files: list[Path]) -> np.ndarray:
    """The SEG's segment 1 as a (slices, rows, cols) mask on the source's slice order."""
    import highdicom as hd

    seg = hd.seg.segread(io.BytesIO(data))
    src = load_series(files)
    uids = [str(d.SOPInstanceUID) for d in src.datasets]
    vol = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, segment_numbers=[1], combine_segments=False, skip_overlap_checks=True
    )
    assert vol.shape[:3] == shape
    return vol[..., 0].astype(bool)


def test_an_environment_plugin_runs_in_one_warm_worker_and_its_segs_reach_orthanc(
    tmp_path: Path, old_python: Path, module_orthanc
) -> None:
    orthanc = module_orthanc
    node = NodeProcess(
        tmp_path / "node",
        extra_config=env_config(old_python)
        + f"""
[tracker]
stable_after = 1
{orthanc.destination("orthanc")}
[[rules]]
name = "bone"
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "env-bone", send_to = ["orthanc"] }}]
""",
    )
    node.start()
    try:
        sent = [series(tmp_path, *v) for v in [(), ("jittered",), ("no-thickness",)]]
        for n, files in enumerate(sent, 1):
            assert storescu(node.port, files).returncode == 0
            wait_for(
                lambda n=n: len(jobs(node)) == n and jobs(node)[-1][1] in ("succeeded", "failed"),
                180,
                f"job {n} to end",
            )
        rows = jobs(node)
        assert [r[1] for r in rows] == ["succeeded"] * 3, rows
        # One worker, three jobs: its notes count them; setup ran once.
        pids = set()
        for n, (_, _, result, _) in enumerate(rows, 1):
            assert f"its job {n}," in result, result
            pids.add(result.split("warm worker pid ")[1].split()[0])
        assert len(pids) == 1, rows
        node.wait_delivered(3)
        segs = node.query("select sop_instance_uid from instance where job_fk is not null order by id")
        assert len(segs) == 3
        for (uid,), files in zip(segs, sent, strict=True):
            assert orthanc.has_instance(uid)
            ds = pydicom.dcmread(io.BytesIO(orthanc.file(uid)))
            assert ds.SOPClassUID == SEG
            # What the plugin saw, in its own environment: numpy 1, pydicom 2, one setup.
            assert ds.SeriesDescription.startswith("setup 1 pid "), ds.SeriesDescription
            assert " numpy 1." in ds.SeriesDescription and " pydicom 2." in ds.SeriesDescription
            want = bone(files)
            assert np.array_equal(seg_masks(orthanc.file(uid), want.shape, files), want)
        assert orthanc.count() == len(set(orthanc.instances()))  # nothing twice
    finally:
        node.stop()


def test_a_hung_or_memory_hungry_job_kills_only_its_own_worker(tmp_path: Path, old_python: Path) -> None:
    node = NodeProcess(
        tmp_path / "node",
        extra_config=env_config(old_python, warm_bone=True)
        + """
[tracker]
stable_after = 1
[jobs]
workers = 1
[[rules]]
name = "bone"
match = { SeriesDescription = { regex = "^bone" } }
actions = [{ type = "plugin", plugin = "env-bone" }]
[[rules]]
name = "hang"
match = { SeriesDescription = { regex = "^hang" } }
actions = [{ type = "plugin", plugin = "env-hang", timeout = 3 }]
[[rules]]
name = "hog"
match = { SeriesDescription = { regex = "^hog" } }
actions = [{ type = "plugin", plugin = "env-hog", memory_limit_mb = 700 }]
[[rules]]
name = "dies"
match = { SeriesDescription = { regex = "^dies" } }
actions = [{ type = "plugin", plugin = "env-dies", timeout = 120 }]
""",
    )
    node.start()
    try:

        def send(description: str, *variants: str) -> None:
            files = series(tmp_path, *variants)
            out = tmp_path / description
            out.mkdir()
            for f in files:
                ds = pydicom.dcmread(f)
                ds.SeriesDescription = description
                ds.save_as(out / f.name)
            assert storescu(node.port, sorted(out.iterdir())).returncode == 0

        def ended(n: int) -> bool:
            rows = jobs(node)
            return len(rows) == n and all(r[1] in ("succeeded", "failed") for r in rows)

        send("bone 1")
        wait_for(lambda: ended(1), 180, "the first bone job")
        bone_pid = int(jobs(node)[0][2].split("warm worker pid ")[1].split()[0])
        send("hang", "jittered")
        wait_for(lambda: ended(2), 120, "the hung job to be stopped")
        _, state, _, error = jobs(node)[1]
        assert state == "failed" and "did not finish within its timeout of 3 s" in error, error
        send("hog", "no-thickness")
        wait_for(lambda: ended(3), 120, "the memory-hungry job to be stopped")
        _, state, _, error = jobs(node)[2]
        assert state == "failed" and "over the memory limit of 700 MB" in error, error
        # A worker that dies while a child it forked holds the job's connection: the job fails at once, saying
        # the worker died (not after its 120 s timeout), and the child goes with it.
        t = time.monotonic()
        send("dies", "uneven")
        wait_for(lambda: ended(4), 60, "the job whose worker died")
        _, state, _, error = jobs(node)[3]
        assert state == "failed" and "crashed with SIGKILL" in error and "env-dies" in error, error
        assert time.monotonic() - t < 60
        # Their workers are gone; the bone plugin's warm worker lived through both and serves the next job.
        assert node.proc is not None
        names = " ".join(cmd for p in psutil.Process(node.proc.pid).children() if (cmd := alive_cmdline(p)))
        assert "env-hang=" not in names and "env-hog=" not in names and "env-dies=" not in names, names
        assert not [
            p
            for p in psutil.process_iter(["cmdline"])
            if "env_plugins" in " ".join(p.info["cmdline"] or []) and "env-dies" in " ".join(p.info["cmdline"] or [])
        ]
        assert "env-bone=" in names
        assert psutil.pid_exists(bone_pid)
        body = urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/metrics", timeout=10).read().decode()
        assert 'dicom_node_plugin_workers{environment="old",plugin="env-bone",state="idle"} 1.0' in body, body
        send("bone 2", "sheared")
        wait_for(lambda: ended(5), 180, "the second bone job")
        _, state, result, error = jobs(node)[4]
        assert state == "succeeded", error
        assert f"warm worker pid {bone_pid} " in result and "its job 2," in result, result
        assert "stopping the worker for env-hang" in node.log_path.read_text()
    finally:
        node.stop()
    # The node stopped: so did every worker it started.
    wait_for(
        lambda: not psutil.pid_exists(bone_pid) or psutil.Process(bone_pid).status() == psutil.STATUS_ZOMBIE,
        15,
        "the warm worker to end with the node",
    )


def test_a_worker_gets_the_gpu_its_job_was_given(tmp_path: Path, old_python: Path) -> None:
    node = NodeProcess(
        tmp_path / "node",
        extra_config=env_config(old_python, gpus='["0", "1"]')
        + """
[tracker]
stable_after = 1
[jobs]
workers = 2
[[rules]]
name = "gpu"
match = { Modality = "CT" }
actions = [{ type = "plugin", plugin = "env-gpu-bone" }]
""",
        env={"ENV_PLUGIN_HOLD": "4"},
    )
    node.start()
    try:
        a, b = series(tmp_path), series(tmp_path, "jittered")
        assert storescu(node.port, a).returncode == 0
        assert storescu(node.port, b).returncode == 0
        wait_for(
            lambda: len(jobs(node)) == 2 and all(r[1] in ("succeeded", "failed") for r in jobs(node)),
            180,
            "both GPU jobs",
        )
        rows = jobs(node)
        assert [r[1] for r in rows] == ["succeeded", "succeeded"], rows
        described = sorted(
            r[0]
            for r in node.query(
                "select series.series_description from instance join series on instance.series_fk = series.id "
                "where instance.job_fk is not null"
            )
        )
        # Two jobs at the same time (each holds its device 4 s): one on each device.
        devices = sorted(d.split("]")[0].split("[")[1] for d in described)
        assert devices == ["0", "1"], described
    finally:
        node.stop()


def test_a_plugin_that_requires_a_gpu_waits_on_a_node_without_one(tmp_path: Path, old_python: Path) -> None:
    node = NodeProcess(
        tmp_path / "node",
        extra_config=env_config(old_python)
        + """
[tracker]
stable_after = 1
[[rules]]
name = "gpu"
match = { Modality = "CT" }
actions = [{ type = "plugin", plugin = "env-gpu-bone" }]
""",
    )
    node.start()
    try:
        assert storescu(node.port, series(tmp_path)).returncode == 0
        wait_for(lambda: jobs(node) and "waiting for a GPU" in (jobs(node)[0][2] or ""), 60, "the job to wait")
        job_id, state, result, _ = jobs(node)[0]
        assert state == "running" and "[plugins] gpus is empty" in result, result
        # Said when the node started, and by rules check, before any series arrives.
        assert 'rules[0] ("gpu").actions[0] requires a GPU and [plugins] gpus is empty' in node.log_path.read_text()
        check = subprocess.run(
            [sys.executable, "-m", "node", "rules", "check", "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert "requires a GPU and [plugins] gpus is empty" in check.stdout + check.stderr, check.stdout
        done = subprocess.run(
            [sys.executable, "-m", "node", "jobs", "cancel", str(job_id), "--config", str(node.config_path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stdout + done.stderr
        wait_for(lambda: jobs(node)[0][1] == "cancelled", 30, "the waiting job to be cancelled")
    finally:
        node.stop()


def test_a_broken_environment_or_bad_parameters_are_config_errors_naming_the_key(
    tmp_path: Path, old_python: Path
) -> None:
    from node.config import ConfigError
    from node.decide.compile import load_checked_config

    def load(text: str) -> str:
        p = tmp_path / "node.toml"
        p.write_text(text)
        with pytest.raises(ConfigError) as e:
            load_checked_config(p)
        return str(e.value)

    error = load('[plugins.environments.x]\npython = "/nowhere/bin/python"\n')
    assert "plugins.environments.x.python" in error and "does not exist" in error, error
    bare = Path(sys.executable)  # the node's own Python has the SDK; a venv without it:
    plain = tmp_path / "plain"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(plain)], check=True, timeout=120)
    error = load(f'[plugins.environments.x]\npython = "{plain / "bin" / "python"}"\n')
    assert "[plugins.environments.x]" in error and "dicom-node-sdk is not installed there" in error, error
    assert bare.exists()
    error = load(
        env_config(old_python)
        + """
[[rules]]
name = "r"
actions = [{ type = "plugin", plugin = "env-bone", params = { lower = 5 } }]
"""
    )
    assert "rules[0]" in error and "lower" in error, error
    error = load(env_config(old_python) + '[plugins.commands.env-bone]\ncommand = ["/bin/true", "{input}"]\n')
    assert "plugin name 'env-bone' is used twice: environment old and [plugins.commands]" in error, error


def test_plugins_lists_environment_plugins_with_their_environment(tmp_path: Path, old_python: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(env_config(old_python))
    done = subprocess.run(
        [sys.executable, "-m", "node", "plugins", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "env-bone 2.0 -- Bone above 300 HU" in done.stdout, done.stdout
    assert f"environment old ({old_python})" in done.stdout
    assert "env-gpu-bone" in done.stdout and "GPU: required" in done.stdout
