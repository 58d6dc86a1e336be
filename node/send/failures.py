"""What a peer's answer means for a delivery: delivered, try again later, or give up.

The classes follow PS3.4 Annex B (C-STORE statuses), PS3.7 Annex C (the
general statuses) and PS3.8 7.1.1.9 (A-ASSOCIATE-RJ results). A permanent
failure will not change by sending again (the destination refuses the SOP
class, the data set, or our AE title): it fails at once with the reason. A
transient one (refused connection, reset, 0xA7xx out of resources, an
association rejected as transient) is retried with back-off.
"""

from __future__ import annotations

#: Statuses that are warnings: the instance is stored (PS3.4 B.2.3, PS3.7 C.3).
WARNINGS = {
    0x0001: "requested optional attributes are not supported",
    0x0107: "attribute list error",
    0x0116: "attribute value out of range",
    0xB000: "coercion of data elements",
    0xB006: "elements discarded",
    0xB007: "data set does not match SOP class",
}

_FAILURES = {
    0x0110: "processing failure",
    0x0117: "invalid object instance",
    0x0122: "SOP class not supported",
    0x0124: "not authorized",
    0x0210: "duplicate invocation",
    0x0211: "unrecognized operation",
    0x0212: "mistyped argument",
}

#: A processing failure may be passing (a locked database at the PACS); after this many it is not.
PROCESSING_FAILURE_ATTEMPTS = 3


def status_name(status: int) -> str:
    if status in WARNINGS:
        return WARNINGS[status]
    if status in _FAILURES:
        return _FAILURES[status]
    high = status & 0xFF00
    if high == 0xA700:
        return "out of resources"
    if high == 0xA900:
        return "data set does not match SOP class"
    if status & 0xF000 == 0xC000:
        return "cannot understand"
    return "unknown status"


def classify_status(status: int, comment: str = "") -> tuple[str, str]:
    """("delivered" | "transient" | "permanent", text) for a C-STORE response status.

    For a delivered instance the text is the warning, if any ("" for plain success).
    """
    if status == 0x0000:
        return "delivered", ""
    text = f"status 0x{status:04X} ({status_name(status)})" + (f": {comment}" if comment else "")
    if status in WARNINGS or status & 0xF000 == 0xB000:
        return "delivered", text
    if status == 0x0111:  # duplicate SOP instance: the destination holds it already
        return "delivered", text.replace("unknown status", "duplicate SOP instance")
    if status & 0xFF00 == 0xA700 or status in (0x0110, 0x0210):
        return "transient", text
    return "permanent", text
