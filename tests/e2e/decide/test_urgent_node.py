"""Urgent priority end to end: ``dicom-node rules check`` shows it, and a real node runs urgent jobs first."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys

from decide.test_urgent import CT, HEADER, RULES
from helpers import REPO, StoreSCP, series_files, storescu, wait_for

from node.decide.rules import PRIORITY_LIMIT, URGENT


def test_rules_check_shows_urgent(tmp_path):
    path = tmp_path / "node.toml"
    path.write_text(HEADER + RULES)
    env = {k: v for k, v in os.environ.items() if k != "DICOM_NODE_WEB__PORT"}
    r = subprocess.run(
        [sys.executable, "-m", "node", "rules", "check", "--config", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[1] == "  1. trauma (priority urgent, on_revision ignore)", r.stdout
    assert "     then run seg, send results to pacs, gpu optional (urgent)" in lines, r.stdout


def test_a_node_runs_urgent_jobs_first(node, tmp_path):
    """A real CT through a real node with one job worker: the jobs start in urgency order, then rule priority.

    (The stroke rule's urgent action forwards here: which plugin runs is not the point.)
    """
    scp = StoreSCP(tmp_path / "scp-out").start()
    try:
        rules = RULES.replace('"pacs"', '"scp"').replace(
            '{ type = "plugin", plugin = "seg", priority = "urgent", gpu = "optional", send_to = ["scp"] }',
            '{ type = "forward", to = ["scp"], priority = "urgent" }',
        )
        node.extra_config = f"[tracker]\nstable_after = 1\n[jobs]\nworkers = 1\n{scp.destination()}\n{rules}"
        node.start()
        files = series_files(CT)
        assert storescu(node.port, files).returncode == 0
        query = "select rule, action_index, priority, state, started_at from job order by started_at"
        rows = wait_for(
            lambda: (r := node.query(query)) and len(r) == 4 and all(x[3] == "succeeded" for x in r) and r,
            timeout=60,
            what="the four jobs to succeed",
        )
        assert [(rule, i, p) for rule, i, p, _, _ in rows] == [
            ("trauma", 0, URGENT + PRIORITY_LIMIT + 1),
            ("stroke", 1, URGENT),
            ("routine", 0, 50),
            ("stroke", 0, 0),
        ]
        starts = [dt.datetime.fromisoformat(r[4]) for r in rows]
        assert starts == sorted(starts)
        # A forward job succeeds once its deliveries are queued; the sending itself follows in the background.
        wait_for(lambda: len(scp.received()) == len(files), timeout=60, what="every instance at the receiver")
    finally:
        scp.stop()
