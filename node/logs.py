"""Logging set-up: plain lines for a console, JSON lines for log shippers, and patient data kept out.

Logs travel further than the index: to journald, log shippers, support tickets. So with
``[logging] redact_phi`` (the default) nothing that names a patient (name, ID, birth date) is
written to them; the index and the audit table keep what is needed. A log call that would show
such a value wraps it in :func:`phi`; structured extras under :data:`PHI_KEYS` are redacted by the
handler's filter as a second line of defence.

JSON records carry a log call's ``extra={...}`` keys (``calling_ae``, ``series_uid``, ``job_id``,
``destination``, ...) as top-level keys, so a log shipper can index them without parsing messages.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

REDACTED = "<redacted>"
#: ``extra`` keys that hold patient data: redacted in every record while redaction is on.
PHI_KEYS = frozenset({"patient_name", "patient_id", "birth_date", "patient_birth_date"})

_redact = True

# Every attribute a plain LogRecord has: anything else on a record came from ``extra``.
_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


def set_redaction(on: bool) -> None:
    """Turn redaction on or off for this process (the node applies ``[logging] redact_phi`` at start)."""
    global _redact
    _redact = bool(on)


def redacting() -> bool:
    """Whether patient data is kept out of the logs (``[logging] redact_phi``)."""
    return _redact


def phi(value: Any) -> Any:
    """``value`` for a log line, or ``"<redacted>"`` while redaction is on (empty values stay empty)."""
    if not _redact or value is None or value == "":
        return value
    return REDACTED


def extras(record: logging.LogRecord) -> dict[str, Any]:
    """The structured fields a log call passed with ``extra={...}``."""
    return {k: v for k, v in vars(record).items() if k not in _STANDARD and not k.startswith("_")}


class PhiFilter(logging.Filter):
    """Redacts :data:`PHI_KEYS` extras on every record that passes the handler (never drops a record)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _redact:
            for key in PHI_KEYS:
                if getattr(record, key, None) not in (None, ""):
                    setattr(record, key, REDACTED)
        return True


def _json_value(value: Any) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    return str(value)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in extras(record).items():
            if key not in out:  # an extra never hides the record's own fields
                out[key] = _json_value(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


def setup_logging(level: str = "INFO", json_format: bool = False, *, redact_phi: bool = True) -> None:
    set_redaction(redact_phi)
    handler = logging.StreamHandler(sys.stderr)
    if json_format:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(PhiFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # pynetdicom logs every PDU at INFO/DEBUG; its errors still come through.
    logging.getLogger("pynetdicom").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
    # pydicom logs each odd value it meets; the node logs what it refuses, and why.
    logging.getLogger("pydicom").setLevel(logging.ERROR)
    # The scheduler logs every job it adds and runs; the tracker logs what matters.
    logging.getLogger("apscheduler").setLevel(logging.WARNING if level != "DEBUG" else logging.INFO)
