"""What a peer's answer means for a delivery: delivered, try again later, or give up.

The classes follow PS3.4 Annex B (C-STORE statuses), PS3.7 Annex C (the
general statuses) and PS3.8 7.1.1.9 (A-ASSOCIATE-RJ results). What each status
means is node.dicom.status's table; what to do about it is decided here. A permanent
failure will not change by sending again (the destination refuses the SOP
class, the data set, or our AE title): it fails at once with the reason. A
transient one (refused connection, reset, 0xA7xx out of resources, an
association rejected as transient) is retried with back-off.
"""

from __future__ import annotations

from node.dicom.status import Category, Status, lookup

#: A processing failure may be passing (a locked database at the PACS); after this many it is not.
PROCESSING_FAILURE_ATTEMPTS = 3


def classify_status(status: int, comment: str = "") -> tuple[str, str]:
    """("delivered" | "transient" | "permanent", text) for a C-STORE response status.

    For a delivered instance the text is the warning, if any ("" for plain success).
    """
    meaning = lookup(status)
    if meaning.category == Category.SUCCESS:
        return "delivered", ""
    text = f"status 0x{status:04X} ({meaning.name})" + (f": {comment}" if comment else "")
    if meaning.category == Category.WARNING:
        return "delivered", text
    if status == Status.DUPLICATE_SOP_INSTANCE:  # the destination holds it already
        return "delivered", text
    if status & 0xFF00 == Status.OUT_OF_RESOURCES or status in (Status.PROCESSING_FAILURE, Status.DUPLICATE_INVOCATION):
        return "transient", text
    return "permanent", text
