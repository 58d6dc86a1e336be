"""The command line as an administrator uses it: echo, send, status, help."""

from __future__ import annotations

import subprocess
import sys

from helpers import free_port, make_ct_series


def cli(*args: str, cwd=None, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )


def test_help_everywhere():
    for args in ([], ["run"], ["echo"], ["send"], ["status"]):
        r = cli(*args, "--help")
        assert r.returncode == 0, r.stderr
        assert "Usage" in r.stdout


def test_echo_and_send_and_status(node, tmp_path):
    make_ct_series(tmp_path / "src", 12)
    (tmp_path / "src" / "notes.txt").write_text("not DICOM")
    node.start()
    r = cli("echo", "127.0.0.1", str(node.port), "--aec", "DICOM_NODE")
    assert r.returncode == 0 and "status 0x0000" in r.stdout
    r = cli("send", "127.0.0.1", str(node.port), str(tmp_path / "src"), "--aec", "DICOM_NODE", "--aet", "CLI")
    # 12 instances stored; the text file is reported as skipped, so the exit code says not everything went.
    assert "12 sent, 0 failed, 1 skipped" in r.stdout, r.stdout + r.stderr
    assert "notes.txt" in r.stderr
    assert r.returncode == 1
    assert node.query("select count(*) from instance where calling_ae = 'CLI'") == [(12,)]
    r = cli("status", "--config", str(node.config_path))
    assert r.returncode == 0, r.stderr
    assert "instances: 12" in r.stdout and "series: 1" in r.stdout
    assert "TEST^SYNTHETIC" in r.stdout


def test_send_reports_refusals(node, tmp_path):
    files = make_ct_series(tmp_path / "src", 2)
    node.env = {"DICOM_NODE_NODE__MIN_FREE_MB": "100000000"}  # more than any disk: every store is refused
    node.start()
    r = cli("send", "127.0.0.1", str(node.port), *map(str, files), "--aec", "DICOM_NODE")
    assert r.returncode == 1
    assert "0xA700" in r.stdout and "0 sent, 2 failed" in r.stdout
    assert "below node.min_free_mb" in r.stderr
    assert node.query("select count(*) from instance") == [(0,)]
    assert node.stored_files() == [] and node.temp_files() == []


def test_echo_to_nothing_fails_clearly():
    r = cli("echo", "127.0.0.1", str(free_port()), "--timeout", "3")
    assert r.returncode == 1
    assert "C-ECHO failed" in r.stderr


def test_status_without_an_index_says_so(tmp_path):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "nothing"}"\n')
    r = cli("status", "--config", str(cfg))
    assert r.returncode == 1
    assert "no index at" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "nothing").exists(), "status creates nothing"
