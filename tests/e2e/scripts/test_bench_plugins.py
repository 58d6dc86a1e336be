"""scripts/bench/bench_plugins.py keeps working: its smallest run (one job each way on the real CT, a 20-slice transfer) passes.

It runs the example model in its own environment (numpy 1, pydicom 2) through the node's job path with a
warm and a cold worker, and as a bare script; the three label maps must agree (the script fails otherwise).
No speed is asserted: the full benchmark is run by hand and its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO
from tests.helpers.envs import OLD_STACK, make_env

SCRIPT = REPO / "scripts" / "bench" / "bench_plugins.py"


def test_smallest_run_prints_the_ratios(tmp_path: Path, shared_data: Path) -> None:
    python = make_env(
        [*OLD_STACK, "onnxruntime", "onnx"], [REPO / "sdk", REPO / "examples" / "onnx-organs"], tag="onnx"
    )
    result_file = tmp_path / "bench.json"
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:  # never a pipe: the script starts workers
        r = subprocess.run(
            [
                sys.executable,
                str(SCRIPT),
                "--quick",
                "--python",
                str(python),
                "--data",
                str(shared_data),
                "--json",
                str(result_file),
                "--workdir",
                str(tmp_path / "work"),
            ],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=600,
        )
    text = log.read_text(errors="replace")
    assert r.returncode == 0, text[-4000:]
    number = r"(\d+\.\d+)"
    for line in (
        rf"ratio warm/bare \(CT 28 slices\): {number}",
        rf"ratio cold/warm \(CT 28 slices\): {number}",
        rf"warm overhead \(CT 28 slices\): -?{number} ms per job",
        rf"ratio copy/np.load \(20x512x512 int16\): {number}",
        rf"ratio zero-copy/np.load \(20x512x512 int16\): {number}",
    ):
        assert re.search(line, text), f"no line matching {line!r} in:\n{text[-4000:]}"
    result = json.loads(result_file.read_text())
    jobs = {j["way"]: j for j in result["jobs"]}
    assert set(jobs) == {"bare", "warm", "cold", "empty"} and all(j["ok"] for j in jobs.values()), jobs
    # The same model in three ways: the same voxels labelled (the SEG's set bits = the bare label map's).
    assert jobs["bare"]["labelled"] == jobs["warm"]["labelled"] == jobs["cold"]["labelled"] > 0
    assert jobs["warm"]["timings"]["plugin"] > 0 and jobs["warm"]["timings"]["build"] > 0
    assert jobs["cold"]["start"] > 0 and jobs["warm"]["worker_pid"] != jobs["cold"]["worker_pid"]
    transfers = {t["way"]: t for t in result["transfers"]}
    assert set(transfers) == {"np.load", "copy", "zero-copy", "copy-write"}
    assert all(t["ok"] and t["total"] > 0 for t in transfers.values()), transfers
    assert result["settings"]["transfer_shape"] == [20, 512, 512]
