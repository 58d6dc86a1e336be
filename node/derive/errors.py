"""The error every output builder raises for a result the node cannot turn into DICOM."""

from __future__ import annotations


class OutputError(ValueError):
    """A plugin result the node cannot turn into DICOM (reason in the message)."""
