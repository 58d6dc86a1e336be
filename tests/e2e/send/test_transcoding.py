"""The SCU sends files as stored, and decompresses only for a peer that refuses the stored syntax."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import PEER_ENV, SHARED, StoreSCP, dataset_bytes, dcmtk, free_port, storescu, wait_for_echo

from node.send.scu import Peer, send_files

ONE_SLICE = SHARED / "transfer-syntaxes" / "one-mr-slice"
#: RLE, JPEG lossless, JPEG-LS lossless, JPEG 2000 lossless
COMPRESSED = ["4.dcm", "5.dcm", "7.dcm", "9.dcm"]


def received_by_uid(out: Path) -> dict[str, Path]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in out.iterdir()}


def test_compressed_files_reach_an_uncompressed_only_peer_with_identical_pixels(tmp_path):
    scp = StoreSCP(tmp_path / "out").start()  # DCMTK's default: uncompressed transfer syntaxes only
    try:
        files = [ONE_SLICE / n for n in COMPRESSED] + [ONE_SLICE / "1.dcm"]
        summary = send_files(Peer("127.0.0.1", scp.port, scp.ae_title), files)
        assert summary.ok and summary.sent == len(files), summary.errors
        got = received_by_uid(scp.out)
    finally:
        scp.stop()
    for f in files:
        src = pydicom.dcmread(f)
        dst = pydicom.dcmread(got[str(src.SOPInstanceUID)])
        assert not dst.file_meta.TransferSyntaxUID.is_compressed
        np.testing.assert_array_equal(dst.pixel_array, src.pixel_array)
        assert dst.SOPInstanceUID == src.SOPInstanceUID  # the same instance, not a new one
    # the uncompressed file went as stored, byte for byte
    assert dataset_bytes(got[str(pydicom.dcmread(ONE_SLICE / "1.dcm").SOPInstanceUID)]) == dataset_bytes(
        ONE_SLICE / "1.dcm"
    )


def test_a_peer_that_takes_the_stored_syntax_gets_the_bytes_as_stored(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    port = free_port()
    # +xv: also accept (and prefer) JPEG 2000 lossless
    proc = subprocess.Popen(
        [dcmtk("storescp"), "-aet", "J2KSCP", "+xv", "-od", str(out), str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=PEER_ENV,
    )
    try:
        wait_for_echo(port, "J2KSCP", proc=proc)
        summary = send_files(Peer("127.0.0.1", port, "J2KSCP"), [ONE_SLICE / "9.dcm"])
        assert summary.ok, summary.errors
    finally:
        proc.terminate()
        proc.wait(10)
    (stored,) = out.iterdir()
    assert pydicom.dcmread(stored, stop_before_pixels=True).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert dataset_bytes(stored) == dataset_bytes(ONE_SLICE / "9.dcm")


@pytest.mark.parametrize("name", ["9.dcm"])
def test_forward_job_decompresses_for_a_default_storescp(node, tmp_path, name):
    """End to end: a JPEG 2000 series forwarded by a rule to DCMTK storescp (uncompressed only)."""
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        node.extra_config = f"""
[tracker]
stable_after = 1
{scp.destination()}
[[rules]]
name = "all"
actions = [{{ type = "forward", to = ["scp"] }}]
"""
        node.start()
        assert storescu(node.port, [ONE_SLICE / name], "-xv").returncode == 0  # propose JPEG 2000 lossless
        assert node.query("select transfer_syntax_uid from instance") == [("1.2.840.10008.1.2.4.90",)]  # as sent
        node.wait_delivered(1)
        (got,) = scp.out.iterdir()
    finally:
        scp.stop()
    src = pydicom.dcmread(ONE_SLICE / name)
    dst = pydicom.dcmread(got)
    assert not dst.file_meta.TransferSyntaxUID.is_compressed
    np.testing.assert_array_equal(dst.pixel_array, src.pixel_array)
    assert dst.SOPInstanceUID == src.SOPInstanceUID
    assert node.query("select state, result from job") == [("succeeded", "queued 1 instance(s) for scp")]
    assert node.query("select state, attempts, sent_transfer_syntax from delivery") == [
        ("delivered", 1, "1.2.840.10008.1.2.1")
    ]
