"""Same SOP Instance UID twice, under both policies; idle associations time out."""

from __future__ import annotations

import time

import pydicom
from helpers import dataset_bytes, make_ct_series, storescu


def _second_version(src, tmp_path):
    """The same instance (same UIDs) with different content, as a corrected re-send would be."""
    ds = pydicom.dcmread(src)
    ds.PatientName = "CORRECTED^NAME"
    out = tmp_path / "v2.dcm"
    ds.save_as(out)
    return out


def test_keep_first(node, tmp_path):
    first = make_ct_series(tmp_path / "src", 1)[0]
    second = _second_version(first, tmp_path)
    node.start()
    assert storescu(node.port, [first]).returncode == 0
    r = storescu(node.port, [second], "-v")
    assert r.returncode == 0 and "Received Store Response (Success)" in r.stderr
    rows = node.query("select file_path from instance")
    assert len(rows) == 1
    assert dataset_bytes(node.data_dir / rows[0][0]) == dataset_bytes(first)
    assert len(node.stored_files()) == 1
    assert "kept the first copy (node.duplicates = keep_first)" in node.log()


def test_overwrite(node, tmp_path):
    first = make_ct_series(tmp_path / "src", 1)[0]
    second = _second_version(first, tmp_path)
    node.extra_config = 'duplicates = "overwrite"\n'
    node.start()
    assert storescu(node.port, [first]).returncode == 0
    (old_path,) = node.query("select file_path from instance")[0]
    assert storescu(node.port, [second]).returncode == 0
    rows = node.query("select file_path from instance")
    assert len(rows) == 1 and rows[0][0] != old_path
    assert dataset_bytes(node.data_dir / rows[0][0]) == dataset_bytes(second)
    assert not (node.data_dir / old_path).exists(), "the replaced file is removed"
    assert len(node.stored_files()) == 1
    assert node.query("select patient_name from patient p join study s on s.patient_fk = p.id")[-1] == (
        "CORRECTED^NAME",
    )
    assert node.query("select instance_count from series") == [(1,)]
    assert "replaced the stored copy" in node.log()


def test_idle_association_is_aborted_after_network_timeout(node):
    node.extra_config = "network_timeout = 1.0\n"
    node.start()
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    ae = AE("IDLE")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DICOM_NODE")
    assert assoc.is_established
    deadline = time.monotonic() + 15
    while assoc.is_established and time.monotonic() < deadline:
        time.sleep(0.1)
    assert assoc.is_aborted, "the node aborts an association that stays silent"
    assert "no data for node.network_timeout" in node.log()
