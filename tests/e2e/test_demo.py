"""``dicom-node demo``, run as a user runs it: from a clean folder, to the SEG and SC in the downstream PACS.

Each run starts a real node, a real PACS (Orthanc, or the demo's built-in storage SCP) and sends the
bundled CT series. What the PACS holds is read back from the PACS's own storage files after the
demo has stopped, not taken from the demo's output.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import psutil
import pydicom
import pytest
from helpers import REPO

from node.demo.run import bundled_series
from node.demo.workdir import MARKER, WorkdirError, prepare

SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SC = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
TIMED = r"\+\s*\d+\.\d\d s  "  # "+  2.61 s  " before every step of the run
DURATION = r"\(\d+\.\d\d s\)"


def run_demo(tmp_path: Path, data_dir: Path, *args: str, timeout: float = 420) -> tuple[int, str]:
    """The demo in a subprocess; its output goes to a file (its servers must not hold a pipe open)."""
    out = tmp_path / "demo.out"
    with open(out, "wb") as f:
        proc = subprocess.run(
            [sys.executable, "-m", "node", "demo", "--data-dir", str(data_dir), "--no-keep-running", *args],
            cwd=tmp_path,
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return proc.returncode, out.read_text(errors="replace")


def stored_classes(folder: Path) -> tuple[Counter[str], list[pydicom.Dataset]]:
    """SOP classes of the DICOM files below ``folder`` (whatever their names), and their headers."""
    classes: Counter[str] = Counter()
    headers = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            continue
        classes[str(ds.SOPClassUID)] += 1
        headers.append(ds)
    return classes, headers


def children_left(data_dir: Path) -> list[str]:
    """Processes still running with the demo's folder on their command line (a node or an Orthanc left behind)."""
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(data_dir) in cmd:
            left.append(f"{p.pid}: {cmd}")
    return left


def check_run(output: str, data_dir: Path, pacs_files: Path) -> None:
    source = pydicom.dcmread(bundled_series()[0], stop_before_pixels=True)
    # Each step, live, with the time since sending began and its own duration.
    for step in (
        r"received 28/28 CT images",
        r"series stable: no instance for 2 s",
        r"rule matched: demo-ct -> 3 job\(s\)",
        r"plugin threshold-seg 1\.0 ran \(load [\d.]+ s, plugin [\d.]+ s",
        r"plugin mip-sc 1\.0 ran",
        r"built 1 SEG \(Segmentation Storage\)",
        r"built \d+ SC \(Secondary Capture Image Storage\)",
        r"delivered to pacs: (\d+)/\1 \(28 CT, \d+ SC, 1 SEG\)",
    ):
        assert re.search(TIMED + step, output), f"no timed step {step!r} in:\n{output}"
    for step in ("received 28/28", "series stable", "plugin threshold-seg 1.0 ran", "delivered to pacs"):
        line = next(line for line in output.splitlines() if step in line)
        assert re.search(DURATION + r"$", line.rstrip()), f"no duration on {line!r}"
    times = [float(m) for m in re.findall(r"^\+\s*(\d+\.\d\d) s  ", output, re.M)]
    assert len(times) >= 12 and times[-1] > 2.0, output  # at least the 2 s of stable_after
    assert "Where to look" in output and f"dicom-node status --config {data_dir.name}/node.toml" in output, output
    assert re.search(r"dashboard\s+http://127\.0\.0\.1:\d+/login\?token=[0-9a-f]{32}", output), output

    # What the PACS really stored: its own files, read after the demo stopped it.
    classes, headers = stored_classes(pacs_files)
    sc = sum(n for c, n in classes.items() if c.startswith(SC))
    assert classes[SEG] == 1 and sc >= 1 and classes[CT] == 28, classes
    assert sum(classes.values()) == 28 + 1 + sc, classes
    seg = next(h for h in headers if h.SOPClassUID == SEG)
    assert seg.StudyInstanceUID == source.StudyInstanceUID
    assert {r.SeriesInstanceUID for r in seg.ReferencedSeriesSequence} == {source.SeriesInstanceUID}
    sent = {str(h.SOPInstanceUID) for h in headers if h.SOPClassUID == CT}
    assert sent == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in bundled_series()}

    summary = json.loads((data_dir / "demo-summary.json").read_text())
    assert summary["ok"] is True and summary["pacs_holds"] == {"CT": 28, "SEG": 1, "SC": sc}, summary
    assert not children_left(data_dir), children_left(data_dir)


def test_demo_with_orthanc_ends_with_seg_and_sc_in_orthanc(tmp_path: Path):
    data_dir = tmp_path / "demo"
    code, output = run_demo(tmp_path, data_dir, "--pacs", "orthanc")
    assert code == 0, output
    assert re.search(r"PACS ready: Orthanc [\d.]+", output), output
    assert re.search(TIMED + r"Orthanc holds 28 CT, \d+ SC, 1 SEG \(asked through its REST API\)", output), output
    assert "/app/explorer.html" in output
    check_run(output, data_dir, data_dir / "pacs" / "storage")
    # The config it wrote is a usable node config: the commands it points at work on it.
    r = subprocess.run(
        [sys.executable, "-m", "node", "status", "--config", str(data_dir / "node.toml")],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "deliveries to pacs: delivered: 32" in " ".join(r.stdout.split()), r.stdout


def test_demo_with_the_builtin_scp_ends_with_seg_and_sc_in_its_files(tmp_path: Path):
    data_dir = tmp_path / "demo"
    code, output = run_demo(tmp_path, data_dir, "--pacs", "builtin")
    assert code == 0, output
    assert "PACS ready: built-in storage SCP" in output, output
    assert re.search(TIMED + r"built-in storage SCP holds 28 CT, \d+ SC, 1 SEG", output), output
    check_run(output, data_dir, data_dir / "pacs" / "received")


def test_demo_refuses_a_folder_it_did_not_make_and_a_run_without_fresh(tmp_path: Path):
    """Never delete what the demo did not make; a folder of an earlier demo run needs --fresh."""
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "precious.dcm").write_bytes(b"keep me")
    code, output = run_demo(tmp_path, theirs, "--fresh", timeout=120)
    assert code == 2, output
    assert "was not made by `dicom-node demo`" in " ".join(output.split()), output
    assert (theirs / "precious.dcm").read_bytes() == b"keep me" and sorted(p.name for p in theirs.iterdir()) == [
        "precious.dcm"
    ]

    ours = tmp_path / "ours"
    prepare(ours, fresh=False).close()
    (ours / "node.log").write_text("an earlier run")
    with pytest.raises(WorkdirError, match="--fresh"):
        prepare(ours, fresh=False)
    assert (ours / "node.log").exists()
    lock = prepare(ours, fresh=True)
    try:
        assert sorted(p.name for p in ours.iterdir()) == sorted([MARKER, "demo.lock"])
        with pytest.raises(WorkdirError, match="another demo is running"):
            prepare(ours, fresh=True)  # the lock is held: a running demo's folder is never wiped
    finally:
        lock.close()
