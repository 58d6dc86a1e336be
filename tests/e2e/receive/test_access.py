"""Who may store: called-AE check, calling-AE allowlist with host check, association limit, TLS."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest
from helpers import PEER_ENV, dcmtk, make_cert, make_ct_series, storescu

from node.dicom.pdu import PduType


def _rejected(r: subprocess.CompletedProcess) -> bool:
    return r.returncode != 0 and "Association Rejected" in (r.stderr + r.stdout)


def test_wrong_called_ae_is_rejected(node, tmp_path):
    files = make_ct_series(tmp_path / "src", 2)
    node.start()
    r = storescu(node.port, files, ae="SOMEONE_ELSE")
    assert _rejected(r), r.stderr
    assert "Called AE Title Not Recognized" in r.stderr
    assert "called AE title 'SOMEONE_ELSE' is not ours" in node.log()
    assert node.query("select count(*) from instance") == [(0,)]


def test_allowlist_with_host_check(node, tmp_path):
    node.extra_config = """
[[access.allowed_peers]]
ae_title = "GOOD"

[[access.allowed_peers]]
ae_title = "ELSEWHERE"
hosts = ["10.0.0.0/8"]
"""
    files = make_ct_series(tmp_path / "src", 2)
    node.start()
    assert storescu(node.port, files, aet="GOOD").returncode == 0
    bad = storescu(node.port, files, aet="STRANGER")
    assert _rejected(bad) and "Calling AE Title Not Recognized" in bad.stderr
    far = storescu(node.port, files, aet="ELSEWHERE")
    assert _rejected(far)
    log = node.log()
    assert "'STRANGER' is not in access.allowed_peers" in log
    assert "'ELSEWHERE' is not allowed from 127.0.0.1" in log
    assert "any calling AE title may store" not in log
    assert node.query("select calling_ae, count(*) from instance group by calling_ae") == [("GOOD", 2)]


def test_open_access_is_logged(node):
    node.start()
    assert "access.allowed_peers is empty: any calling AE title may store to this node" in node.log()


def test_association_limit_rejects_transiently(node, tmp_path):
    node.extra_config = "max_associations = 1\n"
    files = make_ct_series(tmp_path / "src", 1)
    node.start()
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE("HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert held.is_established
    try:
        r = storescu(node.port, files)
        assert _rejected(r), r.stderr
        assert "Local Limit Exceeded" in r.stderr
    finally:
        held.release()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the slot frees once the release is processed
        if storescu(node.port, files).returncode == 0:
            break
        time.sleep(0.2)
    else:
        pytest.fail("the association slot was not freed after release")
    assert "node.max_associations (1) reached" in node.log()


def test_port_scanner_does_not_disturb(node, tmp_path):
    """Connections that close without a PDU (health checks, scanners) are harmless."""
    files = make_ct_series(tmp_path / "src", 2)
    node.start()
    for _ in range(5):
        with socket.create_connection(("127.0.0.1", node.port)):
            pass
    with socket.create_connection(("127.0.0.1", node.port)) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        s.settimeout(5)
        assert s.recv(10)[:1] == bytes([PduType.A_ABORT])  # not an A-ASSOCIATE-RQ
    assert storescu(node.port, files).returncode == 0


def test_tls_with_client_certificates(node, tmp_path):
    server_key, server_cert = make_cert(tmp_path, "server")
    client_key, client_cert = make_cert(tmp_path, "client")
    node.extra_config = f"""
[tls]
enabled = true
certificate = "{server_cert}"
private_key = "{server_key}"
client_ca = "{client_cert}"
"""
    files = make_ct_series(tmp_path / "src", 3)
    node.start(wait=False)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", node.port), timeout=1):
                break
        except OSError:
            time.sleep(0.2)
    ok = subprocess.run(
        [
            dcmtk("storescu"),
            "+tls",
            str(client_key),
            str(client_cert),
            "+cf",
            str(server_cert),
            "-aec",
            "DICOM_NODE",
            "127.0.0.1",
            str(node.port),
            *map(str, files),
        ],
        capture_output=True,
        text=True,
        env=PEER_ENV,
        timeout=60,
    )
    assert ok.returncode == 0, ok.stderr
    assert node.query("select count(*) from instance") == [(3,)]
    # Plain TCP and a TLS client without a certificate are both refused.
    plain = storescu(node.port, files)
    assert plain.returncode != 0
    anon = subprocess.run(
        [
            dcmtk("storescu"),
            "+tla",
            "+cf",
            str(server_cert),
            "-aec",
            "DICOM_NODE",
            "127.0.0.1",
            str(node.port),
            str(files[0]),
        ],
        capture_output=True,
        text=True,
        env=PEER_ENV,
        timeout=60,
    )
    assert anon.returncode != 0
    assert node.query("select count(*) from instance") == [(3,)]
    assert "TLS handshake with 127.0.0.1" in node.log()
