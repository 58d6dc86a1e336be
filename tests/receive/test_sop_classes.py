"""Which abstract syntaxes the Storage SCP takes as storage classes, and how the logs name them."""

from __future__ import annotations

import pytest

from node.receive.sop_classes import describe, is_other_service, is_standard_storage, storage_classes

CT = "1.2.840.10008.5.1.4.1.1.2"
#: Newer than pydicom 3.0's UID dictionary: known from pynetdicom only.
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
#: Retired (PS3.4 2004), still sent by old equipment: known from pydicom's dictionary only.
STORED_PRINT = "1.2.840.10008.5.1.1.27"


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        (CT, "CT Image Storage"),
        (LABEL_MAP_SEG, "Label Map Segmentation Storage"),  # a pynetdicom keyword, split into words
        ("1.2.840.10008.5.1.4.1.1.200.8", "XA Performed Procedure Protocol Storage"),
        (STORED_PRINT, "Stored Print Storage SOP Class"),
    ],
)
def test_standard_storage_classes_new_and_retired_are_storage(uid: str, name: str) -> None:
    assert uid in storage_classes()
    assert is_standard_storage(uid) and is_standard_storage(f"{uid} ")  # a padded UID is the same UID
    assert not is_other_service(uid)
    assert describe(uid) == f"{uid} ({name})"


@pytest.mark.parametrize(
    ("uid", "name"),
    [
        ("1.2.840.10008.1.1", "Verification SOP Class"),
        ("1.2.840.10008.5.1.4.1.2.1.1", "Patient Root Query/Retrieve Information Model - FIND"),
        ("1.2.840.10008.1.20.1", "Storage Commitment Push Model SOP Class"),  # "Storage" in its name, not storage
        ("1.2.840.10008.1.20.2", "Storage Commitment Pull Model SOP Class"),
        ("1.2.840.10008.1.2.1", "Explicit VR Little Endian"),  # a transfer syntax offered as an abstract syntax
    ],
)
def test_other_services_are_never_taken_as_storage(uid: str, name: str) -> None:
    assert not is_standard_storage(uid)
    assert is_other_service(uid)
    assert describe(uid) == f"{uid} ({name})"


def test_a_private_class_is_neither_and_the_log_says_so() -> None:
    uid = "1.2.826.0.1.3680043.8.498.1.1"
    assert not is_standard_storage(uid) and not is_other_service(uid)
    assert describe(f" {uid}") == f"{uid} (not a standard SOP class: private or unknown)"
