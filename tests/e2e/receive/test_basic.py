"""The first things an administrator tries: echo, send a series, see it indexed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pydicom
from helpers import PEER_ENV, dataset_bytes, dcmtk, make_ct_series, storescu


def test_echo_with_dcmtk(node):
    node.start()
    r = subprocess.run([dcmtk("echoscu"), "-aec", "DICOM_NODE", "127.0.0.1", str(node.port)], env=PEER_ENV)
    assert r.returncode == 0


def test_synthetic_series_stored_byte_identical_and_indexed(node, tmp_path: Path):
    files = make_ct_series(tmp_path / "src", 10)
    node.start()
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    rows = node.query(
        "select sop_instance_uid, file_path, rows, columns, instance_number, image_position_patient, "
        "calling_ae, transfer_syntax_uid, file_size from instance"
    )
    assert len(rows) == 10
    by_uid = {r[0]: r for r in rows}
    for f in files:
        src = pydicom.dcmread(f)
        row = by_uid[str(src.SOPInstanceUID)]
        stored = node.data_dir / row[1]
        assert stored.is_file()
        assert dataset_bytes(stored) == dataset_bytes(f)
        assert row[2:5] == (64, 64, int(src.InstanceNumber))
        assert row[5] == "\\".join(str(x) for x in src.ImagePositionPatient)
        assert row[6] == "STORESCU"
        assert row[7] == "1.2.840.10008.1.2.1"
        assert row[8] == stored.stat().st_size
    ((n_series, count),) = node.query("select count(*), max(instance_count) from series")
    assert (n_series, count) == (1, 10)
    assert node.temp_files() == []
