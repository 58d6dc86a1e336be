"""Damaged variants of real series, as hospitals send them.

Each variant starts from a real series in shared/data and changes one thing a
real export or a real scanner does: an anonymiser that drops Type 2
attributes, orientations that differ by rounding between slices, a missing
Slice Thickness, slices dropped (uneven spacing), a sheared ("tilted") copy,
a single slice. Every variant gets its own Study, Series and SOP Instance
UIDs (derived from the originals and the variant's name, so they are stable
between runs), so a node and a PACS see it as a series of its own.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pydicom.valuerep import format_number_as_ds

from tests.helpers import SHARED

#: The real series the variants are made from: name -> folder under shared/data.
SOURCES = {
    "ct-head": "series/ct-head-philips-5mm",
    "ct-tilted": "geometry/ct-philips-tilted-16deg",
    "mr-sag": "series/mr-t1-sag-siemens",
}

#: What anonymisers commonly leave out: Type 2 attributes of Patient, General Study, General Series,
#: General Image, General Equipment and the modality modules, and a few Type 3 ones.
ANONYMISED_AWAY = (
    "PatientBirthDate",
    "PatientSex",
    "AccessionNumber",
    "ReferringPhysicianName",
    "StudyID",
    "StudyDate",
    "StudyTime",
    "SeriesNumber",
    "InstanceNumber",
    "Laterality",
    "PatientPosition",
    "Manufacturer",
    "KVP",
    "AcquisitionNumber",
    "InstitutionName",
    "StationName",
    "PatientAge",
    "PatientWeight",
    "SeriesDate",
    "SeriesTime",
    "AcquisitionDate",
    "AcquisitionTime",
    "ContentDate",
    "ContentTime",
    "ScanOptions",
    "MRAcquisitionType",
    "EchoTrainLength",
    "RepetitionTime",
    "EchoTime",
    "ScanningSequence",
    "SequenceVariant",
    "OperatorsName",
    "PerformingPhysicianName",
    "RequestAttributesSequence",
)


def source_files(name: str) -> list[Path]:
    """The image files of a real series (its DICOMDIR left out)."""
    folder = SHARED / SOURCES[name]
    return sorted(p for p in folder.iterdir() if p.is_file() and p.name != "DIRFILE")


def load(name: str) -> list[Dataset]:
    """The real series' data sets, sorted along the slice normal."""
    dsets = [dcmread(p) for p in source_files(name)]
    iop = np.array([float(x) for x in dsets[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    return sorted(dsets, key=lambda d: float(np.dot([float(x) for x in d.ImagePositionPatient], normal)))


def _ds(values: object) -> list[str]:
    return [format_number_as_ds(float(v)) for v in values]  # type: ignore[attr-defined]


def anonymised(dsets: list[Dataset]) -> list[Dataset]:
    """Type 2 (and some Type 3) attributes removed, private elements too, as anonymised exports are."""
    for d in dsets:
        for keyword in ANONYMISED_AWAY:
            d.pop(keyword, None)
        d.remove_private_tags()
        d.PatientName = "ANON"
        d.PatientID = "ANON0001"
    return dsets


def jittered(dsets: list[Dataset], eps: float = 1e-5) -> list[Dataset]:
    """Each slice's orientation differs from the others by rounding (|delta| <= eps), as some scanners write it."""
    rng = np.random.default_rng(7)
    for d in dsets:
        iop = np.array([float(x) for x in d.ImageOrientationPatient])
        d.ImageOrientationPatient = _ds(iop + rng.uniform(-eps, eps, 6))
    return dsets


def no_thickness(dsets: list[Dataset]) -> list[Dataset]:
    """Slice Thickness and Spacing Between Slices left out."""
    for d in dsets:
        d.pop("SliceThickness", None)
        d.pop("SpacingBetweenSlices", None)
    return dsets


def uneven(dsets: list[Dataset]) -> list[Dataset]:
    """Slices dropped so that the spacing varies (1, 2 and 3 steps between neighbours)."""
    n = len(dsets)
    keep = [i for i in range(n) if not (i > n // 3 and i % 3 == 1) and not (i > 2 * n // 3 and i % 3 == 2)]
    return [dsets[i] for i in keep]


def sheared(dsets: list[Dataset], degrees: float = 20.0) -> list[Dataset]:
    """A "tilted gantry" copy: each slice shifted in-plane along its column direction by tan(angle) x its depth.

    The orientation stays; the positions no longer lie along the slice normal, like a tilted CT's.
    """
    iop = np.array([float(x) for x in dsets[0].ImageOrientationPatient])
    col, normal = iop[3:], np.cross(iop[:3], iop[3:])
    p0 = np.array([float(x) for x in dsets[0].ImagePositionPatient])
    shear = math.tan(math.radians(degrees))
    for d in dsets:
        p = np.array([float(x) for x in d.ImagePositionPatient])
        depth = float(np.dot(p - p0, normal))
        d.ImagePositionPatient = _ds(p + col * depth * shear)
        d.pop("SliceLocation", None)
    return dsets


def single(dsets: list[Dataset]) -> list[Dataset]:
    """The middle slice alone."""
    return [dsets[len(dsets) // 2]]


VARIANTS: dict[str, Callable[[list[Dataset]], list[Dataset]]] = {
    "original": lambda d: d,
    "anonymised": anonymised,
    "jittered": jittered,
    "no-thickness": no_thickness,
    "uneven": uneven,
    "sheared": sheared,
    "single": single,
}


def make(source: str, *variants: str) -> list[Dataset]:
    """The real series ``source`` with ``variants`` applied in order, under new UIDs (stable per combination)."""
    dsets = copy.deepcopy(load(source))
    for v in variants:
        dsets = VARIANTS[v](dsets)
    tag = "/".join((source, *variants))
    uids: dict[str, str] = {}

    def new(uid: str) -> str:
        if uid not in uids:
            uids[uid] = generate_uid(entropy_srcs=[tag, uid])
        return uids[uid]

    for d in dsets:
        d.StudyInstanceUID = new(str(d.StudyInstanceUID))
        d.SeriesInstanceUID = new(str(d.SeriesInstanceUID))
        d.SOPInstanceUID = new(str(d.SOPInstanceUID))
        if "FrameOfReferenceUID" in d:
            d.FrameOfReferenceUID = new(str(d.FrameOfReferenceUID))
        d.file_meta.MediaStorageSOPInstanceUID = d.SOPInstanceUID
    return dsets


def write(dsets: list[Dataset], folder: Path) -> list[Path]:
    """Each data set as a DICOM file in ``folder`` (created), named by its place in the series."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, d in enumerate(dsets):
        p = folder / f"{i:04d}.dcm"
        d.save_as(p, enforce_file_format=True)
        out.append(p)
    return out


def make_files(folder: Path, source: str, *variants: str) -> list[Path]:
    """:func:`make` written to ``folder``."""
    return write(make(source, *variants), folder)
