"""Source data sets as highdicom needs them: what real exports leave out, filled in the standard's way.

highdicom builds a SEG or Parametric Map from its source images and reads
their Patient and Study attributes, their Pixel Measures and their plane
orientation as if every source were complete and exact. Real series are not:
anonymised exports leave out Type 2 attributes, scanners write orientations
that differ between slices in the last digits, and some leave out Slice
Thickness. The node accepts all of these when it loads a series (its own
tolerances are in :mod:`node.plugins.series`); here it hands highdicom copies
that agree with that reading:

- Type 2 attributes highdicom copies (Patient, General Study) are present,
  empty when the source does not say (PS3.5 7.4: a zero-length Type 2 value
  means "unknown"); patient data is never invented;
- every slice carries one orientation, the first slice's, when all lie within
  the loader's tolerance of it (they do, or the series would not have loaded);
- Slice Thickness, where missing or zero, is the distance between slices along
  the normal (the median, as the loader measures it).

The source files are not changed; only the references' copies are.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from dicom_node_sdk import geometry
from dicom_node_sdk.api import SeriesInput
from pydicom.dataset import Dataset
from pydicom.valuerep import format_number_as_ds

from node.derive.errors import OutputError

#: Type 2 attributes of the Patient and General Study modules that highdicom reads from the first source.
TYPE2_COPIED = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


@dataclass
class Prepared:
    """Copies of the source data sets for highdicom, and what was filled in (for the job's summary)."""

    datasets: list[Dataset]
    repairs: list[str] = field(default_factory=list)


def _copy(ds: Dataset) -> Dataset:
    """A copy whose top-level elements can be replaced without touching ``ds`` (values are shared, not copied)."""
    out = Dataset()
    for elem in ds:
        out.add(elem)
    if hasattr(ds, "file_meta"):
        out.file_meta = ds.file_meta
    return out


def _replace(ds: Dataset, keyword: str, value: object) -> None:
    ds.pop(keyword, None)  # a new element: the shared one (the source's) keeps its value
    setattr(ds, keyword, value)


def slice_spacing(series: SeriesInput) -> float | None:
    """The median distance between neighbouring slices along the normal, if the series has more than one."""
    spacing = geometry.slice_spacing(series.positions, series.orientation)
    return spacing if spacing > 0 else None  # NaN (one slice, no positions) is not > 0


def _thickness(series: SeriesInput) -> float | None:
    """What a missing Slice Thickness is taken to be: the slice spacing, else Spacing Between Slices."""
    spacing = slice_spacing(series)
    if spacing is not None:
        return spacing
    try:
        between = float(series.first.get("SpacingBetweenSlices") or 0)
    except (TypeError, ValueError):
        between = 0.0
    return between if between > 0 else None


def prepare(series: SeriesInput) -> Prepared:
    """Copies of ``series.datasets`` that highdicom accepts, with the repairs listed (made once per series)."""
    cached = series.__dict__.get("_prepared_sources")
    if cached is None:
        cached = series.__dict__["_prepared_sources"] = _prepare(series)
    return cached


def _prepare(series: SeriesInput) -> Prepared:
    repairs: list[str] = []
    out = [_copy(d) for d in series.datasets]
    missing = [k for k in TYPE2_COPIED if k not in out[0]]
    if missing:
        repairs.append(f"source lacks Type 2 {', '.join(missing)}: written empty")
    for ds in out:
        for keyword in TYPE2_COPIED:
            if keyword not in ds:
                setattr(ds, keyword, None)
    if series.frames is not None:  # one multi-frame source: its functional groups already agree
        return Prepared(out, repairs)
    if series.orientation is not None:
        iop = [format_number_as_ds(float(x)) for x in (*series.orientation[0], *series.orientation[1])]
        ref = [float(x) for x in iop]
        differing = [ds for ds in out if [float(x) for x in ds.ImageOrientationPatient] != ref]
        if differing:
            repairs.append(
                f"{len(differing)} slice(s) differ in orientation by rounding (within 1e-3): the "
                "first slice's orientation is used for all"
            )
            for ds in differing:
                _replace(ds, "ImageOrientationPatient", iop)
    if any(not _positive(ds.get("SliceThickness")) for ds in out) and "PixelSpacing" in out[0]:
        thickness = _thickness(series)
        if thickness is None:
            raise OutputError(
                "the source has no Slice Thickness and a single slice, so its thickness is unknown; "
                "a SEG or Parametric Map needs it (PS3.3 C.7.6.16.2.1)"
            )
        value = format_number_as_ds(thickness)
        repairs.append(f"source lacks Slice Thickness: {value} mm (the slice spacing) is used")
        for ds in out:
            if not _positive(ds.get("SliceThickness")):
                _replace(ds, "SliceThickness", value)
    return Prepared(out, repairs)


def _positive(value: object) -> bool:
    try:
        # A pydicom value (DSfloat, IS, str or bytes): float() reads each, or raises what is caught below.
        return value is not None and value != "" and float(value) > 0  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def library_errors(series: SeriesInput, what: str) -> Iterator[None]:
    """Turns an error raised inside highdicom into one that names the source and says what to do."""
    try:
        yield
    except OutputError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, IndexError) as e:
        files = [f.name for f in series.files] or ["?"]
        where = files[0] if len(files) == 1 else f"{files[0]} .. {files[-1]}"
        raise OutputError(
            f"highdicom could not build the {what} from this series ({len(series.datasets)} instance(s): {where}; "
            f"series {series.first.get('SeriesInstanceUID', '?')}): {type(e).__name__}: {e}. The source "
            "instances are stored as received; check them for the attribute named, or report it with these files"
        ) from e
