"""Plugins end to end: a running node, DCMTK storescu sending, plugin processes, SEGs reaching DCMTK storescp.

- Faulty plugins (raise, SIGABRT, hang past the timeout, allocate past the memory limit) fail only
  their own job, with the reason in ``job.last_error``, while the node goes on receiving.
- PluginError(retryable=True) is retried up to the rule's max_attempts; a non-retryable one is not.
- The example plugin package in tests/data/example-plugin, installed with pip through its entry point:
  listed by ``dicom-node plugins``, its parameters validated by ``rules check``, and its SEG checked
  voxel by voxel against the sphere it should be.
- kill -9 while a plugin runs: the job is taken up again, and re-runs store nothing twice.
- A chain: each output names the plugin that made it.
- Regressions: plugin processes do not outlive a killed node; failed runs leave nothing in tmp/.

The misbehaving plugins live in faulty_plugins.py beside this file; the node's plugin processes import
it by name, so the node runs with this folder on its PYTHONPATH.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import psutil
import pydicom
import pytest
from faulty_plugins import FLAKY_MESSAGE, RAISER_MESSAGE, REFUSER_MESSAGE
from helpers import (
    REPO,
    TEST_PLUGINS,
    NodeProcess,
    StoreSCP,
    alive_cmdline,
    make_ct_series,
    series_files,
    storescu,
    wait_for,
)

EXAMPLE = REPO / "tests" / "data" / "example-plugin"
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
CT = "ct-head-philips-5mm"
MR = "mr-t1-sag-siemens"

LOCAL_PLUGINS = """
[plugins]
workers = 4
[plugins.local]
raiser = "faulty_plugins:raiser"
aborter = "faulty_plugins:aborter"
sleeper = "faulty_plugins:sleeper"
hog = "faulty_plugins:hog"
flaky = "faulty_plugins:flaky"
flaky-capped = "faulty_plugins:flaky_capped"
refuser = "faulty_plugins:refuser"
slow-box = "faulty_plugins:slow_box"
spawner = "faulty_plugins:spawner"
"""


def with_faulty_plugins(node: NodeProcess) -> None:
    """The node (and its plugin processes) can import faulty_plugins."""
    node.env = {"PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])}


def jobs_by_rule(node: NodeProcess) -> dict[str, dict[str, Any]]:
    rows = node.query("select id, rule, state, attempts, max_attempts, last_error, result, software from job")
    keys = ("id", "rule", "state", "attempts", "max_attempts", "last_error", "result", "software")
    return {r[1]: dict(zip(keys, r, strict=True)) for r in rows}


def all_jobs_ended(node: NodeProcess, count: int) -> bool:
    states = [r[0] for r in node.query("select state from job")]
    return len(states) == count and all(s in ("succeeded", "failed", "cancelled") for s in states)


def labelled_ct(out: Path, label: str, count: int = 4, size: int = 32) -> list[Path]:
    """A small synthetic CT series whose SeriesDescription is ``label`` (the rules match on it).

    ImagesInAcquisition makes the series complete as soon as its last instance arrives.
    """
    files = make_ct_series(out / label, count, rows=size, cols=size, images_in_acquisition=count)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = label
        ds.save_as(f, enforce_file_format=True)
    return files


def rule(name: str, action: str, **extra: Any) -> str:
    """A rule that runs one plugin action for the series labelled ``name``."""
    lines = [f'[[rules]]\nname = "{name}"\nmatch = {{ SeriesDescription = "{name}" }}']
    lines += [f"{k} = {v}" for k, v in extra.items()]
    return "\n".join(lines) + f'\nactions = [{{ type = "plugin", {action} }}]\n'


def seg_rows(node: NodeProcess) -> list[tuple]:
    return node.query("select sop_instance_uid, job_fk, file_path from instance where sop_class_uid = ?", SEG_CLASS)


def received_segs(scp: StoreSCP) -> list[Path]:
    return [p for p in scp.received() if pydicom.dcmread(p, stop_before_pixels=True).SOPClassUID == SEG_CLASS]


@pytest.fixture
def scp(tmp_path: Path):
    s = StoreSCP(tmp_path / "scp-out").start()
    yield s
    s.stop()


# -- faults ----------------------------------------------------------------------


def test_faulty_plugins_fail_only_their_own_job_while_the_node_keeps_receiving(node, tmp_path):
    with_faulty_plugins(node)
    node.extra_config = "\n".join(
        [
            "[tracker]\nstable_after = 30\n[jobs]\nworkers = 4\nretry_delay = 0\n" + LOCAL_PLUGINS,
            rule("raise", 'plugin = "raiser"'),
            rule("abort", 'plugin = "aborter"'),
            rule("hang", 'plugin = "sleeper", timeout = 3'),
            rule("hog", 'plugin = "hog", memory_limit_mb = 1500'),
            rule("ok", 'plugin = "threshold-seg"'),
        ]
    )
    node.start()
    for label in ("raise", "abort", "hog"):
        assert storescu(node.port, labelled_ct(tmp_path, label)).returncode == 0
    hang = labelled_ct(tmp_path, "hang")
    ok = labelled_ct(tmp_path, "ok")
    assert storescu(node.port, hang).returncode == 0
    wait_for(lambda: jobs_by_rule(node).get("hang", {}).get("state") == "running", 20, "the hanging job to start")
    # While the plugin hangs, the node receives another series, stores it and runs its job.
    t0 = time.monotonic()
    r = storescu(node.port, ok)
    assert r.returncode == 0, r.stderr
    ok_uid = str(pydicom.dcmread(ok[0], stop_before_pixels=True).SeriesInstanceUID)
    stored = node.query("select s.instance_count from series s where s.series_instance_uid = ?", ok_uid)
    assert stored == [(4,)]
    assert jobs_by_rule(node)["hang"]["state"] == "running", (
        f"the hanging job ended before the other series was stored ({time.monotonic() - t0:.1f} s)"
    )
    wait_for(lambda: all_jobs_ended(node, 5), 60, "all five jobs to end")
    assert node.proc is not None and node.proc.poll() is None, "the node died"

    jobs = jobs_by_rule(node)
    failed = {name: j for name, j in jobs.items() if name != "ok"}
    for name, j in failed.items():
        assert j["state"] == "failed", (name, j)
        # None of these is worth another attempt, so max_attempts = 3 does not make them run again.
        assert (j["attempts"], j["max_attempts"]) == (1, 3), (name, j)
    assert RAISER_MESSAGE in jobs["raise"]["last_error"]
    assert jobs["raise"]["last_error"].startswith("running plugin raiser: ValueError: ")
    assert "faulty_plugins.py:" in jobs["raise"]["last_error"]  # where it was raised
    assert "crashed with SIGABRT" in jobs["abort"]["last_error"]
    assert "did not finish within its timeout of 3 s" in jobs["hang"]["last_error"]
    assert "running plugin hog: ran out of memory (limit 1500 MB" in jobs["hog"]["last_error"]
    # The plugin version is recorded for the runs that got as far as a result.
    assert jobs["raise"]["software"] == "raiser 0.1"
    assert jobs["hog"]["software"] == "hog 0.1"

    good = jobs["ok"]
    assert good["state"] == "succeeded" and good["attempts"] == 1, good
    assert good["result"].startswith("1 SEG from 4 source instances (threshold-seg 1.0"), good
    assert [row[1] for row in seg_rows(node)] == [good["id"]], "exactly one SEG, made by the good job"


def test_retryable_plugin_errors_are_retried_up_to_max_attempts(node, tmp_path):
    with_faulty_plugins(node)
    marker = tmp_path / "flaky-once.marker"
    node.extra_config = "\n".join(
        [
            "[tracker]\nstable_after = 30\n[jobs]\nretry_delay = 0\n" + LOCAL_PLUGINS,
            rule("always", 'plugin = "flaky"', max_attempts=3),
            rule("once", f'plugin = "flaky", params = {{ marker = "{marker}" }}', max_attempts=3),
            rule("never", 'plugin = "refuser"', max_attempts=3),
            rule("capped", 'plugin = "flaky-capped"', max_attempts=3),
        ]
    )
    node.start()
    for label in ("always", "once", "never", "capped"):
        assert storescu(node.port, labelled_ct(tmp_path, label)).returncode == 0
    wait_for(lambda: all_jobs_ended(node, 4), 60, "the four jobs to end")
    jobs = jobs_by_rule(node)
    assert (jobs["always"]["state"], jobs["always"]["attempts"]) == ("failed", 3), jobs["always"]
    assert jobs["always"]["last_error"] == f"running plugin flaky: {FLAKY_MESSAGE}"
    assert (jobs["once"]["state"], jobs["once"]["attempts"]) == ("succeeded", 2), jobs["once"]
    assert marker.exists()
    assert (jobs["never"]["state"], jobs["never"]["attempts"]) == ("failed", 1), jobs["never"]
    assert jobs["never"]["last_error"] == f"running plugin refuser: {REFUSER_MESSAGE}"
    # the plugin's own policy (max_attempts=2) stops retries before the rule's 3
    assert (jobs["capped"]["state"], jobs["capped"]["attempts"]) == ("failed", 2), jobs["capped"]
    assert jobs["capped"]["last_error"].endswith("(no more retries: the plugin allows 2 attempt(s))")
    log = node.log()
    assert "attempt 1 of 3 failed" in log and "attempt 2 of 3 failed" in log
    assert "not retried: another attempt would fail the same way" in log


# -- the example plugin package, installed with pip ----------------------------------


def _example_version() -> str:
    ns: dict[str, Any] = {}
    src = (EXAMPLE / "dicom_node_example" / "__init__.py").read_text()
    exec(next(line for line in src.splitlines() if line.startswith("__version__")), ns)
    return str(ns["__version__"])


def _can_build_without_isolation() -> bool:
    """setuptools < 70.1 needs the separate ``wheel`` package to build (editable) wheels."""
    import setuptools

    major, minor = (int(x) for x in setuptools.__version__.split(".")[:2])
    return (major, minor) >= (70, 1) or importlib.util.find_spec("wheel") is not None


def _pip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pip", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
    )


@pytest.fixture(scope="session")
def example_site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tests/data/example-plugin installed with pip like any plugin package, into a folder of this test session
    (``pip install --target``), not into the Python running the tests: tests in parallel workers, and the tests
    that list the installed plugins, never see it. Built from a copy, so that workers never share a build folder.
    """
    root = tmp_path_factory.mktemp("example-plugin")
    source, site = root / "source", root / "site"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    args = ["install", "--no-deps", "--target", str(site), str(source)]
    if _can_build_without_isolation():
        # Offline: no build dependencies to fetch, no index to ask.
        args[1:1] = ["--no-build-isolation", "--no-index"]
    # else: pip fetches setuptools and wheel for an isolated build from the configured index.
    r = _pip(*args)
    assert r.returncode == 0, f"pip {' '.join(args)} failed:\n{r.stdout}\n{r.stderr}"
    return site


@pytest.fixture
def example_plugin(example_site: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The example plugin's version; the node processes and CLI runs of this test find the package on PYTHONPATH."""
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join([str(example_site), *filter(None, [os.environ.get("PYTHONPATH")])])
    )
    return _example_version()


def node_cli(*args: str, config: Path | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "node", *args] + (["--config", str(config)] if config else [])
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def test_dicom_node_plugins_lists_the_installed_example(example_plugin, tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n')
    r = node_cli("plugins", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert f"example-sphere {example_plugin} -- A sphere of radius_mm around the centre of the volume" in r.stdout
    i = next(n for n, line in enumerate(lines) if line.startswith("example-sphere "))
    assert lines[i + 1].strip() == f"from package dicom-node-example {example_plugin} (dicom_node_example:sphere)"
    assert lines[i + 2].strip() == "radius_mm: number = 30.0"
    assert any(line.startswith("threshold-seg 1.0") for line in lines)  # the built-in, through the same group
    r = node_cli("plugins", "--schema", config=cfg)
    assert r.returncode == 0 and '"exclusiveMinimum": 0' in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize(
    ("action", "expected"),
    [
        (
            'plugin = "example-sphere", params = { radius_mm = "big" }',
            'rules[0] ("sphere").actions[0].params.radius_mm: Input should be a valid number, unable to parse string as '
            "a number (got 'big')",
        ),
        (
            'plugin = "example-sphere", params = { radius = 20 }',
            'rules[0] ("sphere").actions[0].params.radius: Extra inputs are not permitted',
        ),
        (
            'plugins = [{ name = "example-sphere", params = { radius_mm = 20 } }, '
            '{ name = "example-sphere", params = { radius_mm = -1 } }]',
            'rules[0] ("sphere").actions[0].plugins[1].params.radius_mm: Input should be greater than 0 (got -1)',
        ),
    ],
    ids=["wrong-type", "unknown-key", "chain-out-of-range"],
)
def test_rules_check_validates_plugin_params(example_plugin, tmp_path, action, expected):
    cfg = tmp_path / "node.toml"
    base = f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
    cfg.write_text(
        base + '[[rules]]\nname = "sphere"\nmatch = { Modality = "CT" }\n'
        f'actions = [{{ type = "plugin", {action} }}]\n'
    )
    r = node_cli("rules", "check", config=cfg)
    assert r.returncode == 2, r.stdout + r.stderr
    assert expected in r.stderr, r.stderr
    # the same rule with good parameters is valid
    cfg.write_text(
        base + '[[rules]]\nname = "sphere"\nmatch = { Modality = "CT" }\n'
        'actions = [{ type = "plugin", plugin = "example-sphere", params = { radius_mm = 12.5 } }]\n'
    )
    r = node_cli("rules", "check", config=cfg)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "then run example-sphere" in r.stdout


def expected_sphere(files: list[Path], radius_mm: float) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """What example-sphere should segment, computed here from the files' own geometry.

    Returns, per SOP Instance UID, the mask and each pixel's distance (mm) from the volume centre.
    """
    dss = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    iop = np.array(dss[0].ImageOrientationPatient, dtype=float)
    row_dir, col_dir = iop[:3], iop[3:]
    normal = np.cross(row_dir, col_dir)
    dss.sort(key=lambda d: float(np.dot(np.array(d.ImagePositionPatient, dtype=float), normal)))
    dr, dc = (float(x) for x in dss[0].PixelSpacing)
    rows, cols = int(dss[0].Rows), int(dss[0].Columns)
    first, last = (np.array(d.ImagePositionPatient, dtype=float) for d in (dss[0], dss[-1]))
    centre = (first + last) / 2 + (rows - 1) / 2 * dr * col_dir + (cols - 1) / 2 * dc * row_dir
    ii, jj = np.mgrid[0:rows, 0:cols]
    masks, dists = {}, {}
    for d in dss:
        xyz = (
            np.array(d.ImagePositionPatient, dtype=float) + ii[..., None] * dr * col_dir + jj[..., None] * dc * row_dir
        )
        dist = np.linalg.norm(xyz - centre, axis=-1)
        masks[str(d.SOPInstanceUID)], dists[str(d.SOPInstanceUID)] = dist <= radius_mm, dist
    return masks, dists


def test_example_plugin_makes_a_seg_that_reaches_the_destination(example_plugin, node, scp):
    radius = 40.0
    node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[[rules]]
name = "sphere"
[[rules.actions]]
type = "plugin"
plugin = "example-sphere"
params = {{ radius_mm = {radius} }}
send_to = ["scp"]
series_number = 7001
"""
    node.start()
    sources = {CT: series_files(CT), MR: series_files(MR)}  # axial and sagittal
    for files in sources.values():
        assert storescu(node.port, files).returncode == 0
    wait_for(lambda: all_jobs_ended(node, 2), 90, "both sphere jobs to end")
    jobs = node.query(
        "select j.id, s.series_instance_uid, j.state, j.attempts, j.software, j.result, j.last_error "
        "from job j join series s on s.id = j.series_fk"
    )
    for job_id, _, state, attempts, software, result, error in jobs:
        assert (state, attempts) == ("succeeded", 1), (job_id, error)
        assert software == f"example-sphere {example_plugin}"
        assert result.endswith("queued 1 instance(s) for scp"), result
    job_of_series = {uid: job_id for job_id, uid, *_ in jobs}
    node.wait_delivered(2)

    # Lineage: each SEG in the index points at the job that made it.
    rows = seg_rows(node)
    assert len(rows) == 2 and {r[1] for r in rows} == set(job_of_series.values())
    got = received_segs(scp)
    assert len(got) == 2 and len(scp.received()) == 2, "storescp should hold exactly the two SEGs"
    assert {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID for p in got} == {r[0] for r in rows}

    for name, files in sources.items():
        src = pydicom.dcmread(files[0], stop_before_pixels=True)
        seg_path = next(
            p for p in got if pydicom.dcmread(p, stop_before_pixels=True).StudyInstanceUID == src.StudyInstanceUID
        )
        seg = hd.seg.segread(seg_path)
        # What the node adds: the source study, its own series, references, the algorithm and itself.
        assert seg.StudyInstanceUID == src.StudyInstanceUID and seg.PatientID == src.PatientID
        assert seg.SeriesInstanceUID != src.SeriesInstanceUID and seg.SeriesNumber == 7001
        assert seg.FrameOfReferenceUID == src.FrameOfReferenceUID
        (ref_series,) = seg.ReferencedSeriesSequence
        assert ref_series.SeriesInstanceUID == src.SeriesInstanceUID
        source_uids = {read_uid(f) for f in files}
        assert {i.ReferencedSOPInstanceUID for i in ref_series.ReferencedInstanceSequence} == source_uids
        (segment,) = seg.SegmentSequence
        assert segment.SegmentLabel == "Sphere"
        cat, typ = segment.SegmentedPropertyCategoryCodeSequence[0], segment.SegmentedPropertyTypeCodeSequence[0]
        assert (cat.CodingSchemeDesignator, cat.CodeValue) == ("SCT", "49755003")  # Morphologically abnormal structure
        assert (typ.CodingSchemeDesignator, typ.CodeValue) == ("SCT", "4147007")  # Mass
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("example-sphere", example_plugin)
        assert segment.SegmentAlgorithmType == "AUTOMATIC"
        (equipment,) = [e for e in seg.ContributingEquipmentSequence if e.Manufacturer == "dicom-node"]
        assert equipment.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
        assert f"example-sphere {example_plugin}" in equipment.SoftwareVersions

        # The mask, per source instance, is the sphere (empty frames are left out of the SEG).
        masks, dists = expected_sphere(files, radius)
        inside = 0
        for uid, want in masks.items():
            have = seg.get_pixels_by_source_instance([uid], segment_numbers=[1], assert_missing_frames_are_empty=True)
            have = have[0, :, :, 0].astype(bool)
            differ = have != want
            # a voxel centre exactly on the surface may round either way
            assert not (differ & (np.abs(dists[uid] - radius) > 1e-6)).any(), (name, uid, int(differ.sum()))
            inside += int(want.sum())
        assert inside > 1000, f"{name}: the sphere should cover many voxels"
        assert seg.NumberOfFrames == sum(1 for m in masks.values() if m.any()) < len(files)
    # The SEGs do not trigger the rule (it matches every series) once they are stable themselves.
    time.sleep(1.5)
    assert len(node.query("select id from job")) == 2


def read_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


# -- crashes of the node ----------------------------------------------------------


def plugin_processes(node: NodeProcess) -> list[psutil.Process]:
    """The node's descendants: the fork server and the plugin processes it started."""
    assert node.proc is not None
    return psutil.Process(node.proc.pid).children(recursive=True)


def end_processes(procs: list[psutil.Process]) -> None:
    """SIGKILL these processes (by pid, checked against their start time) and reap them."""
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(procs, timeout=10)


def test_kill9_during_a_plugin_job_runs_it_again_without_duplicates(node, scp, tmp_path):
    with_faulty_plugins(node)
    node.extra_config = f"""
[tracker]
stable_after = 30
{scp.destination("scp")}
{LOCAL_PLUGINS}
{rule("slow", 'plugin = "slow-box", params = { seconds = 3 }, send_to = ["scp"]')}
"""
    node.start()
    files = labelled_ct(tmp_path, "slow", count=6)
    assert storescu(node.port, files).returncode == 0
    wait_for(lambda: jobs_by_rule(node).get("slow", {}).get("state") == "running", 20, "the job to start")
    time.sleep(1.0)  # the plugin is asleep now (it sleeps 3 s)
    children = plugin_processes(node)
    assert len(children) >= 2, "expected the fork server and a plugin process"
    node.kill9()
    # The plugin process outlives the node (see test_plugin_processes_do_not_outlive_a_killed_node); end it
    # here, or it would finish its run into the restarted node's tmp/ and log a BrokenPipeError traceback.
    end_processes(children)
    assert jobs_by_rule(node)["slow"]["state"] == "running"
    assert seg_rows(node) == [] and received_segs(scp) == []

    node.start()
    wait_for(lambda: jobs_by_rule(node)["slow"]["state"] == "succeeded", 60, "the job to be taken up again")
    node.wait_delivered(1)
    job = jobs_by_rule(node)["slow"]
    assert job["attempts"] == 2, job
    assert "which stopped (attempt 1): taking it up again" in node.log()
    rows = seg_rows(node)
    assert len(rows) == 1 and rows[0][1] == job["id"], rows
    (seg_file,) = received_segs(scp)
    assert read_uid(seg_file) == rows[0][0]

    # A crash after the SEG was stored and sent but before the job was marked done: the run after
    # it makes the same UIDs, so the index and the destination still hold one SEG.
    node.stop()
    with node.db() as c:
        c.execute("update job set state = 'running' where id = ?", (job["id"],))
    node.start()
    wait_for(lambda: jobs_by_rule(node)["slow"]["state"] == "succeeded", 60, "the third run to succeed")
    node.wait_delivered(1)
    job = jobs_by_rule(node)["slow"]
    assert job["attempts"] == 3, job
    assert "already stored by an earlier run" in job["result"], job["result"]
    assert seg_rows(node) == rows
    assert [read_uid(p) for p in received_segs(scp)] == [rows[0][0]]
    assert len(scp.received()) == 1


def test_plugin_processes_do_not_outlive_a_killed_node(node, tmp_path):
    with_faulty_plugins(node)
    node.extra_config = f"""
[tracker]
stable_after = 30
{LOCAL_PLUGINS}
{rule("hang", 'plugin = "sleeper", timeout = 60')}
"""
    node.start()
    assert storescu(node.port, labelled_ct(tmp_path, "hang")).returncode == 0
    wait_for(lambda: jobs_by_rule(node).get("hang", {}).get("state") == "running", 20, "the job to start")
    time.sleep(1.0)
    children = plugin_processes(node)
    assert children, "expected the fork server and a plugin process"
    node.kill9()
    try:
        # Nothing of the killed node should run on: not the plugin (no one enforces its timeout any more),
        # nor the fork server and its resource tracker.
        # They end by themselves, noticing their parent is gone; the bound is generous for a loaded machine.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(alive_cmdline(p) is not None for p in children):
            time.sleep(0.1)
        alive = [f"{p.pid} ({cmd[:100]})" for p in children if (cmd := alive_cmdline(p)) is not None]
        assert alive == [], f"processes of the killed node still running 20 s later: {alive}"
    finally:
        end_processes(children)


def test_failed_plugin_runs_leave_nothing_in_tmp(node, tmp_path):
    with_faulty_plugins(node)
    node.extra_config = "\n".join(
        [
            "[tracker]\nstable_after = 30\n[jobs]\nretry_delay = 0\n" + LOCAL_PLUGINS,
            rule("raise", 'plugin = "raiser"'),
            rule("always", 'plugin = "flaky"', max_attempts=2),
        ]
    )
    node.start()
    for label in ("raise", "always"):
        assert storescu(node.port, labelled_ct(tmp_path, label)).returncode == 0
    wait_for(lambda: all_jobs_ended(node, 2), 30, "both jobs to fail")
    assert [r[0] for r in node.query("select state from job")] == ["failed", "failed"]
    left = [p.relative_to(node.data_dir) for p in node.temp_files()]
    assert left == [], f"left in tmp/ by failed runs: {left}"


def test_chain_outputs_name_the_plugin_that_made_them(example_plugin, node, tmp_path):
    """A chain's job makes one output per result; each names the plugin (and parameters) that made it."""
    with_faulty_plugins(node)
    chain = (
        'plugins = [{ name = "example-sphere", params = { radius_mm = 5 } }, '
        '{ name = "slow-box", params = { seconds = 0 } }]'
    )
    node.extra_config = f"[tracker]\nstable_after = 30\n{LOCAL_PLUGINS}\n{rule('chain', chain)}"
    node.start()
    assert storescu(node.port, labelled_ct(tmp_path, "chain")).returncode == 0
    wait_for(lambda: all_jobs_ended(node, 1), 30, "the chain's job to end")
    job = jobs_by_rule(node)["chain"]
    assert job["state"] == "succeeded", job
    assert job["software"] == f"example-sphere {example_plugin}, slow-box 0.1"
    made_by, numbers = {}, {}
    for _, _, rel in seg_rows(node):
        ds = pydicom.dcmread(node.data_dir / rel, stop_before_pixels=True)
        segment = ds.SegmentSequence[0]
        algo = segment.SegmentationAlgorithmIdentificationSequence[0]
        made_by[segment.SegmentLabel] = (algo.AlgorithmName, algo.AlgorithmVersion, algo.AlgorithmParameters)
        numbers[segment.SegmentLabel] = ds.SeriesNumber
    assert numbers == {"Sphere": 9000, "Box": 9001}  # one series per result, numbered in the chain's order
    assert made_by == {
        "Sphere": ("example-sphere", example_plugin, "radius_mm=5.0"),
        "Box": ("slow-box", "0.1", "seconds=0.0"),
    }


def test_a_clean_stop_during_a_plugin_job_leaves_it_for_the_next_start(node, tmp_path):
    """SIGTERM while a plugin runs: the node stops within its grace period, the job is not failed,
    and the next start runs it again to success (regression: the fork server died with a worker thread)."""
    with_faulty_plugins(node)
    node.extra_config = f"""
[tracker]
stable_after = 30
{LOCAL_PLUGINS}
{rule("slow", 'plugin = "slow-box", params = { seconds = 14 }')}
"""
    node.start()
    assert storescu(node.port, labelled_ct(tmp_path, "slow", count=6)).returncode == 0
    wait_for(lambda: jobs_by_rule(node).get("slow", {}).get("state") == "running", 20, "the job to start")
    assert node.stop() == 0
    # Had the stop waited for the plugin (14 s, beyond the runner's grace period), the job would have
    # succeeded; it is left running for the next start. (No clock here: a loaded machine is slow.)
    job = jobs_by_rule(node)["slow"]
    assert (job["state"], job["attempts"]) == ("running", 1), job
    node.start()
    wait_for(lambda: jobs_by_rule(node)["slow"]["state"] == "succeeded", 60, "the job to run again")
    assert jobs_by_rule(node)["slow"]["attempts"] == 2
    assert "which stopped (attempt 1): taking it up again" in node.log()
    assert len(seg_rows(node)) == 1


def test_a_plugin_may_bring_its_own_segment_template(tmp_path):
    """@plugin(segment_template=...) beside the module describes the SEG; a rule's template would take precedence."""
    from helpers import make_ct_series

    from node.plugins.worker import StepSpec, WorkSpec, run

    files = make_ct_series(tmp_path / "ct", 4)
    out = tmp_path / "out"
    out.mkdir()
    res = run(
        WorkSpec(
            files=[str(f) for f in files],
            steps=[StepSpec("templated", "faulty_plugins:templated", {})],
            out_dir=str(out),
            job_key=("1.2.3", 1, "tpl", 0),
        )
    )
    assert res.ok, res.error
    seg = pydicom.dcmread(res.outputs[0].file, stop_before_pixels=True)
    assert [str(s.SegmentLabel) for s in seg.SegmentSequence] == ["Upper left", "Lower right"]
