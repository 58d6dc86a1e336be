"""The log formatter: structured extras and their redaction, JSON lines and text lines (a running node's log:
tests/e2e/test_log_redaction.py)."""

from __future__ import annotations

import json
import logging

import pytest

from node.logs import set_redaction, setup_logging

NAME, PID = "Doe^Secret", "PID-SECRET-123"


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
