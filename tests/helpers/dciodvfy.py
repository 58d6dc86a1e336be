"""dciodvfy (dicom3tools), the IOD validator, on the objects the node makes.

``verify(path, label)`` fails on any Error line and returns the Warning lines (each new one also
becomes a pytest warning, so they are listed once in the summary). dicom3tools 1.00~20220618 predates
Label Map Segmentation Storage (Sup 243, 2024): for that class the two errors that only say "I do not
know this IOD" are tolerated, and the object is checked once more as a Segmentation Storage instance,
against everything but what Sup 243 changed.
"""

from __future__ import annotations

import subprocess
import warnings
from pathlib import Path

import pydicom
from pydicom.uid import SegmentationStorage

DCIODVFY = "/usr/bin/dciodvfy"
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"  # Sup 243 (2024); pydicom 3.0 has no name for it

LABELMAP_TOOL_ERRORS = (
    "Error - Information Object Not found",
    "Error - SegmentNumber not monotonically increasing from one by one - have SegmentSequence item number 1 "
    "(from one) with SegmentNumber of 0",
)
#: The same object checked as a (pre-2024) Segmentation Storage instance: what Sup 243 changed for LABELMAP.
LABELMAP_AS_SEG_ERRORS = (
    *LABELMAP_TOOL_ERRORS,
    "Error - Unrecognized enumerated value <LABELMAP> for value 1 of attribute <Segmentation Type>",
    "Error - Value is zero for value 1 of attribute <Segment Number>",
    "Error - Missing attribute Type 1 Required Element=<SegmentIdentificationSequence> Module=<SegmentationMacro>",
)


#: dicom3tools' error for a segment reference (an SR's TID 1411 group) to a Label Map SEG, a class it does not know.
NOT_A_SEGMENTATION = (
    "Error - Shall not be present for Referenced SOP Class that is not segmentation - attribute "
    "<ReferencedSegmentNumber>"
)


class DciodvfyWarning(UserWarning):
    """A warning dciodvfy printed for an object the node made (listed in pytest's warnings summary)."""


_SEEN: dict[str, str] = {}


def lines(path: Path) -> list[str]:
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    return [line.strip() for line in (r.stdout + r.stderr).splitlines() if line.strip()]


def _note(line: str, label: str) -> None:
    if line not in _SEEN:
        _SEEN[line] = label
        print(f"dciodvfy [{label}]: {line}")
        warnings.warn(DciodvfyWarning(f"dciodvfy: {line} (first in {label})"), stacklevel=3)


def _refers_to_label_maps(ds: pydicom.Dataset) -> bool:
    """Whether any ReferencedSOPClassUID in ``ds`` (at any depth) is Label Map Segmentation Storage; each such
    reference is made Segmentation Storage on the way, for a surrogate dciodvfy understands."""
    found = False

    def swap(d: pydicom.Dataset, elem: pydicom.DataElement) -> None:
        nonlocal found
        if elem.keyword == "ReferencedSOPClassUID" and elem.value == LABEL_MAP_SEGMENTATION_STORAGE:
            elem.value = SegmentationStorage
            found = True

    ds.walk(swap)
    return found


def errors(path: Path) -> list[str]:
    """dciodvfy's errors for ``path`` that are the object's, not the tool's (see the module's note)."""
    out = lines(path)
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    found = [x for x in out if x.startswith("Error")]
    if ds.Modality == "SR" and NOT_A_SEGMENTATION in found:
        # A reference to a Label Map SEG: tolerated only if the same report, referring to those SEGs as
        # (pre-2024) Segmentation Storage instances, has no error at all.
        full = pydicom.dcmread(path)
        if _refers_to_label_maps(full):
            found = [e for e in found if e != NOT_A_SEGMENTATION]
            surrogate = path.with_name(path.stem + ".as-seg-ref.dcm")
            full.save_as(surrogate, enforce_file_format=True)
            try:
                found += [f"(referring to Segmentation) {e}" for e in lines(surrogate) if e.startswith("Error")]
            finally:
                surrogate.unlink()
    if ds.SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE:
        found = [e for e in found if e not in LABELMAP_TOOL_ERRORS]
        full = pydicom.dcmread(path)
        full.SOPClassUID = full.file_meta.MediaStorageSOPClassUID = SegmentationStorage
        surrogate = path.with_name(path.stem + ".as-seg.dcm")
        full.save_as(surrogate, enforce_file_format=True)
        try:
            surrogate_lines = lines(surrogate)
        finally:
            surrogate.unlink()
        if not any(x == "Segmentation" for x in surrogate_lines):
            found.append(f"dciodvfy did not check the label map as a Segmentation: {surrogate_lines[:5]}")
        found += [
            f"(as Segmentation IOD) {e}"
            for e in surrogate_lines
            if e.startswith("Error") and e not in LABELMAP_AS_SEG_ERRORS
        ]
    return found


def verify(path: Path, label: str) -> list[str]:
    """dciodvfy finds no error in ``path``; returns its warnings (each new one is also a pytest warning)."""
    found = errors(path)
    out = lines(path)
    if pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID == LABEL_MAP_SEGMENTATION_STORAGE:
        for e in (x for x in out if x in LABELMAP_TOOL_ERRORS):
            _note(f"tolerated for Label Map SEG (dicom3tools predates Sup 243): {e}", label)
    assert not found, (
        f"dciodvfy errors in {label} ({path}):\n" + "\n".join(found) + "\n\nall output:\n" + "\n".join(out)
    )
    warned = [x for x in out if x.startswith("Warning")]
    for w in warned:
        _note(w, label)
    return warned
