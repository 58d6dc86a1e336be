"""Several series of one study, made from a real series: what study rules (scope = "study") need.

The shared data holds single series; a study with a plain and a contrast CT is made from the real CT head
by copying its slices with a Series Instance UID, SOP Instance UIDs and a Series Number of their own (the
Study Instance UID and the patient stay), and Contrast/Bolus Agent set or removed. UIDs derive from the
folder written to, so they are stable for a given folder.
"""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.uid import generate_uid

from helpers import series_files

CT = "ct-head-philips-5mm"


def study_series(folder: Path, number: int, contrast: bool, count: int = 3) -> list[Path]:
    """The first ``count`` slices of the shared CT as a series of its own in the CT's study."""
    folder.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid(entropy_srcs=[str(folder), "series"])
    out = []
    for i, path in enumerate(series_files(CT)[:count]):
        ds = dcmread(path)
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[str(folder), str(i)])
        ds.SeriesNumber = number
        if contrast:
            ds.ContrastBolusAgent = "IOPAMIDOL"
        elif "ContrastBolusAgent" in ds:
            del ds.ContrastBolusAgent
        target = folder / f"{i}.dcm"
        ds.save_as(target)
        out.append(target)
    return out


def series_uid(files: list[Path]) -> str:
    return str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
