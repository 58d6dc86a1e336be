"""A destination's circuit breaker in a running node: while a PACS is down exactly one association probes at a
time, a restart keeps the open circuit and its back-off, and an outage, a restart and a permanent refusal end
with everything delivered. The node runs as a subprocess against DCMTK storescp, or against a loopback port
nobody listens on (a PACS that is down: connection refused). The breaker on its own: tests/send/test_circuit.py.
"""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
from helpers import (
    PEER_ENV,
    dcmtk,
    free_port,
    make_ct_series,
    read_sop_uid,
    series_files,
    storescu,
    wait_for,
    wait_for_echo,
)

from node.send.scu import Peer, send_files

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
CT = "ct-head-philips-5mm"  # 28 real axial CT images
BATCH = 32  # node.send.dispatch.BATCH: what one worker claims at a time


def _storescp(port: int, out: Path, *args: str) -> subprocess.Popen:
    """DCMTK storescp keeping every instance it receives in a file of its own (+uf: a resend is a new file)."""
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "PACS", "+uf", "-od", str(out), *args, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=PEER_ENV,
    )
    wait_for_echo(port, "PACS", proc=proc)
    return proc


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        proc.terminate()
        proc.wait(10)


def _received(out: Path) -> list[str]:
    """SOP Instance UIDs of what storescp stored, one per C-STORE it accepted."""
    return sorted(read_sop_uid(p) for p in out.iterdir() if p.is_file())


def _config(port: int, retry: str, max_associations: int = 2) -> str:
    return f"""
[tracker]
stable_after = 1
use_expected_counts = false
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {port}
max_associations = {max_associations}
retry = {retry}
[[rules]]
name = "route"
actions = [{{ type = "forward", to = ["pacs"] }}]
"""


def _circuit(node) -> tuple[int, dt.datetime | None, dt.datetime]:  # type: ignore[no-untyped-def]
    """(failures, retry_at, updated_at) of the destination's stored circuit."""
    rows = node.query("select failures, retry_at, updated_at from destination_circuit where destination = 'pacs'")
    if not rows:
        return 0, None, dt.datetime.min.replace(tzinfo=dt.UTC)

    def utc(v: str | None) -> dt.datetime | None:
        return None if v is None else dt.datetime.fromisoformat(v).replace(tzinfo=dt.UTC)

    failures, retry_at, updated = rows[0]
    return failures, utc(retry_at), utc(updated)  # type: ignore[return-value]


def _attempts(node) -> list[int]:  # type: ignore[no-untyped-def]
    return [a for (a,) in node.query("select attempts from delivery where destination = 'pacs' order by id")]


def test_while_a_pacs_is_down_exactly_one_association_probes_at_a_time(node, tmp_path):
    """Four associations, a dead PACS, more than two batches queued: each probe is one batch, and counts once."""
    node.extra_config = _config(
        free_port(), "{ initial_delay = 0.3, max_delay = 0.3, multiplier = 1, jitter = 0 }", max_associations=4
    )
    node.start()
    assert storescu(node.port, make_ct_series(tmp_path / "ct", 2 * BATCH + 6, rows=16, cols=16)).returncode == 0
    wait_for(lambda: _circuit(node)[0] >= 8, 60, "eight failures of the dead destination")
    node.stop()
    failures = _circuit(node)[0]
    attempts = _attempts(node)
    # Only the first batch was tried by every probe; the rest only when the circuit was still closed
    # (at most once, while the first batch was failing) -- never by a second probe at the same time.
    assert attempts[:BATCH] == [failures] * BATCH, (failures, attempts)
    assert max(attempts[BATCH:]) <= 1, attempts
    probes = node.log().count("the other associations wait for this one")
    assert probes in (failures - 1, failures), (probes, failures)  # the last one may have been cut short by the stop


def test_a_restart_keeps_the_open_circuit_and_its_backoff(node, tmp_path):
    """A node restarted during an outage keeps the circuit open, then probes with one association, counting on."""
    node.extra_config = _config(
        free_port(), "{ initial_delay = 0.5, max_delay = 600, multiplier = 8, jitter = 0 }", max_associations=4
    )
    node.start()
    assert storescu(node.port, make_ct_series(tmp_path / "ct", 2 * BATCH + 6, rows=16, cols=16)).returncode == 0
    wait_for(lambda: _circuit(node)[0] >= 3, 60, "three failures (back-off 0.5, 4, then 32 s)")
    node.stop()
    failures, retry_at, failed_at = _circuit(node)
    assert failures == 3 and retry_at is not None
    assert (retry_at - failed_at).total_seconds() == pytest.approx(32, abs=0.1)
    before = _attempts(node)

    node.start()
    time.sleep(3)  # four associations, a queue of 70, and nothing is tried: the circuit is still open
    assert dt.datetime.now(dt.UTC) < retry_at, "the restart took longer than the back-off: lengthen it"
    assert _attempts(node) == before and _circuit(node)[:2] == (3, retry_at)
    assert "3 consecutive failure(s) before the node stopped" in node.log()
    # an operator ends the back-off early: one association probes, and the count goes on
    r = subprocess.run(
        [sys.executable, "-m", "node", "queue", "retry", "--destination", "pacs", "--config", str(node.config_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    wait_for(lambda: _circuit(node)[0] == 4, 30, "the operator's retry to be tried")
    node.stop()
    _, next_at, tried_at = _circuit(node)
    assert next_at is not None and (next_at - tried_at).total_seconds() == pytest.approx(256, abs=0.1), (
        "the 4th failure waits 0.5 * 8**3 s: the count went on from where it was"
    )
    assert _attempts(node) == [a + 1 for a in before[:BATCH]] + before[BATCH:], "one batch, by one association"
    assert node.log().count("; 1 consecutive failure(s)") == 1, "the count did not start over"


def test_outage_restart_recovery_permanent_refusal_then_new_work(node, tmp_path):
    """The reviewer's wedge: after an outage the probe's batch is refused for good; new work must still flow."""
    port = free_port()
    out = tmp_path / "pacs"
    node.extra_config = _config(port, "{ initial_delay = 0.5, max_delay = 2, multiplier = 2, jitter = 0 }")
    node.start()
    # A real CT slice under the Label Map SEG SOP class: storescp 3.6.7 does not know the class.
    seg = tmp_path / "labelmap.dcm"
    ds = pydicom.dcmread(series_files(CT)[0])
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = LABEL_MAP_SEG
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.SeriesInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(seg, enforce_file_format=True)
    pacs = None
    try:
        # -- outage: the PACS is down while the label map waits
        assert send_files(Peer("127.0.0.1", node.port, node.ae_title, "MODALITY"), [seg]).sent == 1
        wait_for(lambda: _circuit(node)[0] >= 2, 30, "two failures while the PACS is down")
        # -- restart during the outage
        node.stop()
        node.start()
        assert "consecutive failure(s) before the node stopped" in node.log()
        # -- recovery: the PACS is back, and the probe's whole batch is refused at negotiation
        pacs = _storescp(port, out)
        wait_for(lambda: node.deliveries().get("failed") == 1, 30, "the label map to fail")
        ((state, attempts, error),) = node.query("select state, attempts, last_error from delivery")
        assert state == "failed" and "accepted none of the proposed presentation contexts" in error, error
        assert LABEL_MAP_SEG in error, "the reason names the refused SOP class"
        # -- new work for the same destination, PACS up: delivered, not stuck behind the refused probe
        files = series_files(CT)
        assert storescu(node.port, files).returncode == 0
        node.wait_delivered(28, timeout=30)
        assert _received(out) == sorted(map(read_sop_uid, files)), "every CT once, nothing twice, no label map"
        assert _circuit(node)[0] == 0, "the delivery closed the circuit"
        # -- the PACS now accepts any SOP class; an operator's retry sends the label map
        _stop(pacs)
        pacs = _storescp(port, out, "-pm")
        r = subprocess.run(
            [
                sys.executable,
                "-m",
                "node",
                "queue",
                "retry",
                "--destination",
                "pacs",
                "--config",
                str(node.config_path),
            ],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert r.returncode == 0, r.stderr
        node.wait_delivered(29, timeout=30)
        assert _received(out) == sorted([*map(read_sop_uid, files), read_sop_uid(seg)]), "each instance exactly once"
    finally:
        _stop(pacs)
