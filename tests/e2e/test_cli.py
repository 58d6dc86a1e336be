"""The command line as an administrator uses it: echo, send, status, help."""

from __future__ import annotations

import shutil
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
    # 12 instances stored; the text file is named as skipped, and every instance sent was stored: exit 0.
    assert "12 sent, 0 failed; skipped 1 non-DICOM file" in r.stdout, r.stdout + r.stderr
    assert "notes.txt" in r.stderr
    assert r.returncode == 0
    assert node.query("select count(*) from instance where calling_ae = 'CLI'") == [(12,)]
    r = cli("status", "--config", str(node.config_path))
    assert r.returncode == 0, r.stderr
    assert "instances: 12" in r.stdout and "series: 1" in r.stdout
    assert "TEST^SYNTHETIC" in r.stdout


def test_send_skips_a_dicomdir_and_non_dicom_files(node, tmp_path, shared_data):
    """A folder copied from a CD: its DICOMDIR and stray files are left out and named, the images are stored."""
    src = shared_data / "series" / "ct-head-philips-5mm"
    folder = tmp_path / "cd"
    folder.mkdir()
    for name in ("DIRFILE", "I10", "I20", "I30"):
        shutil.copy(src / name, folder / name)
    (folder / "README.TXT").write_text("Patient CD viewer: run VIEWER.EXE")
    # A damaged copy: the image's bytes without its preamble, File Meta and first elements.
    (folder / "I40.part").write_bytes((src / "I40").read_bytes()[4000:])
    node.start()
    r = cli("send", "127.0.0.1", str(node.port), str(folder), "--aec", "DICOM_NODE")
    assert "3 sent, 0 failed; skipped 1 DICOMDIR, 2 non-DICOM files" in r.stdout, r.stdout + r.stderr
    assert "0xA900" not in r.stdout
    assert "DIRFILE: a DICOMDIR" in r.stderr and "README.TXT" in r.stderr and "I40.part" in r.stderr
    assert r.returncode == 0, r.stdout + r.stderr
    assert node.query("select count(*) from instance") == [(3,)]


def test_send_with_nothing_to_send_fails(tmp_path, shared_data):
    shutil.copy(shared_data / "series" / "ct-head-philips-5mm" / "DIRFILE", tmp_path / "DICOMDIR")
    r = cli("send", "127.0.0.1", str(free_port()), str(tmp_path), "--timeout", "3")
    assert "0 sent, 0 failed; skipped 1 DICOMDIR" in r.stdout, r.stdout + r.stderr
    assert "no DICOM instances to send" in r.stderr
    assert r.returncode == 1


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


def test_rules_check_names_every_error_in_the_file(tmp_path):
    """Three mistakes in one match table and two in another rule: one run names all of them, each by its key."""
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        f'[node]\ndata_dir = "{tmp_path / "data"}"\n'
        '[[destinations]]\nname = "pacs"\nhost = "127.0.0.1"\nport = 104\nae_title = "PACS"\n'
        '[[rules]]\nname = "mr"\n[rules.match]\nModalty = "MR"\nSeriesDescripton = "T1"\n'
        'any = [{ BodyPartExamined = { regex = "(" } }, { StationNam = "MR1" }]\n'
        '[[rules.actions]]\ntype = "forward"\nto = ["pacs"]\n'
        '[[rules]]\nname = "ct"\npriority = "high"\n[rules.match]\nModality = "CT"\nnot = { ImageTyp = "X" }\n'
        '[[rules.actions]]\ntype = "forward"\nto = ["pacs"]\n'
    )
    r = cli("rules", "check", "--config", str(cfg))
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line.strip() for line in r.stderr.splitlines()]
    assert lines[0].startswith(f"error: invalid rules in {cfg}"), r.stderr
    keys = [line.split(":")[0] for line in lines[1:]]
    assert keys == [
        'rules[0] ("mr").match.Modalty',
        'rules[0] ("mr").match.SeriesDescripton',
        'rules[0] ("mr").match.any[0].BodyPartExamined.regex',
        'rules[0] ("mr").match.any[1].StationNam',
        'rules[1] ("ct").priority',
        'rules[1] ("ct").match.not.ImageTyp',
    ], r.stderr
    assert "'SeriesDescripton' is not a DICOM keyword" in r.stderr
    assert "invalid regular expression '('" in r.stderr
