"""scripts/bench/bench_qr.py and bench_dicomweb.py keep working: their smallest runs pass.

bench_qr fills the node and Orthanc by C-STORE and checks every C-FIND answer of both against the
generated data; bench_dicomweb checks that STOW-RS stored every instance in the node and in Orthanc's
DICOMweb plugin and that WADO-RS returned every one. Either exits 1 otherwise. No speed is asserted: the
full benchmarks are run by hand and their figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO

BENCH = REPO / "scripts" / "bench"


def run(tmp_path: Path, script: str, *args: str) -> dict:
    """Run ``script`` with ``args`` and --json; its JSON result (the log's end in the message if it fails)."""
    result_file = tmp_path / "bench.json"
    log = tmp_path / "bench.log"
    with open(log, "wb") as out:  # never a pipe: the script starts servers
        r = subprocess.run(
            [sys.executable, str(BENCH / script), *args, "--json", str(result_file), "--workdir", str(tmp_path / "w")],
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            timeout=300,
        )
    text = log.read_text(errors="replace")
    assert r.returncode == 0, text[-4000:]
    return dict(json.loads(result_file.read_text()))


def test_c_find_answers_of_the_node_and_orthanc_match_the_data(tmp_path: Path) -> None:
    result = run(
        tmp_path, "bench_qr.py", "--sizes", "60", "--queries", "3", "--settle", "0", "--cache", str(tmp_path / "c")
    )
    assert result["problems"] == []
    servers = result["results"]["60"]
    assert set(servers) == {"node", "orthanc"}
    for name, r in servers.items():
        assert r["stored"] == 60 and r["fill_s"] > 0 and not r["error"], (name, r)
        assert {k: len(v) for k, v in r["latencies_ms"].items()} == dict.fromkeys(
            ("patient-id", "name-wildcard", "date-range", "series"), 3
        ), (name, r)
        assert r["matches"]["series"] == [1, 1, 1]
    assert result["command"].endswith(f"--json {tmp_path / 'bench.json'} --workdir {tmp_path / 'w'}")


def test_stow_and_wado_of_the_node_and_orthanc_store_and_return_every_instance(tmp_path: Path) -> None:
    result = run(tmp_path, "bench_dicomweb.py", "--count", "6", "--repeat", "1", "--batch", "4", "--wado-repeat", "1")
    res = result["results"]
    assert res["problems"] == []
    assert set(res["store_s"]) == {"node stow", "node c-store", "orthanc stow", "orthanc c-store"}
    assert set(res["wado_s"]) == {"node", "orthanc"}
    assert all(b[0] > 6 * 512 * 512 * 2 for b in res["wado_bytes"].values()), res["wado_bytes"]
