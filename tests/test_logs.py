"""Patient data stays out of the node's log unless [logging] redact_phi is turned off; JSON lines carry
structured fields."""

from __future__ import annotations

import json
import logging

import pydicom
import pytest
from helpers import make_ct_series, storescu, wait_for

from node.logs import set_redaction, setup_logging

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


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    set_redaction(True)


@pytest.mark.parametrize("redact", [True, False])
def test_structured_extras_and_their_redaction(capsys, restore_logging, redact):
    setup_logging("INFO", json_format=True, redact_phi=redact)
    from node.logs import phi

    log = logging.getLogger("node.test")
    log.info(
        "stored %s for %s",
        "1.2.3",
        phi(NAME),
        extra={"series_uid": "1.2", "patient_id": PID, "job_id": 7, "rules": ["a", "b"], "when": object},
    )
    log.info("no patient here: %s", phi(""))
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    first, second = lines
    assert (first["series_uid"], first["job_id"], first["rules"]) == ("1.2", 7, ["a", "b"])
    assert first["when"] == str(object)  # anything else as text, never a failed record
    assert {"time", "level", "logger", "message"} <= set(first)
    if redact:
        assert first["message"] == "stored 1.2.3 for <redacted>" and first["patient_id"] == "<redacted>"
    else:
        assert first["message"] == f"stored 1.2.3 for {NAME}" and first["patient_id"] == PID
    assert second["message"] == "no patient here: "  # nothing to redact


def test_text_lines_keep_their_format(capsys, restore_logging):
    setup_logging("INFO", json_format=False)  # redaction on by default
    from node.logs import phi

    logging.getLogger("node.test").warning("patient %s", phi(NAME), extra={"patient_name": NAME})
    err = capsys.readouterr().err
    assert err.rstrip().endswith("WARNING node.test: patient <redacted>")
    assert NAME not in err
