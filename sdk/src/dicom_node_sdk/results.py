"""What a plugin returns: masks (:class:`Segmentation`), pictures (:class:`Images`), numbers on a grid
(:class:`Volume`), and named quantities per finding (:class:`Measurements`, written as a DICOM SR).

Each result checks itself when it is made, so a wrong shape, type or value range is an error at
the line of the plugin that made it, saying what to change, not a failed job later. What needs the
series (the number of slices, rows and columns) is checked by the node when it builds the DICOM
object, with the same kind of message.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import numpy as np
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node_sdk import geometry
from dicom_node_sdk.errors import ResultError

#: Segment Algorithm Type (PS3.3 C.8.20.2): how a segment was made.
ALGORITHM_TYPES = ("AUTOMATIC", "SEMIAUTOMATIC", "MANUAL")
SEGMENTATION_KINDS = ("binary", "labelmap", "fractional")
VOLUME_KINDS = ("image", "parametric-map")
#: The letters of Patient Orientation (PS3.3 C.7.6.1.1.1).
ORIENTATION_LETTERS = frozenset("LRAPHF")


def _one_of(owner: str, field: str, value: object, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ResultError(f"{owner}.{field} must be one of {', '.join(map(repr, allowed))}; got {value!r}")


def _is_code(value: object) -> bool:
    """A pydicom Code, or a coded concept like it (highdicom's CodedConcept): what DICOM writes as a code."""
    return isinstance(value, Code) or all(hasattr(value, a) for a in ("value", "scheme_designator", "meaning"))


def transpose_hint(shape: tuple[int, ...], expected: tuple[int, ...]) -> str:
    """How to turn an array of ``shape`` into ``expected`` when only its axes are in another order ("" otherwise)."""
    if len(shape) != len(expected) or shape == expected or sorted(shape) != sorted(expected):
        return ""
    free = list(range(len(shape)))
    order = []
    for size in expected:
        axis = next(a for a in free if shape[a] == size)
        free.remove(axis)
        order.append(axis)
    return f": transpose it with .transpose({', '.join(map(str, order))})"


@dataclass
class Segment:
    """What one segment shows, as coded concepts (e.g. SNOMED CT from ``pydicom.sr.codedict.codes``)."""

    label: str
    category: Code
    type: Code
    #: Display colour, RGB 0-255; the node picks one when not given.
    color: tuple[int, int, int] | None = None
    anatomic_region: Code | None = None
    #: E.g. left/right (SNOMED CT); goes with ``type``.
    type_modifier: Code | None = None
    #: E.g. left/right; goes with ``anatomic_region``.
    anatomic_region_modifier: Code | None = None
    #: Segment Description, free text (optional).
    description: str = ""
    #: "AUTOMATIC" (the default: a plugin made it), "SEMIAUTOMATIC" (e.g. a model refined by hand) or "MANUAL".
    algorithm_type: str = "AUTOMATIC"

    def __post_init__(self) -> None:
        for name in ("category", "type"):
            if not _is_code(getattr(self, name)):
                raise ResultError(
                    f"Segment {self.label!r}: {name} must be a pydicom Code, e.g. codes.SCT.Liver or "
                    f'Code("10200004", "SCT", "Liver"); got {getattr(self, name)!r}'
                )
        for name in ("anatomic_region", "type_modifier", "anatomic_region_modifier"):
            value = getattr(self, name)
            if value is not None and not _is_code(value):
                raise ResultError(f"Segment {self.label!r}: {name} must be a pydicom Code or None; got {value!r}")
        if self.color is not None:
            rgb: tuple[object, ...] = tuple(self.color)  # what the plugin gave, whatever the annotation says
            if len(rgb) != 3 or not all(isinstance(c, (int, np.integer)) and 0 <= c <= 255 for c in rgb):
                raise ResultError(f"Segment {self.label!r}: color must be (red, green, blue), each 0-255; got {rgb!r}")
            self.color = (int(self.color[0]), int(self.color[1]), int(self.color[2]))
        _one_of(f"Segment {self.label!r}", "algorithm_type", self.algorithm_type, ALGORITHM_TYPES)


@dataclass
class Segmentation:
    """Masks over the input slices.

    ``masks`` is either a label map of shape (slices, rows, cols) with 0 for
    background and segment numbers 1..n, or stacked masks of shape
    (slices, rows, cols, n): booleans, or floats in [0, 1] for a FRACTIONAL
    result (probabilities). Slices are in the order of ``series.datasets``.
    ``segments`` describes label 1..n (mask 1..n); empty, a segment template describes them.
    Checked when made (:class:`ResultError`); the node checks the shape against the series.
    """

    masks: np.ndarray
    segments: Sequence[Segment]
    #: How the node should encode it; "binary" suits most viewers.
    kind: Literal["binary", "labelmap", "fractional"] = "binary"
    description: str = ""

    def __post_init__(self) -> None:
        _one_of("Segmentation", "kind", self.kind, SEGMENTATION_KINDS)
        self.segments = list(self.segments)
        for i, s in enumerate(self.segments):
            if not isinstance(s, Segment):
                raise ResultError(f"Segmentation.segments[{i}] must be a Segment, not a {type(s).__name__}")
        m = self.masks = np.asarray(self.masks)
        if m.dtype != bool and (not np.issubdtype(m.dtype, np.number) or np.issubdtype(m.dtype, np.complexfloating)):
            raise ResultError(f"Segmentation.masks must be booleans or numbers, not {m.dtype}")
        if m.ndim not in (3, 4):
            raise ResultError(
                "Segmentation.masks must be (slices, rows, columns) as a label map or (slices, rows, columns, "
                f"segments) as stacked masks; got shape {m.shape}"
            )
        if self.kind == "fractional":
            _check_fractional(m)
        elif m.ndim == 4 and self.kind == "labelmap" and (m.astype(bool).sum(axis=3) > 1).any():
            raise ResultError('stacked masks overlap, so they cannot be one label map; use kind="binary"')
        if self.segments:
            _check_described(m, len(self.segments), self.kind)
        elif m.ndim == 3 and np.issubdtype(m.dtype, np.integer) and m.size and int(m.min()) < 0:
            # No descriptions: a segment template describes the labels (checked when it is applied).
            raise ResultError(f"label values must be 0 (background) or more; found {int(m.min())}")

    def segment_masks(self) -> np.ndarray:
        """Each segment's voxels as booleans of shape (slices, rows, columns, segments), segment 1 first.

        One reading of ``masks`` for every plugin that measures or draws an earlier step's segments, so
        they all count the same voxels as the SEG the node writes: stacked masks count where non-zero,
        a label map gives segments 1..n (n: the segments described, or the largest label without
        descriptions), a 3-D boolean is one segment. A fractional mask counts where it is **at least
        0.5** (a probability of one half is inside), so a voxel the SEG stores as 128 of 255 is inside.
        """
        m = np.asarray(self.masks)
        if self.kind == "fractional":
            inside = m >= 0.5
            return inside if inside.ndim == 4 else inside[..., None]
        if m.ndim == 4:
            return m.astype(bool)
        if m.dtype == bool:  # one segment
            return m[..., None]
        count = max(len(self.segments), int(m.max()) if m.size else 0)
        return np.stack([m == n for n in range(1, count + 1)], axis=-1) if count else np.zeros((*m.shape, 0), bool)


def _check_fractional(m: np.ndarray) -> None:
    if not np.issubdtype(m.dtype, np.floating):
        raise ResultError(
            f"a fractional Segmentation needs float masks in [0, 1] (probabilities), got {m.dtype}; "
            'convert with masks.astype(np.float32), or use kind="binary" for masks'
        )
    lo, hi = (float(np.min(m)), float(np.max(m))) if m.size else (0.0, 0.0)  # NaN if any is NaN
    if not (0 <= lo and hi <= 1):
        found = "NaN" if np.isnan(lo) or np.isnan(hi) else f"values {lo:g}..{hi:g}"
        raise ResultError(f"fractional Segmentation.masks must lie in [0, 1] (no NaN); found {found}")


def _check_described(m: np.ndarray, k: int, kind: str) -> None:
    """Masks against their ``k`` segment descriptions: one per stacked mask, or label values 1..k."""
    if m.ndim == 4:
        if m.shape[3] != k:
            raise ResultError(
                f"Segmentation has {m.shape[3]} stacked masks but {k} segment descriptions: give one Segment per "
                "mask (the last axis of masks)"
            )
        return
    if kind == "fractional":
        if k != 1:
            raise ResultError(f"one fractional mask holds one segment, but {k} are described: stack one per segment")
        return
    if m.dtype == bool:
        if k != 1:
            raise ResultError(
                f"a boolean label map holds one segment, but {k} are described: give integer labels 0..n, or "
                "stack one mask per segment on a last axis"
            )
        return
    if not np.issubdtype(m.dtype, np.integer):
        raise ResultError(
            f"a label map must hold integers (0 = background, 1..{k}), got {m.dtype}; convert with "
            "masks.astype(np.uint8)"
        )
    lo, hi = (int(m.min()), int(m.max())) if m.size else (0, 0)
    if lo < 0 or hi > k:
        raise ResultError(
            f"label values must be 0..{k} (one Segment per label); found {lo}..{hi}: describe every label "
            "with a Segment, or set the others to 0"
        )


@dataclass
class Images:
    """Pictures for Secondary Capture: (n, rows, cols) grey (uint8/uint16) or (n, rows, cols, 3) RGB uint8.

    One 2-D array is one grey image (it becomes (1, rows, cols)). Checked when made (:class:`ResultError`).
    """

    pixels: np.ndarray
    #: For each image, the index of the input slice it shows (None: a derived view such as a projection).
    source_slices: Sequence[int | None] | None = None
    description: str = ""
    #: For derived views: the patient directions of the rows and columns (DICOM Patient Orientation,
    #: e.g. ("L", "F") for a coronal projection). Images of a source slice take the slice's.
    patient_orientation: tuple[str, str] | None = None
    #: For derived views: (row spacing, column spacing) in mm. Images of a source slice at its size
    #: take the slice's Pixel Spacing; other images have none unless given here.
    pixel_spacing: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        px = np.asarray(self.pixels)
        if px.ndim == 2:  # one grey image
            px = px[None]
        self.pixels = px
        rgb = px.ndim == 4 and px.shape[-1] == 3
        if px.ndim != 3 and not rgb:
            hint = ": drop the alpha channel with pixels[..., :3]" if px.ndim == 4 and px.shape[-1] == 4 else ""
            raise ResultError(
                f"Images.pixels must be (n, rows, columns) grey or (n, rows, columns, 3) RGB; got shape {px.shape}{hint}"
            )
        if rgb and px.dtype != np.uint8:
            raise ResultError(
                f"RGB Images.pixels must be uint8, got {px.dtype}: scale them to 0-255 and .astype(np.uint8)"
            )
        if not rgb and px.dtype not in (np.uint8, np.uint16):
            raise ResultError(
                f"grey Images.pixels must be uint8 or uint16, got {px.dtype}: window them first, e.g. "
                "np.clip((v - low) / (high - low) * 255, 0, 255).astype(np.uint8)"
            )
        if self.source_slices is not None:
            sources: list[object] = list(self.source_slices)
            if len(sources) != len(px):
                raise ResultError(
                    f"{len(px)} images but {len(sources)} source_slices: give one slice index (or None) per image"
                )
            for s in sources:
                if s is not None and (not isinstance(s, (int, np.integer)) or isinstance(s, bool) or s < 0):
                    raise ResultError(
                        f"Images.source_slices holds {s!r}; each is the index (0, 1, ...) of the input slice the "
                        "image shows, or None for a derived view"
                    )
            self.source_slices = [None if s is None else int(s) for s in self.source_slices]
        if self.patient_orientation is not None:
            po: tuple[object, ...] = tuple(self.patient_orientation)
            if len(po) != 2 or not all(isinstance(d, str) and d and set(d) <= ORIENTATION_LETTERS for d in po):
                raise ResultError(
                    "Images.patient_orientation must be the directions of the rows and the columns, two strings "
                    f'of the letters L, R, A, P, H, F, e.g. ("L", "F"); got {self.patient_orientation!r}'
                )
            self.patient_orientation = (self.patient_orientation[0], self.patient_orientation[1])
        if self.pixel_spacing is not None:
            self.pixel_spacing = _positive_pair("Images.pixel_spacing", self.pixel_spacing)


def _positive_pair(name: str, value: Any) -> tuple[float, float]:
    try:
        pair = tuple(float(x) for x in value)
    except (TypeError, ValueError):
        pair = ()
    if len(pair) != 2 or not all(np.isfinite(x) and x > 0 for x in pair):
        raise ResultError(f"{name} must be (row spacing, column spacing) in mm, both > 0; got {value!r}")
    return (pair[0], pair[1])


@dataclass
class Volume:
    """A volume of numbers on the input's grid: (slices, rows, cols), slices in the order of ``series.datasets``.

    Returned as a derived image series of the source's kind (CT stays CT Image, MR stays MR
    Image): a denoised or subtracted series, a probability map, anything that should stack,
    scroll and measure like the original. Integer values that fit 16 bits are stored exactly;
    anything else is stored in 16 bits with a Rescale Slope/Intercept, and the node reports the
    largest error that costs (``precision`` makes a larger one an error). Checked when made
    (:class:`ResultError`); the node checks the shape against the series.
    """

    values: np.ndarray
    #: What it is, e.g. "denoised" (the Series Description unless the rule sets one).
    name: str = ""
    #: Largest acceptable error of a stored value (same units as ``values``); None: whatever 16 bits give.
    precision: float | None = None
    #: How it was derived, for Derivation Description (default: the plugin's name and version).
    description: str = ""
    #: "image": a derived image series of the source's kind; "parametric-map": one Parametric Map
    #: instance with float values and their units (a probability, a distance, a perfusion map).
    kind: Literal["image", "parametric-map"] = "image"
    #: The values' units as a UCUM code, e.g. ``Code("mm", "UCUM", "millimeter")``; for a parametric
    #: map (default: ``1``, no units).
    units: Code | None = None
    #: A grid of its own (resampled, registered): 4x4 from (slice, row, column) indices to the source's
    #: patient coordinates in mm, as ``SeriesInput.affine``. None: the input's grid.
    affine: np.ndarray | None = None

    def __post_init__(self) -> None:
        _one_of("Volume", "kind", self.kind, VOLUME_KINDS)
        v = self.values = np.asarray(self.values)
        if not np.issubdtype(v.dtype, np.number) or np.issubdtype(v.dtype, np.complexfloating):
            raise ResultError(f"Volume.values must be real numbers, not {v.dtype}: convert with .astype(np.float32)")
        if v.ndim != 3:
            raise ResultError(f"Volume.values must be (slices, rows, columns); got shape {v.shape}")
        if v.size == 0:
            raise ResultError(f"Volume.values is empty (shape {v.shape})")
        if not np.all(np.isfinite(v)):
            raise ResultError(
                "Volume.values holds NaN or infinite values; replace them before returning it, e.g. "
                "np.nan_to_num(values, nan=0.0)"
            )
        if self.precision is not None and not (np.isfinite(self.precision) and self.precision >= 0):
            raise ResultError(f"Volume.precision must be a number >= 0 (or None); got {self.precision!r}")
        if self.units is not None and not _is_code(self.units):
            raise ResultError(
                f'Volume.units must be a UCUM pydicom Code, e.g. Code("mm", "UCUM", "millimeter"); got {self.units!r}'
            )
        if self.affine is not None:
            self.affine = np.asarray(self.affine, dtype=np.float64)
            try:
                geometry.grid_from_affine(self.affine, v.shape[0])
            except ValueError as e:
                raise ResultError(f"Volume.affine {e}") from None


def _code_field(owner: str, field: str, value: object, example: str, optional: bool = False) -> None:
    if value is None and optional:
        return
    if not _is_code(value):
        none = " or None" if optional else ""
        raise ResultError(f"{owner}: {field} must be a pydicom Code{none}, e.g. {example}; got {value!r}")


@dataclass
class Measurement:
    """One named quantity of a finding, e.g. its volume in ml or its mean in HU (DICOM TID 300).

    ``unit`` is a UCUM code: ``Code("ml", "UCUM", "milliliter")``, ``Code("[hnsf'U]", "UCUM",
    "Hounsfield unit")``, ``Code("1", "UCUM", "no units")``. ``derivation`` says how a value summarises
    the region (CID 7464: ``codes.SCT.Mean``, ``codes.SCT.Maximum``, ``codes.DCM.StandardDeviation`` ...).
    """

    name: Code
    value: float
    unit: Code
    derivation: Code | None = None

    def __post_init__(self) -> None:
        name = getattr(self.name, "meaning", self.name)
        owner = f"Measurement {name!r}"
        _code_field("Measurement", "name", self.name, 'codes.SCT.Volume or Code("118565006", "SCT", "Volume")')
        _code_field(owner, "unit", self.unit, 'Code("ml", "UCUM", "milliliter")')
        if self.unit.scheme_designator != "UCUM":
            raise ResultError(
                f'{owner}: unit must be a UCUM code (scheme "UCUM"), e.g. Code("mm", "UCUM", "millimeter"); '
                f"got scheme {self.unit.scheme_designator!r}"
            )
        _code_field(owner, "derivation", self.derivation, "codes.SCT.Mean", optional=True)
        value: object = self.value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise ResultError(f"{owner}: value must be a number; got {value!r} ({type(value).__name__})")
        if not np.isfinite(value):
            raise ResultError(
                f"{owner}: value must be a finite number; got {value!r} (leave the measurement out instead)"
            )
        self.value = float(value)


@dataclass
class QualitativeFinding:
    """A coded statement about a finding, e.g. whether a finding is malignant: value ``codes.SCT.Malignant``."""

    name: Code
    value: Code

    def __post_init__(self) -> None:
        _code_field("QualitativeFinding", "name", self.name, 'Code("RID5705", "RADLEX", "Malignancy")')
        _code_field(f"QualitativeFinding {self.name.meaning!r}", "value", self.value, "codes.SCT.Malignant")


@dataclass
class MeasurementGroup:
    """One finding (a region, an organ, a nodule) and what was measured of it.

    ``tracking_id`` names the finding the same way in every study of the patient ("Liver", "Nodule 1"):
    the node derives the finding's Tracking UID from it (with the patient and the plugin), so a follow-up
    report of the same finding carries the same UID. ``segment`` (1-based) names the segment of a
    Segmentation the job made that the group measures: ``segmentation`` is that result's index among
    the job's results (chain order, 0-based); None means the last Segmentation before this result.
    A region without a Segmentation may name the input slices it was measured on (``source_slices``).
    """

    tracking_id: str
    finding: Code
    measurements: Sequence[Measurement]
    qualitative: Sequence[QualitativeFinding] = ()
    segment: int | None = None
    segmentation: int | None = None
    finding_site: Code | None = None
    source_slices: Sequence[int] | None = None

    def __post_init__(self) -> None:
        tid: object = self.tracking_id
        if not isinstance(tid, str) or not tid.strip():
            raise ResultError(f'MeasurementGroup.tracking_id must be a non-empty string, e.g. "Liver"; got {tid!r}')
        owner = f"MeasurementGroup {self.tracking_id!r}"
        if len(tid) > 64:
            raise ResultError(f"{owner}: tracking_id is {len(tid)} characters; at most 64")
        _code_field(owner, "finding", self.finding, "codes.SCT.Liver or the segment's type code")
        _code_field(owner, "finding_site", self.finding_site, "codes.SCT.Liver", optional=True)
        self.measurements = _items(owner, "measurements", self.measurements, Measurement)
        self.qualitative = _items(owner, "qualitative", self.qualitative, QualitativeFinding)
        if not self.measurements and not self.qualitative:
            raise ResultError(f"{owner} holds no measurements and no qualitative findings; leave the group out")
        self.segment = _index(owner, "segment", self.segment, 1, "the segment number, 1 for the first segment")
        self.segmentation = _index(
            owner, "segmentation", self.segmentation, 0, "the index of the Segmentation among the job's results"
        )
        if self.segmentation is not None and self.segment is None:
            raise ResultError(f"{owner}: segmentation is set but segment is not; name the segment number it measures")
        if self.source_slices is not None:
            if self.segment is not None:
                raise ResultError(
                    f"{owner}: give segment (a region of a Segmentation) or source_slices (the slices it was measured "
                    "on), not both: the Segmentation already names its slices"
                )
            self.source_slices = [
                _index(owner, "source_slices[]", s, 0, "the index of an input slice (0, 1, ...)") or 0
                for s in self.source_slices
            ]


def _index(owner: str, field: str, value: object, lowest: int, what: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < lowest:
        raise ResultError(f"{owner}: {field} must be an integer >= {lowest} ({what}) or None; got {value!r}")
    return int(value)


def _items(owner: str, field: str, values: object, kind: type[Any]) -> list[Any]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ResultError(f"{owner}: {field} must be a list of {kind.__name__}; got {type(values).__name__}")
    for i, v in enumerate(values):
        if not isinstance(v, kind):
            raise ResultError(f"{owner}: {field}[{i}] must be a {kind.__name__}, not a {type(v).__name__}")
    return list(values)


@dataclass
class Measurements:
    """Findings and what was measured of them: written as one DICOM SR measurement report (TID 1500).

    Each group is one finding; its ``tracking_id`` is unique in the report; a report has at least one
    (TID 1500: nothing measured is no report, so return none). ``title`` is a report title from CID 7021.

    ``evidence_series``: the Series Instance UIDs of the other series the plugin measured or compared
    with (a prior study's series, another input of a study rule): the node lists their instances in the
    report's evidence (a prior study's under Pertinent Other Evidence), so a reader can tell where a
    "volume in the prior study" came from. Each must be one of the job's inputs or priors.
    """

    groups: Sequence[MeasurementGroup]
    title: Code = codes.DCM.ImagingMeasurementReport
    description: str = ""
    evidence_series: Sequence[str] = ()

    def __post_init__(self) -> None:
        self.groups = _items("Measurements", "groups", self.groups, MeasurementGroup)
        if not self.groups:
            raise ResultError(
                "Measurements holds no groups; a measurement report has at least one finding: with nothing "
                "measured, return no Measurements (leave it out of the results, or return None)"
            )
        _code_field("Measurements", "title", self.title, "codes.DCM.ImagingMeasurementReport")
        seen: set[str] = set()
        for g in self.groups:
            if g.tracking_id in seen:
                raise ResultError(
                    f"Measurements: two groups have tracking_id {g.tracking_id!r}; each finding needs its own "
                    '(e.g. "Nodule 1", "Nodule 2")'
                )
            seen.add(g.tracking_id)
        if not isinstance(self.description, str):
            raise ResultError(f"Measurements.description must be a string; got {self.description!r}")
        if isinstance(self.evidence_series, str) or not all(isinstance(u, str) for u in self.evidence_series):
            raise ResultError(
                "Measurements.evidence_series is a list of Series Instance UIDs (strings), e.g. "
                f"[prior_series.first.SeriesInstanceUID]; got {self.evidence_series!r}"
            )
        self.evidence_series = list(dict.fromkeys(self.evidence_series))


Result = Union[Segmentation, Images, Volume, Measurements]

__all__ = [
    "Images",
    "Measurement",
    "MeasurementGroup",
    "Measurements",
    "QualitativeFinding",
    "Result",
    "Segment",
    "Segmentation",
    "Volume",
]
