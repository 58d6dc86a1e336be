"""scripts/soak.py keeps working: a 20-second soak with two senders (one storescu, one node SCU) passes.

The real soak (10 minutes, 8 senders) is run by hand; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from helpers import REPO

SCRIPTS = REPO / "scripts"


@pytest.fixture(scope="module")
def soak():
    sys.path.insert(0, str(SCRIPTS))
    try:
        import soak as module
    finally:
        sys.path.remove(str(SCRIPTS))
    return module


def test_memory_figures_show_growth_and_slope(soak):
    samples = [
        soak.Sample(t, "load", 100.0 + t / 60.0, 100.0 + t / 60.0, 0, None, None, None, None) for t in range(0, 601, 3)
    ]  # 1 MiB per minute
    samples.append(soak.Sample(700, "drain", 500.0, 500.0, 0, None, None, None, None))  # not part of the load
    m = soak.memory_figures(samples, 600.0)
    assert m["window_s"] == 60.0
    assert m["rss_mib"]["slope_after_first_window_mib_per_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["rss_mib"]["slope_second_half_mib_per_min"] == pytest.approx(1.0, abs=1e-6)
    assert m["rss_mib"]["first_window_median"] == pytest.approx(100.5, abs=0.01)
    assert m["rss_mib"]["last_window_median"] == pytest.approx(109.5, abs=0.01)
    assert m["rss_mib"]["max"] < 111


def test_a_short_soak_passes(tmp_path):
    result_file = tmp_path / "soak.json"
    log = tmp_path / "soak.log"
    with open(log, "wb") as out:  # never a pipe: the script starts servers
        r = subprocess.run(
            [
                sys.executable,
                str(SCRIPTS / "soak.py"),
                "--seconds",
                "20",
                "--senders",
                "2",
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
    assert r.returncode == 0, text[-3000:]
    result = json.loads(result_file.read_text())
    assert result["ok"] is True and result["problems"] == [], result["problems"]
    load, index, forward = result["load"], result["index"], result["forward"]
    assert load["associations_by_tool"]["storescu"] > 0 and load["associations_by_tool"]["node-scu"] > 0
    assert load["failed_associations"] == 0
    assert load["instances_sent"] == load["associations"] * 20 > 0
    assert index["lost"] == 0 and index["instances"] == load["instances_sent"]
    assert forward["delivery_states"] == {"delivered": load["instances_sent"]}
    assert forward["received_by_storescp"] == load["instances_sent"] and forward["not_received"] == 0
    assert result["memory"]["rss_mib"]["max"] > 0
    assert result["node_exit_code"] == 0
    assert "soak: PASS" in text
