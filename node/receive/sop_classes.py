"""Which abstract syntaxes the Storage SCP takes as storage classes, and their names for the logs.

The standard Storage SOP Classes come from pynetdicom (3.0 tracks DICOM 2025b: PS3.4 Annex B
Storage and Annex GG Non-Patient Object Storage), because pydicom 3.0's UID dictionary predates
the 2023-2025 additions (Label Map and Height Map Segmentation, Photoacoustic, Confocal Microscopy,
Dermoscopic Photography, Ophthalmic OCT B-scan Volume Analysis, CT and XA Performed Procedure
Protocol, ...). pydicom's dictionary adds the retired Storage SOP Classes, which old modalities
still send.

A router must not be stricter than the PACS behind it: any other abstract syntax is taken as a
private or newer storage class (``node.accept_unknown_sop_classes``), unless pydicom or pynetdicom
know it as something else: a query, worklist, MPPS, commitment, print or other non-storage service,
a transfer syntax, a well-known instance.
"""

from __future__ import annotations

import re
from functools import cache
from typing import Literal

from pydicom._uid_dict import UID_dictionary
from pynetdicom import sop_class
from pynetdicom.service_class import NonPatientObjectStorageServiceClass, ServiceClass, StorageServiceClass

_STORAGE_SERVICES = (StorageServiceClass, NonPatientObjectStorageServiceClass)

#: The Query/Retrieve information models the node answers (PS3.4 C.6.1, C.6.2); the retired
#: Patient/Study Only model is not supported.
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
QR_FIND = frozenset({PATIENT_ROOT_FIND, STUDY_ROOT_FIND})
QR_MOVE = frozenset({PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE})
QR_GET = frozenset({PATIENT_ROOT_GET, STUDY_ROOT_GET})
QR_CLASSES = QR_FIND | QR_MOVE | QR_GET
#: Q/R SOP class -> its information model's root (``node.index.query.Root``).
QR_ROOT: dict[str, Literal["patient", "study"]] = {
    uid: ("patient" if uid.startswith("1.2.840.10008.5.1.4.1.2.1.") else "study") for uid in QR_CLASSES
}


@cache
def _pynetdicom_classes() -> dict[str, tuple[str, type[ServiceClass]]]:
    """UID -> (keyword, service class) of every SOP class pynetdicom names."""
    out: dict[str, tuple[str, type[ServiceClass]]] = {}
    for keyword, value in vars(sop_class).items():
        if isinstance(value, sop_class.SOPClass):
            # pynetdicom annotates service_class as an instance; it is the class (a type).
            service: type[ServiceClass] = value.service_class  # type: ignore[assignment]
            out.setdefault(str(value), (keyword, service))
    return out


@cache
def storage_classes() -> frozenset[str]:
    """Every standard Storage SOP Class, retired ones included."""
    out = {uid for uid, (_kw, service) in _pynetdicom_classes().items() if issubclass(service, _STORAGE_SERVICES)}
    for uid, (name, kind, *_rest) in UID_dictionary.items():
        if kind == "SOP Class" and "Storage" in name and "Commitment" not in name:
            out.add(uid)
    return frozenset(out)


def is_other_service(uid: str) -> bool:
    """True for a UID the standard gives to anything but storage (never accepted as a storage class)."""
    uid = uid.strip()
    if uid in storage_classes():
        return False
    return uid in UID_dictionary or uid in _pynetdicom_classes()


def is_standard_storage(uid: str) -> bool:
    return uid.strip() in storage_classes()


def _words(keyword: str) -> str:
    """``CTPerformedProcedureProtocolStorage`` -> ``CT Performed Procedure Protocol Storage``."""
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", " ", keyword)


def describe(uid: str) -> str:
    """``UID (name)`` for the logs; unknown classes say so."""
    uid = uid.strip()
    entry = UID_dictionary.get(uid)
    if entry is not None:
        return f"{uid} ({entry[0]})"
    known = _pynetdicom_classes().get(uid)
    if known is not None:
        return f"{uid} ({_words(known[0])})"
    return f"{uid} (not a standard SOP class: private or unknown)"
