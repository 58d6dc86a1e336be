"""A study rule in a running node: two series of one study sent by DCMTK in separate associations.

The rule names two inputs (a plain and a contrast CT of the real CT head's study); the first series alone
leaves it "waiting for ct_contrast" (rules explain, the series page); the node is restarted while it waits;
then the contrast series arrives and the rule fires once: a study plugin (takes = "study") gets both named
SeriesInputs, a series plugin in the same rule gets the primary with ``.study`` set, and the outputs (SEGs)
are built on the primary series.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
from helpers import REPO, TEST_PLUGINS, NodeProcess, storescu, wait_for
from helpers.studies import series_uid, study_series
from pydicom import dcmread

TOKEN = "study-rules-token-0123456789"


def _config(reports: Path) -> str:
    return f"""
[tracker]
stable_after = 1
[web]
token = "{TOKEN}"
[plugins.local]
pair = "study_plugins:pair"
one = "study_plugins:one"
[[rules]]
name = "enhancement"
scope = "study"
primary = "ct_contrast"
match = {{ Modality = "CT" }}
inputs.ct_plain = {{ ContrastBolusAgent = {{ exists = false }} }}
inputs.ct_contrast = {{ ContrastBolusAgent = {{ exists = true }} }}
[[rules.actions]]
type = "plugin"
plugin = "pair"
params = {{ report = "{reports / "pair.json"}" }}
series_number = 9100
[[rules.actions]]
type = "plugin"
plugin = "one"
params = {{ report = "{reports / "one.json"}" }}
series_number = 9200
"""


def _explain(node: NodeProcess, uid: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "DICOM_NODE_WEB__PORT"} | node.env
    r = subprocess.run(
        [sys.executable, "-m", "node", "rules", "explain", uid, "--config", str(node.config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    return r.stdout


def _jobs(node: NodeProcess) -> list[tuple]:
    return node.query("select rule, action_index, state, series_fk, study_trigger_fk, last_error from job order by id")


def test_a_study_rule_waits_for_its_input_across_a_restart_then_runs_its_plugins_once(tmp_path: Path) -> None:
    reports = tmp_path / "reports"
    reports.mkdir()
    plain = study_series(tmp_path / "plain", 2, contrast=False)
    contrast = study_series(tmp_path / "contrast", 3, contrast=True, count=4)
    node = NodeProcess(tmp_path / "node", extra_config=_config(reports))
    node.env = {"PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    node.start()
    try:
        assert storescu(node.port, plain).returncode == 0
        wait_for(
            lambda: node.query("select study_rules_waiting from study where study_rules_waiting != ''"),
            30,
            "the study rule to wait",
        )
        assert _jobs(node) == []
        explained = _explain(node, series_uid(plain))
        assert "enhancement" in explained and "WAITING -- waiting for ct_contrast" in explained, explained
        page = httpx.get(
            f"http://127.0.0.1:{node.web_port}/series/{series_uid(plain)}",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert page.status_code == 200 and "waiting for ct_contrast" in page.text, page.text[-2000:]

        node.stop()
        node.start()  # nothing about the waiting rule lived only in memory
        assert storescu(node.port, contrast).returncode == 0
        wait_for(
            lambda: (
                [j for j in _jobs(node) if j[2] in ("succeeded", "failed")] == _jobs(node) and len(_jobs(node)) == 2
            ),
            120,
            "both jobs of the study rule to finish",
        )
    finally:
        node.stop()

    jobs = _jobs(node)
    assert [j[2] for j in jobs] == ["succeeded", "succeeded"], jobs
    [(trigger_id, revision)] = node.query("select id, revision from study_trigger")
    [(contrast_id,)] = node.query("select id from series where series_instance_uid = ?", series_uid(contrast))
    assert {(j[3], j[4]) for j in jobs} == {(contrast_id, trigger_id)}  # on the primary, of the one firing

    pair = json.loads((reports / "pair.json").read_text())
    assert pair["takes"] == "study" and pair["primary"] == series_uid(contrast)
    assert pair["inputs"] == {
        "ct_plain": {"series_uid": series_uid(plain), "slices": 3},
        "ct_contrast": {"series_uid": series_uid(contrast), "slices": 4},
    }
    assert pair["study_uid"] == str(dcmread(plain[0], stop_before_pixels=True).StudyInstanceUID)
    assert pair["priors"] == []
    one = json.loads((reports / "one.json").read_text())
    assert one["takes"] == "series" and one["series_uid"] == series_uid(contrast)
    assert one["study"]["inputs"] == pair["inputs"]

    # The outputs (one SEG per job) reference the primary series.
    segs = node.query("select file_path from instance where job_fk is not null")
    assert len(segs) == 2, segs
    for (rel,) in segs:
        seg = dcmread(node.data_dir / rel)
        referenced = {s.SeriesInstanceUID for s in seg.ReferencedSeriesSequence}
        assert referenced == {series_uid(contrast)}, referenced
