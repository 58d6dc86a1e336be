"""The sender against real peers: TLS with a client certificate to DCMTK storescp, a peer out of resources
retried until it has room, and a large instance forwarded without being loaded whole."""

from __future__ import annotations

import socket
import subprocess
import time

from helpers import PEER_ENV, dcmtk, free_port, make_cert, make_ct_series, read_sop_uid

from node.send.scu import Peer, send_files

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT, IMPLICIT, J2K, RLE = (
    "1.2.840.10008.1.2.1",
    "1.2.840.10008.1.2",
    "1.2.840.10008.1.2.4.90",
    "1.2.840.10008.1.2.5",
)


def test_tls_destination_with_client_certificate_to_dcmtk_storescp(tmp_path):
    server_key, server_cert = make_cert(tmp_path, "server")
    client_key, client_cert = make_cert(tmp_path, "client")
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    proc = subprocess.Popen(
        [
            dcmtk("storescp"),
            "-aet",
            "TLSSCP",
            "+tls",
            str(server_key),
            str(server_cert),
            "+cf",
            str(client_cert),
            "-rc",
            "-od",
            str(out),
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=PEER_ENV,
    )
    try:
        deadline = time.monotonic() + 10
        while proc.poll() is None and time.monotonic() < deadline:  # listening?
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        assert proc.poll() is None, "storescp with TLS did not start"
        files = make_ct_series(tmp_path / "ct", 3)
        from node.config import DestinationSection

        d = DestinationSection(
            name="tls",
            ae_title="TLSSCP",
            host="127.0.0.1",
            port=port,
            tls=dict(
                enabled=True, ca=server_cert, certificate=client_cert, private_key=client_key, check_hostname=False
            ),
        )
        summary = send_files(Peer.from_destination(d, "DICOM_NODE"), files)
        assert summary.ok and summary.sent == 3, summary.errors
        assert {read_sop_uid(p) for p in out.iterdir()} == {read_sop_uid(f) for f in files}
        # without our certificate the peer refuses: a clear, transient (connection-level) failure
        anon = DestinationSection(
            name="anon",
            ae_title="TLSSCP",
            host="127.0.0.1",
            port=port,
            tls=dict(enabled=True, ca=server_cert, check_hostname=False),
        )
        refused = send_files(Peer.from_destination(anon, "DICOM_NODE"), files[:1])
        assert refused.failed == 1 and refused.errors[0][1], refused.errors
    finally:
        proc.terminate()
        proc.wait(10)


def test_out_of_resources_is_retried_until_the_peer_has_room(node, tmp_path):
    """0xA700 from a real peer (a second node whose disk is 'full') is transient: retried, then delivered."""
    from helpers import NodeProcess, storescu, wait_for

    full = NodeProcess(tmp_path / "downstream", ae_title="DOWNSTREAM")
    full.env["DICOM_NODE_NODE__MIN_FREE_MB"] = "100000000"  # more than any disk: every C-STORE gets 0xA700
    full.start()
    try:
        node.extra_config = f"""
[tracker]
stable_after = 1
[[destinations]]
name = "down"
ae_title = "DOWNSTREAM"
host = "127.0.0.1"
port = {full.port}
retry = {{ initial_delay = 0.5, max_delay = 1, jitter = 0 }}
[[rules]]
name = "route"
actions = [{{ type = "forward", to = ["down"] }}]
"""
        node.start()
        files = make_ct_series(tmp_path / "ct", 4, seed=9)
        assert storescu(node.port, files).returncode == 0
        wait_for(lambda: (node.query("select max(attempts) from delivery")[0][0] or 0) >= 3, 30, "several attempts")
        rows = node.query("select state, last_status, last_error from delivery where last_status is not null")
        # Transient, so never failed: waiting for the next try, or in it already (retries come every second).
        assert rows and all(
            r[0] in ("queued", "sending") and r[1] == 0xA700 and "out of resources" in r[2] for r in rows
        ), rows
        full.stop()
        del full.env["DICOM_NODE_NODE__MIN_FREE_MB"]
        full.start()  # room again
        node.wait_delivered(4, timeout=30)
        assert full.query("select count(*) from instance") == [(4,)]
    finally:
        full.stop()


def test_a_large_instance_is_forwarded_without_being_loaded_whole(node, tmp_path):
    """A 400 MB instance goes through the node (in and out) while its peak memory stays far below that."""
    import numpy as np
    import pydicom
    from helpers import StoreSCP, storescu

    src = make_ct_series(tmp_path / "ct", 1, rows=64, cols=64)[0]
    ds = pydicom.dcmread(src)
    ds.Rows = ds.Columns = 14_000  # 14000 x 14000 x 2 bytes = 392 MB of pixel data
    ds.PixelData = np.zeros((14_000, 14_000), np.int16).tobytes()
    big = tmp_path / "big.dcm"
    ds.save_as(big, enforce_file_format=True)
    del ds
    size = big.stat().st_size
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[[rules]]
name = "route"
actions = [{{ type = "forward", to = ["scp"] }}]
"""
        node.start()
        assert storescu(node.port, [big]).returncode == 0
        node.wait_delivered(1, timeout=120)
        (got,) = scp.received()
        assert got.stat().st_size >= size - 1024  # storescp's own File Meta may differ by a few bytes
        peak_kb = next(
            int(line.split()[1]) for line in open(f"/proc/{node.proc.pid}/status") if line.startswith("VmHWM:")
        )
    finally:
        scp.stop()
    print(f"node peak memory {peak_kb / 1024:.0f} MiB for a {size / 2**20:.0f} MiB instance (received and forwarded)")
    assert peak_kb < 300 * 1024, (
        f"the node's peak memory was {peak_kb / 1024:.0f} MiB for a {size / 2**20:.0f} MiB instance"
    )
