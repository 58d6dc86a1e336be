"""DIMSE status codes the Storage SCP answers with (PS3.4 B.2.3, PS3.7 C)."""

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    #: Refused: out of resources. Senders treat it as transient and retry.
    OUT_OF_RESOURCES = 0xA700
    #: Warning: data set does not match SOP Class, stored anyway (PS3.4 B.2.3).
    STORED_NONCONFORMANT = 0xB007
    #: Error: data set does not match SOP Class (or the request's UIDs).
    DATASET_MISMATCH = 0xA900
    #: Error: cannot understand (unparseable or structurally broken data set).
    CANNOT_UNDERSTAND = 0xC000


def is_stored(status: int) -> bool:
    """Success and warnings both mean the instance is stored (PS3.4 B.2.3)."""
    return status == Status.SUCCESS or 0xB000 <= status <= 0xBFFF
