"""What a DIMSE status means, in one table: the SCP's answers, the sender's decisions and metric labels.

A status is a code or falls in a range (PS3.7 Annex C, PS3.4 B.2.3 for C-STORE, PS3.4 J.3 for
Storage Commitment's failure reasons, which use the same codes). Each has a category (success,
warning, failure, cancel, pending), a short name for texts and logs and a meaning that says what it
means for the instance. The receive side answers with :class:`Status`; the send side decides from
:func:`lookup` (``node.send.failures``); metrics label responses with :func:`category`.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum, StrEnum


class Category(StrEnum):
    SUCCESS = "success"
    WARNING = "warning"
    FAILURE = "failure"
    CANCEL = "cancel"
    PENDING = "pending"


class Status(IntEnum):
    """The statuses the Storage SCP answers with."""

    SUCCESS = 0x0000
    #: Refused: out of resources. Senders treat it as transient and retry.
    OUT_OF_RESOURCES = 0xA700
    #: Warning: data set does not match SOP Class, stored anyway (PS3.4 B.2.3).
    STORED_NONCONFORMANT = 0xB007
    #: Error: data set does not match SOP Class (or the request's UIDs).
    DATASET_MISMATCH = 0xA900
    #: Error: cannot understand (unparseable or structurally broken data set).
    CANNOT_UNDERSTAND = 0xC000
    #: Refused: SOP class not supported (a C-STORE on another class's presentation context).
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    #: An N-EVENT-REPORT with an event type the class does not define.
    NO_SUCH_EVENT_TYPE = 0x0113
    PROCESSING_FAILURE = 0x0110
    #: The peer holds this SOP instance already.
    DUPLICATE_SOP_INSTANCE = 0x0111
    #: The message id is in use already (a peer's passing state).
    DUPLICATE_INVOCATION = 0x0210


class QRStatus(IntEnum):
    """The statuses the Query/Retrieve SCP answers C-FIND, C-MOVE and C-GET with (PS3.4 C.4.1.1.4,
    C.4.2.1.5, C.4.3.1.4). Apart from :class:`Status`: some codes mean something else there (0xB000 is
    "sub-operations complete, one or more failures", not a C-STORE coercion)."""

    SUCCESS = 0x0000
    #: A match (C-FIND) or progress (C-MOVE, C-GET); more responses follow.
    PENDING = 0xFF00
    #: A C-FIND match without some optional keys the query asked for.
    PENDING_WARNING = 0xFF01
    #: The requestor's C-CANCEL-RQ ended the operation.
    CANCEL = 0xFE00
    #: The identifier asks for something the node cannot match.
    IDENTIFIER_DOES_NOT_MATCH = 0xA900
    #: Failed: unable to process.
    UNABLE_TO_PROCESS = 0xC000
    #: Refused: out of resources, unable to calculate the number of matches.
    OUT_OF_RESOURCES_MATCHES = 0xA700
    #: Refused: out of resources, unable to perform sub-operations.
    OUT_OF_RESOURCES_SUBOPS = 0xA702
    #: Refused: the C-MOVE destination is unknown.
    MOVE_DESTINATION_UNKNOWN = 0xA801
    #: Warning: sub-operations complete, one or more failures (0xB000 in C-MOVE/C-GET responses).
    SUBOPS_WARNING = 0xB000


@dataclass(frozen=True)
class Meaning:
    category: Category
    name: str
    meaning: str


_S, _W, _F = Category.SUCCESS, Category.WARNING, Category.FAILURE

#: Exact codes (PS3.7 C, PS3.4 B.2.3, PS3.4 J.3.3 failure reasons).
_CODES: dict[int, Meaning] = {
    0x0000: Meaning(_S, "success", "the operation completed"),
    0x0001: Meaning(_W, "requested optional attributes are not supported", "done, without the optional attributes"),
    0x0107: Meaning(_W, "attribute list error", "done; some attributes were not understood"),
    0x0116: Meaning(_W, "attribute value out of range", "done; some values were out of range"),
    # 0xB000 is also C-MOVE/C-GET's "sub-operations complete, one or more failures"; the send side reads
    # it only as a C-STORE status.
    0xB000: Meaning(_W, "coercion of data elements", "stored, with some elements changed"),
    0xB006: Meaning(_W, "elements discarded", "stored, with some elements left out"),
    0xB007: Meaning(_W, "data set does not match SOP class", "stored, although it does not conform"),
    0x0110: Meaning(_F, "processing failure", "the peer failed while processing; may pass"),
    0x0111: Meaning(_F, "duplicate SOP instance", "the peer holds this instance already"),
    0x0112: Meaning(_F, "no such object instance", "the peer does not know this instance"),
    0x0113: Meaning(_F, "no such event type", "the event type is not defined for the class"),
    0x0117: Meaning(_F, "invalid object instance", "the instance UID is not valid"),
    0x0119: Meaning(_F, "class-instance conflict", "the instance is not of that class"),
    0x0122: Meaning(_F, "SOP class not supported", "the peer does not take this SOP class"),
    0x0124: Meaning(_F, "not authorized", "the peer refuses us this operation"),
    0x0131: Meaning(_F, "duplicate transaction UID", "the transaction UID is in use already"),
    0x0210: Meaning(_F, "duplicate invocation", "the message id is in use already"),
    0x0211: Meaning(_F, "unrecognized operation", "the peer does not know this operation"),
    0x0212: Meaning(_F, "mistyped argument", "an argument has the wrong type"),
    0x0213: Meaning(_F, "resource limitation", "the peer is short of resources"),
    0xA702: Meaning(_F, "out of resources", "the peer cannot perform the sub-operations now"),
    0xA801: Meaning(_F, "move destination unknown", "the peer does not know the C-MOVE destination AE title"),
    0xFE00: Meaning(Category.CANCEL, "cancel", "the operation was cancelled"),
    0xFF00: Meaning(Category.PENDING, "pending", "more results follow"),
    0xFF01: Meaning(Category.PENDING, "pending", "more results follow; optional keys not supported"),
}

#: Ranges (first, last, meaning), checked after the exact codes.
_RANGES: tuple[tuple[int, int, Meaning], ...] = (
    (0xA700, 0xA7FF, Meaning(_F, "out of resources", "the peer is short of space or memory; try again later")),
    (0xA900, 0xA9FF, Meaning(_F, "data set does not match SOP class", "the peer refuses the data set")),
    (0xC000, 0xCFFF, Meaning(_F, "cannot understand", "the peer could not parse the data set")),
    (0xB000, 0xBFFF, Meaning(_W, "unknown status", "a warning: the operation completed")),
)

_UNKNOWN = Meaning(_F, "unknown status", "a status the standard does not define: taken as a failure")


def lookup(status: int) -> Meaning:
    """The meaning of ``status``; an unknown code is a failure (PS3.7 C.1)."""
    found = _CODES.get(status)
    if found is not None:
        return found
    for first, last, meaning in _RANGES:
        if first <= status <= last:
            return meaning
    return _UNKNOWN


def category(status: int) -> Category:
    return lookup(status).category


def is_stored(status: int) -> bool:
    """Success and warnings both mean the instance is stored (PS3.4 B.2.3)."""
    return lookup(status).category in (Category.SUCCESS, Category.WARNING)
