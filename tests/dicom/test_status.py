"""One status table: the SCP's answers, the sender's decisions and the metric labels agree with it."""

from __future__ import annotations

import pytest

from node.dicom.status import Category, Status, category, is_stored, lookup
from node.metrics import status_class
from node.send.failures import classify_status


@pytest.mark.parametrize(
    "status, cat, name",
    [
        (0x0000, Category.SUCCESS, "success"),
        (0x0001, Category.WARNING, "requested optional attributes are not supported"),
        (0xB007, Category.WARNING, "data set does not match SOP class"),
        (0xB123, Category.WARNING, "unknown status"),
        (0xA700, Category.FAILURE, "out of resources"),
        (0xA7FF, Category.FAILURE, "out of resources"),
        (0xA901, Category.FAILURE, "data set does not match SOP class"),
        (0xC042, Category.FAILURE, "cannot understand"),
        (0x0122, Category.FAILURE, "SOP class not supported"),
        (0xFE00, Category.CANCEL, "cancel"),
        (0xFF01, Category.PENDING, "pending"),
        (0x4242, Category.FAILURE, "unknown status"),
    ],
)
def test_table(status, cat, name):
    assert (lookup(status).category, lookup(status).name) == (cat, name)
    assert lookup(status).meaning


def test_what_is_stored_and_what_metrics_call_it():
    assert [s for s in Status if is_stored(s)] == [Status.SUCCESS, Status.STORED_NONCONFORMANT]
    for s in (0x0000, 0x0107, 0xB000, 0xA700, 0xC000, 0x0111):
        assert status_class(s) == category(s).value


@pytest.mark.parametrize(
    "status, kind",
    [
        (0x0000, "delivered"),
        (0xB006, "delivered"),
        (0x0111, "delivered"),  # the destination holds it already
        (0xA702, "transient"),
        (0x0110, "transient"),
        (0xA900, "permanent"),
        (0x0122, "permanent"),
        (0x4242, "permanent"),
    ],
)
def test_the_sender_decides_from_the_table(status, kind):
    got, text = classify_status(status, "why")
    assert got == kind
    if status:
        assert text == f"status 0x{status:04X} ({lookup(status).name}): why"
