"""The errors of the plugin contract: what a plugin raises, and what the contract raises back."""

from __future__ import annotations

__all__ = ["GeometryError", "PluginError", "ResultError"]


class PluginError(Exception):
    """Raised by a plugin for a failure it understands; ``retryable`` if another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class GeometryError(ValueError):
    """The series cannot form a volume (reason in the message)."""


class ResultError(ValueError):
    """A result that cannot become DICOM as given; the message names the field and says what to change."""
