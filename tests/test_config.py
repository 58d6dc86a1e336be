"""A bad config names the file, the key and what is wrong; the node does not start."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO

from node.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "node.toml"
    p.write_text(text)
    return p


def test_defaults_work_without_a_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, environ={})
    assert cfg.node.port == 11112 and cfg.node.ae_title == "DICOM_NODE"
    assert cfg.database_url == f"sqlite:///{tmp_path / 'var' / 'index.sqlite'}"


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("[node]\nport = 70000\n", "node.port", "less than or equal to 65535"),
        ("[node]\nprot = 104\n", "node.prot", "unknown key"),
        ('[node]\nae_title = "THIS_TITLE_IS_TOO_LONG"\n', "node.ae_title", "at most 16 characters"),
        ('[node]\nduplicates = "newest"\n', "node.duplicates", "keep_first"),
        ("[node]\nmax_pdu = 100\n", "node.max_pdu", "at least 4096"),
        (
            '[[access.allowed_peers]]\nae_title = "CT1"\nhosts = ["not-an-ip"]\n',
            "access.allowed_peers[0].hosts",
            "not an IP address",
        ),
        ('[[destinations]]\nname = "pacs"\nae_title = "PACS"\nhost = "h"\n', "destinations[0].port", "required"),
        ('[[destinations]]\nname = "web"\ntype = "dicomweb"\n', "destinations[0]", "url required"),
        (
            '[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "http://h/dicom-web"\nstorage_commitment = true\n',
            "destinations[0]",
            "storage_commitment: DIMSE settings",
        ),
        ('[[destinations]]\nname = "web"\ntype = "dicomweb"\nurl = "ftp://h"\n', "destinations[0].url", "not an http"),
        ("[tls]\nenabled = true\n", "tls", "certificate is not set"),
        ("[nod]\nport = 1\n", "nod", "unknown key"),
    ],
)
def test_errors_name_file_key_and_problem(tmp_path, text, key, words):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        load_config(path, environ={})
    msg = str(e.value)
    assert str(path) in msg
    assert f"  {key}:" in msg, msg
    assert words in msg, msg


def test_toml_syntax_error_names_the_line(tmp_path):
    path = write(tmp_path, "[node]\nport = = 1\n")
    with pytest.raises(ConfigError, match=r"node.toml is not valid TOML: .*line 2"):
        load_config(path, environ={})


def test_environment_overrides(tmp_path):
    path = write(tmp_path, "[node]\nport = 2000\n")
    cfg = load_config(
        path,
        environ={
            "DICOM_NODE_NODE__PORT": "3000",
            "DICOM_NODE_DATABASE__URL": "sqlite:///x.db",
            "DICOM_NODE_ACCESS__CHECK_CALLED_AE": "false",
        },
    )
    assert cfg.node.port == 3000
    assert cfg.database_url == "sqlite:///x.db"
    assert cfg.access.check_called_ae is False
    assert "DICOM_NODE_NODE__PORT" in cfg.source


def test_bad_environment_value_is_named(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(None, environ={"DICOM_NODE_NODE__PORT": "many"})
    assert "node.port: Input should be a valid integer" in str(e.value)
    assert "[set by DICOM_NODE_NODE__PORT]" in str(e.value)


def test_example_config_is_valid():
    cfg = load_config(REPO / "config" / "node.toml", environ={})
    assert cfg.node.ae_title == "DICOM_NODE"


def test_node_does_not_start_on_a_bad_config(tmp_path):
    path = write(tmp_path, "[node]\nport = -1\n")
    r = subprocess.run(
        [sys.executable, "-m", "node", "run", "--config", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=60,
    )
    assert r.returncode == 2
    assert "node.port" in r.stderr and str(path) in r.stderr
    assert not (tmp_path / "var").exists()


def test_a_token_of_digits_from_the_environment_stays_a_string():
    cfg = load_config(None, environ={"DICOM_NODE_WEB__TOKEN": "12345678901234567890", "DICOM_NODE_NODE__PORT": "11113"})
    assert cfg.web.token == "12345678901234567890" and cfg.node.port == 11113
