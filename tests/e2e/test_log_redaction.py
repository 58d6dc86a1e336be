"""Patient data stays out of a running node's log unless [logging] redact_phi is turned off, in text and JSON
lines (the formatter on its own: tests/test_logs.py)."""

from __future__ import annotations

import json

import pydicom
import pytest
from helpers import make_ct_series, storescu, wait_for

NAME, PID = "Doe^Secret", "PID-SECRET-123"


def secret_series(folder, count: int) -> list:  # type: ignore[no-untyped-def]
    files = make_ct_series(folder, count, patient_name=NAME)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.PatientID = PID
        ds.save_as(f, enforce_file_format=True)
    return files


@pytest.mark.parametrize("json_format", [False, True], ids=["text", "json"])
@pytest.mark.parametrize("redact", [True, False], ids=["redacted", "shown"])
def test_patient_name_and_id_in_the_log_follow_redact_phi(node, tmp_path, json_format, redact):
    node.extra_config = f"""
[logging]
json_format = {str(json_format).lower()}
redact_phi = {str(redact).lower()}
[tracker]
stable_after = 1
"""
    node.start()
    files = secret_series(tmp_path / "ct", 3)
    series_uid = str(pydicom.dcmread(files[0]).SeriesInstanceUID)
    assert storescu(node.port, files, aet="LOGSCU").returncode == 0
    wait_for(lambda: "is stable" in node.log(), 30, "the series to become stable")
    node.stop()
    log = node.log()
    stable = [json.loads(line)["message"] if json_format else line for line in log.splitlines() if "is stable" in line]
    assert len(stable) == 1 and series_uid in stable[0]
    if redact:
        assert NAME not in log and PID not in log and "Doe" not in log
        assert 'patient "<redacted>", ID "<redacted>"' in stable[0]
    else:
        assert f'patient "{NAME}", ID "{PID}"' in stable[0]
    if json_format:
        records = [json.loads(line) for line in log.splitlines() if line.strip()]  # every line is a JSON record
        (st,) = [r for r in records if "is stable" in r["message"]]
        assert (st["series_uid"], st["revision"], st["level"]) == (series_uid, 1, "INFO")
        assert st["study_uid"] == str(pydicom.dcmread(files[0]).StudyInstanceUID)
        accepted = [r for r in records if r.get("calling_ae") == "LOGSCU" and "accepted" in r["message"]]
        assert len(accepted) == 1
        assert (accepted[0]["called_ae"], accepted[0]["peer_address"]) == ("DICOM_NODE", "127.0.0.1")
        ended = [r for r in records if r.get("association_id") == accepted[0]["association_id"]]
        assert len(ended) == 2  # accepted, then released with its counts
    else:
        assert not log.lstrip().startswith("{")
