"""Derived objects (SEG and SC) built from plugin results, checked the way a receiver would see them.

For every source (real CT head and sagittal MR, an enhanced multi-frame CT, synthetic
tilted-gantry, oblique, variable-spacing CT and coronal MR) and every segmentation kind
and transfer syntax the node offers, the SEG is written, read back with
``highdicom.seg.segread`` and compared per source instance (per source frame for the
multi-frame source) with the masks the plugin gave. Every object a test writes is checked
with dciodvfy (dicom3tools; warnings are reported as pytest warnings) and, at the end of
the module, sent with DCMTK storescu to a real Orthanc that must then hold each one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from helpers import SHARED, make_ct_series, series_files, storescu_exact  # noqa: E402
from helpers.dciodvfy import LABEL_MAP_SEGMENTATION_STORAGE, verify  # noqa: E402
from helpers.orthanc import Orthanc  # noqa: E402

from node.derive.common import MANUFACTURER, Provenance  # noqa: E402
from node.derive.image import build_image_series, build_parametric_map  # noqa: E402
from node.derive.sc import build_sc  # noqa: E402
from node.derive.seg import OutputError, build_seg  # noqa: E402
from node.dicom.identity import DERIVED_UID_ROOT  # noqa: E402
from node.plugins.api import (  # noqa: E402
    GeometryError,
    Images,
    ResultError,
    Segment,
    Segmentation,
    SeriesInput,
    Volume,
    codes,
)
from node.plugins.series import load_series  # noqa: E402
from node.plugins.worker import StepSpec, WorkSpec  # noqa: E402
from node.plugins.worker import run as run_work  # noqa: E402

pytestmark = [
    # The real CT's Patient Name is "HEAD"; highdicom warns on every copy of it.
    pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning"),
]

THRESHOLD = "node.plugins.builtin.threshold:threshold_seg"

#: The node's compression options (``compression`` in a plugin action) and their transfer syntaxes.
SYNTAXES = {"explicit": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless, "rle": RLELossless}
KINDS = ("binary", "labelmap", "fractional")
#: highdicom 0.28 encodes BINARY (1 bit) SEG frames uncompressed or as JPEG 2000 only.
REFUSED = {("binary", "rle")}
COMBOS = [(k, s) for k in KINDS for s in SYNTAXES if (k, s) not in REFUSED]

SOURCES = ("ct-head", "mr-sag", "ect-multiframe", "ct-tilted", "ct-oblique", "ct-varspacing", "mr-coronal")
SEGMENTS = [
    Segment("Lesion", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone, color=(241, 214, 145)),
    Segment("Brain", codes.SCT.Organ, codes.SCT.Brain, anatomic_region=codes.SCT.Head),
]

#: Every object the tests wrote (all dciodvfy-checked); the Orthanc test at the end sends them all.
PRODUCED: list[Path] = []


# -- dciodvfy ------------------------------------------------------------------------------------


def write(ds: Dataset, path: Path, label: str) -> Path:
    """Save as a DICOM file, check it with dciodvfy and remember it for the Orthanc test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    verify(path, label)
    PRODUCED.append(path)
    return path


# -- sources ---------------------------------------------------------------------------------------


def _synthetic(
    out: Path,
    name: str,
    positions: np.ndarray,
    iop: list[float],
    *,
    rows: int,
    cols: int,
    modality: str = "CT",
    seed: int = 0,
    tilt: float | None = None,
) -> list[Path]:
    """A single-frame series with the given geometry; slice i is file i and has pixel (0, 0) = i."""
    files = make_ct_series(out, len(positions), rows, cols, seed=seed, patient_name=f"TEST^{name.upper()}")
    for i, f in enumerate(files):
        ds = pydicom.dcmread(f)
        ds.ImagePositionPatient = [round(float(x), 4) for x in positions[i]]
        ds.ImageOrientationPatient = [round(float(x), 6) for x in iop]
        ds.SeriesDescription = f"synthetic {name}"
        if tilt is not None:
            ds.GantryDetectorTilt = tilt
        if modality == "MR":
            ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
            ds.Modality = "MR"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
            for kw in ("KVP", "RescaleIntercept", "RescaleSlope"):
                delattr(ds, kw)
            ds.ScanningSequence, ds.SequenceVariant, ds.MRAcquisitionType = "SE", "NONE", "2D"
        px = ds.pixel_array.copy()
        px[0, 0] = i
        ds.PixelData = px.tobytes()
        ds.save_as(f, enforce_file_format=True)
    return files


def _build_sources(root: Path) -> dict[str, list[Path]]:
    rng = np.random.default_rng(7)
    out: dict[str, list[Path]] = {
        "ct-head": series_files("ct-head-philips-5mm"),
        "mr-sag": series_files("mr-t1-sag-siemens"),
        "ect-multiframe": [SHARED / "transfer-syntaxes" / "misc" / "eCT_Supplemental.dcm"],
    }
    # Tilted gantry as some scanners store it: axial orientation, each slice shifted in y by z * tan(tilt).
    z = np.arange(16) * 2.5
    pos = np.stack([np.full_like(z, -100.0), -100.0 + z * np.tan(np.radians(20)), z], axis=1)[::-1]
    out["ct-tilted"] = _synthetic(root / "ct-tilted", "tilted", pos, [1, 0, 0, 0, 1, 0], rows=48, cols=64, tilt=20.0)
    # Tilted (oblique) plane: columns tilted 25 degrees about x, slices along the plane's normal.
    t = np.radians(25)
    col = np.array([0, np.cos(t), np.sin(t)])
    normal = np.cross([1, 0, 0], col)
    pos = np.array([[-90.0, -80.0, 10.0] + k * 3.0 * normal for k in range(12)])[rng.permutation(12)]
    out["ct-oblique"] = _synthetic(root / "ct-oblique", "oblique", pos, [1, 0, 0, *col], rows=40, cols=56, seed=1)
    # Variable slice spacing (e.g. a combined series): gaps from 1 to 7.5 mm.
    gaps = [1.0, 2.5, 5.0, 1.25, 2.5, 7.5, 2.5, 1.0, 3.0, 5.0, 2.5, 1.25, 2.0]
    z = np.concatenate([[0.0], np.cumsum(gaps)]) - 20.0
    pos = np.stack([np.full_like(z, -120.0), np.full_like(z, -110.0), z], axis=1)[rng.permutation(len(z))]
    out["ct-varspacing"] = _synthetic(
        root / "ct-varspacing", "varspacing", pos, [1, 0, 0, 0, 1, 0], rows=64, cols=48, seed=2
    )
    # Coronal MR: rows along x, columns head to feet, slices posterior-going (normal +y).
    y = -40.0 + 4.0 * np.arange(18)
    pos = np.stack([np.full_like(y, -100.0), y, np.full_like(y, 80.0)], axis=1)[rng.permutation(18)]
    out["mr-coronal"] = _synthetic(
        root / "mr-coronal", "coronal", pos, [1, 0, 0, 0, 0, -1], rows=56, cols=40, modality="MR", seed=3
    )
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    if not SHARED.is_dir():
        pytest.fail(f"the shared test data folder {SHARED} is missing")
    return _build_sources(tmp_path_factory.mktemp("sources"))


def load(sources: dict[str, list[Path]], name: str) -> SeriesInput:
    """The series as a plugin gets it, loaded from its files in reverse order (the loader must sort)."""
    return load_series(list(reversed(sources[name])))


def source_uids(series: SeriesInput) -> list[str]:
    return [str(d.SOPInstanceUID) for d in series.datasets]


def slice_position(series: SeriesInput, i: int) -> np.ndarray:
    """Image Position (Patient) of the plugin's slice i, read from the source data set (not from series.positions)."""
    if series.frames is None:
        return np.array([float(x) for x in series.datasets[i].ImagePositionPatient])
    item = series.first.PerFrameFunctionalGroupsSequence[series.frames[i]]
    return np.array([float(x) for x in item.PlanePositionSequence[0].ImagePositionPatient])


def source_iop(series: SeriesInput) -> np.ndarray:
    ds = series.first
    if series.frames is None:
        return np.array([float(x) for x in ds.ImageOrientationPatient])
    shared = ds.SharedFunctionalGroupsSequence[0]
    return np.array([float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient])


# -- masks ---------------------------------------------------------------------------------------------


_MASKS: dict[str, np.ndarray] = {}


def blobs(name: str, n: int, rows: int, cols: int, k: int = 3) -> np.ndarray:
    """Random ellipsoids, (n, rows, cols, k) bool, the same for a source every time.

    Segments 1 and 2 overlap; the first slice holds at most segment 1 and (with more than three
    slices) the last slice is empty, so empty frames and empty slices always occur.
    """
    key = f"{name}-{n}-{rows}-{cols}-{k}"
    if key in _MASKS:
        return _MASKS[key]
    rng = np.random.default_rng(zlib.crc32(key.encode()))
    kk, ii, jj = np.ogrid[:n, :rows, :cols]
    m = np.zeros((n, rows, cols, k), dtype=bool)
    first = None
    for s in range(k):
        for b in range(2):
            c = rng.uniform([0, rows * 0.25, cols * 0.25], [n - 1, rows * 0.75, cols * 0.75])
            if s == 1 and b == 0:
                c = first  # overlaps segment 1
            r = rng.uniform([max(1.0, n / 4), rows / 10, cols / 10], [max(1.5, n / 2), rows / 4, cols / 4])
            if first is None:
                first = c
            m[..., s] |= ((kk - c[0]) / r[0]) ** 2 + ((ii - c[1]) / r[1]) ** 2 + ((jj - c[2]) / r[2]) ** 2 <= 1
    m[0, :, :, 1:] = False
    if n > 3:
        m[-1] = False
    assert all(m[..., s].any() for s in range(k)), "degenerate random masks"
    assert (m[..., 0] & m[..., 1]).any(), "segments 1 and 2 should overlap"
    _MASKS[key] = m
    return m


def series_masks(name: str, series: SeriesInput) -> np.ndarray:
    return blobs(name, len(series), int(series.first.Rows), int(series.first.Columns))


@dataclass
class Expected:
    result: Segmentation
    #: What reading back must give: stacked (n, rows, cols, k), bool or (fractional) stored 0..255 values.
    stacked: np.ndarray
    #: Frames the SEG holds without empty frames.
    nonempty_frames: int


def plugin_result(kind: str, masks: np.ndarray, seed: int, description: str = "") -> Expected:
    """What a plugin of this kind returns for ``masks``, and what must come back."""
    n, _, _, k = masks.shape
    if kind == "binary":  # stacked, overlapping
        return Expected(
            Segmentation(masks, SEGMENTS[:k], "binary", description), masks, int(masks.any(axis=(1, 2)).sum())
        )
    if kind == "labelmap":  # a label map; later segments win where masks overlap
        labels = np.zeros(masks.shape[:3], dtype=np.uint8)
        for s in range(k):
            labels[masks[..., s]] = s + 1
        stacked = labels[..., None] == np.arange(1, k + 1, dtype=np.uint8)
        return Expected(
            Segmentation(labels, SEGMENTS[:k], "labelmap", description), stacked, int(labels.any(axis=(1, 2)).sum())
        )
    rng = np.random.default_rng(seed)
    p = rng.uniform(0.0, 1.0, masks.shape).astype(np.float32) * masks
    p[masks & (rng.random(masks.shape) < 0.05)] = 1.0
    stored = np.around(p * 255.0).astype(np.uint8)  # float32 arithmetic, as highdicom rounds
    return Expected(
        Segmentation(p, SEGMENTS[:k], "fractional", description), stored, int(stored.any(axis=(1, 2)).sum())
    )


def read_back(
    path: Path | hd.seg.Segmentation, series: SeriesInput, *, missing_are_empty: bool, **kw: object
) -> np.ndarray:
    """The SEG's masks in the plugin's slice order, through highdicom's per-source-instance (or frame) access."""
    seg = path if isinstance(path, hd.seg.Segmentation) else hd.seg.segread(path)
    if series.frames is None:
        return seg.get_pixels_by_source_instance(
            source_sop_instance_uids=source_uids(series), assert_missing_frames_are_empty=missing_are_empty, **kw
        )
    return seg.get_pixels_by_source_frame(
        source_sop_instance_uid=str(series.first.SOPInstanceUID),
        source_frame_numbers=[f + 1 for f in series.frames],
        assert_missing_frames_are_empty=missing_are_empty,
        **kw,
    )


def provenance(series: SeriesInput, tag: str, **kw: object) -> Provenance:
    return Provenance(
        job_key=(str(series.first.SeriesInstanceUID), 1, tag, 0),
        algorithm="blob-finder",
        algorithm_version="2.1",
        parameters={"threshold": "0.5", "model": "blobs-v2"},
        station_name="NODE_TEST",
        **kw,  # type: ignore[arg-type]
    )


# -- checks shared by the tests ---------------------------------------------------------------------


def check_common(ds: Dataset, series: SeriesInput, prov: Provenance) -> None:
    """In the source study, with the source patient, in its own new series, made by this node."""
    src = series.first
    assert ds.StudyInstanceUID == src.StudyInstanceUID
    assert ds.PatientID == src.PatientID and str(ds.PatientName) == str(src.PatientName)
    assert ds.get("AccessionNumber", "") == src.get("AccessionNumber", "")
    assert ds.SeriesInstanceUID != src.SeriesInstanceUID
    assert ds.SeriesInstanceUID.startswith(DERIVED_UID_ROOT) and ds.SOPInstanceUID.startswith(DERIVED_UID_ROOT)
    equipment = [e for e in ds.ContributingEquipmentSequence if e.Manufacturer == MANUFACTURER]
    assert len(equipment) == 1, ds.ContributingEquipmentSequence
    eq = equipment[0]
    assert eq.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"  # Processing Equipment
    assert f"{prov.algorithm} {prov.algorithm_version}" in list(eq.SoftwareVersions)
    assert eq.StationName == prov.station_name and eq.ContributionDateTime


def check_seg(ds: Dataset, series: SeriesInput, prov: Provenance, exp: Expected, *, index: int = 0) -> None:
    check_common(ds, series, prov)
    labelmap = exp.result.kind == "labelmap"
    assert ds.SOPClassUID == (LABEL_MAP_SEGMENTATION_STORAGE if labelmap else SegmentationStorage)
    assert ds.Modality == "SEG" and ds.SegmentationType == exp.result.kind.upper()
    assert ds.SeriesInstanceUID == prov.uid("seg-series", index) and ds.SOPInstanceUID == prov.uid("seg", index)
    assert ds.SeriesNumber == prov.series_number + index
    want = exp.result.description or prov.series_description or f"{prov.algorithm} segmentation"
    assert ds.SeriesDescription == want and ds.ContentDescription == want
    assert ds.FrameOfReferenceUID == series.first.FrameOfReferenceUID
    # References: the whole source series, and each frame its source image (and frame)
    uids = set(source_uids(series))
    (ref,) = ds.ReferencedSeriesSequence
    assert ref.SeriesInstanceUID == series.first.SeriesInstanceUID
    assert {r.ReferencedSOPInstanceUID for r in ref.ReferencedInstanceSequence} == uids
    if "SourceImageSequence" in ds:
        assert {r.ReferencedSOPInstanceUID for r in ds.SourceImageSequence} <= uids
    # Segments: what the plugin described, with the algorithm that found them
    segments = [s for s in ds.SegmentSequence if s.SegmentNumber != 0]  # 0: a label map's background
    assert [s.SegmentNumber for s in segments] == list(range(1, len(exp.result.segments) + 1))
    for item, given in zip(segments, exp.result.segments, strict=True):
        assert item.SegmentLabel == given.label
        assert item.SegmentedPropertyTypeCodeSequence[0].CodeValue == given.type.value
        assert item.SegmentAlgorithmType == "AUTOMATIC" and item.SegmentAlgorithmName == prov.algorithm
        (algo,) = item.SegmentationAlgorithmIdentificationSequence
        assert (algo.AlgorithmName, algo.AlgorithmVersion) == (prov.algorithm, prov.algorithm_version)
        family = algo.AlgorithmFamilyCodeSequence[0]
        assert (family.CodeValue, family.CodingSchemeDesignator) == (prov.family.value, prov.family.scheme_designator)
        if prov.parameters:
            assert "AlgorithmParameters" in algo
        if given.anatomic_region is not None:
            assert item.AnatomicRegionSequence[0].CodeValue == given.anatomic_region.value
        assert len(item.RecommendedDisplayCIELabValue) == 3
    check_geometry(ds, series)


def check_geometry(ds: Dataset, series: SeriesInput) -> None:
    """Each frame lies where its source slice lies, in the source plane, with the source pixel spacing."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    np.testing.assert_allclose(iop, source_iop(series), atol=1e-4)
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(x) for x in measures.PixelSpacing], series.pixel_spacing, rtol=1e-5)
    if "SpacingBetweenSlices" in measures:
        assert series.spacing_is_uniform, f"Spacing Between Slices {measures.SpacingBetweenSlices} for uneven slices"
        assert float(measures.SpacingBetweenSlices) == pytest.approx(series.spacing[0], rel=1e-3)
    where = {}
    for i, d in enumerate(series.datasets if series.frames is None else []):
        where[(str(d.SOPInstanceUID), None)] = i
    for i, f in enumerate(series.frames or []):
        where[(str(series.first.SOPInstanceUID), f + 1)] = i
    for n, item in enumerate(ds.PerFrameFunctionalGroupsSequence, 1):
        (src,) = item.DerivationImageSequence[0].SourceImageSequence
        frame = int(src.ReferencedFrameNumber) if series.frames is not None else None
        i = where[(str(src.ReferencedSOPInstanceUID), frame)]
        pos = [float(x) for x in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(pos, slice_position(series, i), atol=1e-3, err_msg=f"frame {n}")
        np.testing.assert_allclose(pos, series.positions[i], atol=1e-3)


# -- loading: geometry of the sources -------------------------------------------------------------------


@pytest.mark.parametrize("name", SOURCES)
def test_series_sorted_along_the_normal(sources: dict[str, list[Path]], name: str) -> None:
    series = load(sources, name)
    again = load_series(sorted(sources[name]))
    assert source_uids(series) == source_uids(again), "the order must not depend on the order of the files"
    normal = series.normal
    assert normal is not None and series.positions is not None
    dist = series.positions @ normal
    assert np.all(np.diff(dist) > 0), f"not sorted along the normal: {dist}"
    for i in range(len(series)):
        np.testing.assert_allclose(series.positions[i], slice_position(series, i), atol=1e-4)
    a = series.affine
    assert a is not None
    if series.spacing_is_uniform:  # the affine maps slice indices to the slices' positions
        for i in range(len(series)):
            np.testing.assert_allclose((a @ [i, 0, 0, 1])[:3], series.positions[i], atol=1e-3)
    assert series.spacing_is_uniform == (name != "ct-varspacing")
    if name == "ct-tilted":  # sheared stack: y moves with z, the plane stays axial
        np.testing.assert_allclose(np.diff(series.positions[:, 1]), 2.5 * np.tan(np.radians(20)), atol=1e-3)
        np.testing.assert_allclose(normal, [0, 0, 1], atol=1e-9)
        assert series.spacing[0] == pytest.approx(2.5)
    if name.startswith(("ct-", "mr-coronal")) and name != "ct-head":  # synthetic: pixel (0, 0) is the file index
        v = series.voxels()
        names = [int(p.stem) - 1 for p in series.files]
        assert [int(x) for x in v[:, 0, 0]] == names, "voxels must follow the sorted slices"
    if name == "ect-multiframe":
        assert series.frames == [1, 0], "z falls with the frame number and the normal is -z"
        full = pydicom.dcmread(series.files[0]).pixel_array
        np.testing.assert_array_equal(series.voxels(), full[[1, 0]])


def test_duplicate_positions_name_both_files(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    files = [Path(shutil.copy(f, tmp_path)) for f in sources["ct-varspacing"]]
    a, b = files[2], files[9]
    ds = pydicom.dcmread(b)
    ds.ImagePositionPatient = pydicom.dcmread(a).ImagePositionPatient
    ds.save_as(b, enforce_file_format=True)
    with pytest.raises(GeometryError, match="duplicate positions") as e:
        load_series(files)
    assert a.name in str(e.value) and b.name in str(e.value), str(e.value)
    # The job fails with that message, not retried
    out = tmp_path / "out"
    out.mkdir()
    res = run_work(
        WorkSpec(
            files=[str(f) for f in files],
            steps=[StepSpec("threshold-seg", THRESHOLD, {})],
            out_dir=str(out),
            job_key=("1.2.3", 1, "dup", 0),
        )
    )
    assert not res.ok and not res.retryable
    assert "loading the series" in res.error and "duplicate positions" in res.error
    assert a.name in res.error and b.name in res.error, res.error
    assert not list(out.iterdir())


def test_multiframe_duplicate_positions_refused(tmp_path: Path) -> None:
    ds = pydicom.dcmread(SHARED / "transfer-syntaxes" / "misc" / "eCT_Supplemental.dcm")
    per = ds.PerFrameFunctionalGroupsSequence
    per[1].PlanePositionSequence[0].ImagePositionPatient = per[0].PlanePositionSequence[0].ImagePositionPatient
    path = tmp_path / "ect-dup.dcm"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(GeometryError, match="duplicate positions"):
        load_series([path])


def test_mixed_sizes_and_orientations_refused(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    files = [Path(shutil.copy(f, tmp_path)) for f in sources["ct-tilted"]]
    other = make_ct_series(tmp_path / "small", 1, 32, 32)[0]
    odd = tmp_path / "odd-size.dcm"
    shutil.copy(other, odd)
    with pytest.raises(GeometryError, match=r"differ in size \(32x32, 48x64\)"):
        load_series([*files, odd])
    ds = pydicom.dcmread(files[4])
    ds.ImageOrientationPatient = [1, 0, 0, 0, 0.9, 0.43589]
    ds.save_as(files[4], enforce_file_format=True)
    with pytest.raises(GeometryError, match="another orientation") as e:
        load_series(files)
    assert files[4].name in str(e.value)


# -- SEG round trip: every source x kind x transfer syntax ------------------------------------------------


@pytest.mark.parametrize("keep_empty", [False, True], ids=["omit-empty", "keep-empty"])
@pytest.mark.parametrize(("kind", "syntax"), COMBOS, ids=[f"{k}-{s}" for k, s in COMBOS])
@pytest.mark.parametrize("name", SOURCES)
def test_seg_round_trip(
    sources: dict[str, list[Path]], tmp_path: Path, name: str, kind: str, syntax: str, keep_empty: bool
) -> None:
    series = load(sources, name)
    masks = series_masks(name, series)
    exp = plugin_result(kind, masks, seed=zlib.crc32(name.encode()))
    tag = f"{name}-{kind}-{syntax}-{keep_empty}"
    prov = provenance(series, tag, series_number=7000, series_description=f"blobs {kind}")
    ds = build_seg(series, exp.result, prov, transfer_syntax=SYNTAXES[syntax], keep_empty_frames=keep_empty)
    path = write(ds, tmp_path / f"{tag}.dcm", f"SEG {tag}")
    back_ds = hd.seg.segread(path)  # a pydicom Dataset too
    assert back_ds.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
    check_seg(back_ds, series, prov, exp)
    n, k = len(series), masks.shape[3]
    per_plane = 1 if kind == "labelmap" else k
    assert int(back_ds.NumberOfFrames) == (n * per_plane if keep_empty else exp.nonempty_frames)

    back = read_back(back_ds, series, missing_are_empty=not keep_empty)
    assert back.shape == exp.stacked.shape
    if kind == "fractional":
        assert back.dtype.kind == "f"
        # the stored values exactly, and so what the plugin gave to within the quantisation to 1/255
        np.testing.assert_allclose(back, exp.stacked / 255.0, atol=1e-6)
        assert np.abs(back - exp.result.masks).max() <= 0.5 / 255 + 1e-6
    else:
        np.testing.assert_array_equal(back.astype(bool), exp.stacked)
        if kind == "labelmap":
            labels = read_back(back_ds, series, missing_are_empty=not keep_empty, combine_segments=True)
            np.testing.assert_array_equal(labels, exp.result.masks)
    if series.frames is None and not masks[-1].any():
        # the empty last slice has a frame only when empty frames are kept
        framed = {
            str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
            for f in back_ds.PerFrameFunctionalGroupsSequence
        }
        assert (str(series.datasets[-1].SOPInstanceUID) in framed) == keep_empty


def test_offered_syntaxes_are_the_ones_tested() -> None:
    from node.jobs.actions import _SYNTAX

    assert set(_SYNTAX.values()) == set(SYNTAXES.values())


@pytest.mark.parametrize(("kind", "syntax"), sorted(REFUSED))
def test_seg_syntax_highdicom_refuses_fails_clearly(
    sources: dict[str, list[Path]], tmp_path: Path, kind: str, syntax: str
) -> None:
    """A BINARY SEG cannot be RLE (1-bit frames): building fails with a message naming both, and so does the job."""
    assert SYNTAXES[syntax] == RLELossless
    series = load(sources, "ct-tilted")
    exp = plugin_result(kind, series_masks("ct-tilted", series), seed=1)
    with pytest.raises(ValueError, match=r"BINARY segmentation .* cannot be RLE-compressed"):
        build_seg(series, exp.result, provenance(series, "refused"), transfer_syntax=RLELossless)
    out = tmp_path / "out"
    out.mkdir()
    res = run_work(
        WorkSpec(
            files=[str(f) for f in sources["ct-tilted"]],
            steps=[StepSpec("threshold-seg", THRESHOLD, {})],
            out_dir=str(out),
            job_key=("1.2.3", 1, "rle", 0),
            transfer_syntax=str(RLELossless),
        )
    )
    assert not res.ok and not res.retryable
    assert "building output 1 of 1" in res.error and "BINARY" in res.error and "RLE" in res.error, res.error


def test_seg_from_plugin_job_on_tilted_ct(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    """The worker path (load, built-in threshold-seg, build, write) on the tilted-gantry series, JPEG 2000."""
    out = tmp_path / "out"
    out.mkdir()
    files = sources["ct-tilted"]
    spec = WorkSpec(
        files=[str(f) for f in files],
        steps=[StepSpec("threshold-seg", THRESHOLD, {})],
        out_dir=str(out),
        job_key=("1.2.3.4", 2, "tilted", 0),
        transfer_syntax=str(JPEG2000Lossless),
        series_number=9100,
        series_description="bone (AI)",
        station_name="NODE_TEST",
    )
    res = run_work(spec)
    assert res.ok, res.error
    (o,) = res.outputs
    assert o.kind == "SEG"
    path = write(pydicom.dcmread(o.file), tmp_path / "job-seg.dcm", "SEG from threshold-seg job")
    series = load(sources, "ct-tilted")
    expected = series.rescaled() >= 300
    back = read_back(path, series, missing_are_empty=True)
    np.testing.assert_array_equal(back[..., 0].astype(bool), expected)
    ds = pydicom.dcmread(path)
    assert ds.SeriesNumber == 9100 and ds.file_meta.TransferSyntaxUID == JPEG2000Lossless
    (algo,) = ds.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("threshold-seg", "1.0")
    assert algo.AlgorithmFamilyCodeSequence[0].CodeValue == codes.cid7162.HistogramAnalysis.value
    check_geometry(ds, series)


# -- SEG: empty segments and frames, input forms, UIDs ---------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_all_empty_result_keeps_its_frames(sources: dict[str, list[Path]], tmp_path: Path, kind: str) -> None:
    series = load(sources, "mr-coronal")
    empty = np.zeros_like(series_masks("mr-coronal", series))
    exp = plugin_result(kind, empty, seed=0)
    prov = provenance(series, f"all-empty-{kind}")
    ds = build_seg(series, exp.result, prov, keep_empty_frames=False)
    path = write(ds, tmp_path / "empty.dcm", f"SEG all empty {kind}")
    n = len(series)
    assert int(ds.NumberOfFrames) == (n if kind == "labelmap" else n * 3)
    back = read_back(path, series, missing_are_empty=False)
    assert back.shape == empty.shape and not back.any()


@pytest.mark.parametrize(("kind", "syntax"), [("binary", "explicit"), ("fractional", "rle"), ("labelmap", "jpeg2000")])
def test_empty_segment(sources: dict[str, list[Path]], tmp_path: Path, kind: str, syntax: str) -> None:
    """A described segment that is empty everywhere: still described, no frames (omitted), reads back empty."""
    series = load(sources, "ct-oblique")
    masks = series_masks("ct-oblique", series).copy()
    masks[..., 1] = False
    exp = plugin_result(kind, masks, seed=3)
    for keep in (False, True):
        prov = provenance(series, f"empty-segment-{kind}-{keep}")
        ds = build_seg(series, exp.result, prov, transfer_syntax=SYNTAXES[syntax], keep_empty_frames=keep)
        path = write(ds, tmp_path / f"empty-seg-{keep}.dcm", f"SEG empty segment {kind} keep={keep}")
        check_seg(pydicom.dcmread(path), series, prov, exp)
        if kind != "labelmap":
            seg_numbers = {
                int(f.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
                for f in ds.PerFrameFunctionalGroupsSequence
            }
            assert (2 in seg_numbers) == keep
        back = read_back(path, series, missing_are_empty=not keep, rescale_fractional=False)
        np.testing.assert_array_equal(back if kind == "fractional" else back.astype(bool), exp.stacked)
        assert not back[..., 1].any()


def test_fractional_below_quantisation_is_an_empty_result(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    """A probability map that found nothing (every value < 0.5/255) is an empty SEG, as an all-zero one is."""
    series = load(sources, "mr-coronal")
    p = np.full(series_masks("mr-coronal", series).shape, 0.001, np.float32)
    ds = build_seg(series, Segmentation(p, SEGMENTS, "fractional"), provenance(series, "faint"))
    path = write(ds, tmp_path / "faint.dcm", "SEG faint fractional")
    assert int(ds.NumberOfFrames) == len(series) * 3
    assert not read_back(path, series, missing_are_empty=False).any()


def test_seg_input_forms(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    """Label maps for BINARY, stacked non-overlapping masks for LABELMAP, one boolean mask."""
    series = load(sources, "ct-varspacing")
    masks = series_masks("ct-varspacing", series)
    labels = plugin_result("labelmap", masks, 0)
    stacked = labels.stacked
    cases = {
        "binary-from-labels": (Segmentation(labels.result.masks, SEGMENTS, "binary"), stacked),
        "labelmap-from-stacked": (Segmentation(stacked, SEGMENTS, "labelmap"), stacked),
        "binary-one-bool": (Segmentation(masks[..., 0], SEGMENTS[:1], "binary"), masks[..., :1]),
        "labelmap-one-bool": (Segmentation(masks[..., 2], SEGMENTS[:1], "labelmap"), masks[..., 2:]),
        "fractional-float64": (Segmentation(masks.astype(np.float64), SEGMENTS, "fractional"), masks),
    }
    for name, (result, want) in cases.items():
        ds = build_seg(series, result, provenance(series, name))
        path = write(ds, tmp_path / f"{name}.dcm", f"SEG {name}")
        back = read_back(path, series, missing_are_empty=True)
        np.testing.assert_array_equal(back.astype(bool), want, err_msg=name)


def test_seg_refuses_what_it_cannot_encode(sources: dict[str, list[Path]]) -> None:
    """What the masks alone get wrong is refused when the Segmentation is made; the shape, when the SEG is built."""
    series = load(sources, "ct-oblique")
    n, r, c = len(series), int(series.first.Rows), int(series.first.Columns)
    m = series_masks("ct-oblique", series)
    made_wrong = {
        "3 stacked masks but 2 segment descriptions": lambda: Segmentation(m, SEGMENTS[:2]),
        "label values must be 0..2": lambda: Segmentation(np.full((n, r, c), 3, np.uint8), SEGMENTS[:2], "labelmap"),
        "needs float masks": lambda: Segmentation(m, SEGMENTS, "fractional"),
        r"must lie in \[0, 1\]": lambda: Segmentation(m * 1.5, SEGMENTS, "fractional"),
        "stacked masks overlap": lambda: Segmentation(m, SEGMENTS, "labelmap"),
        "must hold integers": lambda: Segmentation(np.zeros((n, r, c), np.float32), SEGMENTS[:1], "labelmap"),
    }
    for message, make in made_wrong.items():
        with pytest.raises(ResultError, match=message):
            make()
    with pytest.raises(OutputError, match="no segment descriptions: give a Segment for each label, or a segment"):
        build_seg(series, Segmentation(m[..., 0], [], "binary"), provenance(series, "refused"))  # and no template
    with pytest.raises(OutputError, match=rf"masks must be \(slices, rows, columns, segments\) = \({n}, {r}, {c}, 3\)"):
        build_seg(series, Segmentation(m[:-1], SEGMENTS), provenance(series, "refused"))
    # slices last, as NIfTI tools keep them: the message says how to turn it
    with pytest.raises(OutputError, match=r"got \(\d+, \d+, \d+\): transpose it with \.transpose\(2, 0, 1\)"):
        build_seg(series, Segmentation(m[..., 0].transpose(1, 2, 0), SEGMENTS[:1]), provenance(series, "refused"))


def test_seg_uids_deterministic_and_series_numbering(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    series = load(sources, "mr-sag")
    exp = plugin_result("binary", series_masks("mr-sag", series), seed=0)
    prov = provenance(series, "determinism", series_number=4200, series_description="AI blobs")
    a = build_seg(series, exp.result, prov)
    b = build_seg(series, exp.result, prov)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.SeriesNumber == 4200 and a.SeriesDescription == "AI blobs"
    second = build_seg(series, exp.result, prov, index=1)
    assert second.SeriesNumber == 4201
    assert second.SeriesInstanceUID != a.SeriesInstanceUID and second.SOPInstanceUID != a.SOPInstanceUID
    other = build_seg(series, exp.result, provenance(series, "another job"))
    assert other.SeriesInstanceUID != a.SeriesInstanceUID and other.SOPInstanceUID != a.SOPInstanceUID
    check_seg(a, series, prov, exp)
    check_seg(second, series, prov, exp, index=1)
    write(a, tmp_path / "a.dcm", "SEG determinism")
    write(second, tmp_path / "second.dcm", "SEG second output")
    # Without a configured description: the result's, else the algorithm's name
    unconfigured = provenance(series, "no description")
    own = build_seg(series, plugin_result("binary", exp.stacked, 0, description="plugin says").result, unconfigured)
    assert own.SeriesDescription == "plugin says" and own.ContentDescription == "plugin says"
    plain = build_seg(series, exp.result, unconfigured)
    assert plain.SeriesDescription == "blob-finder segmentation" and plain.SeriesNumber == 9000


def test_configured_series_description_names_the_series(sources: dict[str, list[Path]]) -> None:
    series = load(sources, "ct-tilted")
    prov = provenance(series, "described", series_number=9100, series_description="bone (AI)")
    seg = build_seg(series, plugin_result("binary", series_masks("ct-tilted", series), 0, "threshold-seg").result, prov)
    sc = build_sc(series, Images(sc_pixels(series, "grey8", [0]), [0], description="overlay"), prov, index=1)
    assert (seg.SeriesNumber, sc[0].SeriesNumber) == (9100, 9101)
    assert (seg.SeriesDescription, sc[0].SeriesDescription) == ("bone (AI)", "bone (AI)")


# -- Secondary Capture -----------------------------------------------------------------------------------


def sc_pixels(series: SeriesInput, flavour: str, picks: list[int]) -> np.ndarray:
    v = series.rescaled()[picks]
    if flavour == "grey16":
        return np.clip(v - v.min(), 0, 65535).astype(np.uint16)
    lo, hi = np.percentile(v, [1, 99])
    grey = np.clip((v - lo) / max(hi - lo, 1) * 255, 0, 255).astype(np.uint8)
    if flavour == "grey8":
        return grey
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    overlay = blobs("sc", len(series), *grey.shape[1:3])[picks, ..., 0]
    rgb[overlay, 0] = 255  # a red overlay, as a plugin would draw it
    rgb[overlay, 1] //= 2
    return rgb


def check_sc_series(
    out: list[Dataset], series: SeriesInput, prov: Provenance, images: Images, *, index: int = 0
) -> None:
    px = np.asarray(images.pixels)
    assert len(out) == len(px)
    assert {d.SeriesInstanceUID for d in out} == {prov.uid("sc-series", index)}
    assert [int(d.InstanceNumber) for d in out] == list(range(1, len(px) + 1))
    assert len({d.SOPInstanceUID for d in out}) == len(out)
    want = images.description or prov.series_description or f"{prov.algorithm} images"
    for d, src in zip(out, images.source_slices or [None] * len(px), strict=True):
        check_common(d, series, prov)
        assert d.SOPClassUID == SecondaryCaptureImageStorage
        assert d.SeriesNumber == prov.series_number + index and d.SeriesDescription == want
        assert list(d.ImageType) == ["DERIVED", "SECONDARY"]
        assert prov.algorithm in d.DerivationDescription
        refs = d.SourceImageSequence
        if src is None:
            if series.frames is None:
                assert [r.ReferencedSOPInstanceUID for r in refs] == source_uids(series)
            else:
                assert [r.ReferencedSOPInstanceUID for r in refs] == [series.first.SOPInstanceUID]
        else:
            (r,) = refs
            if series.frames is None:
                assert r.ReferencedSOPInstanceUID == series.datasets[src].SOPInstanceUID
                assert r.ReferencedSOPClassUID == series.datasets[src].SOPClassUID
                assert "ReferencedFrameNumber" not in r
            else:
                assert r.ReferencedSOPInstanceUID == series.first.SOPInstanceUID
                assert int(r.ReferencedFrameNumber) == series.frames[src] + 1
        if images.patient_orientation is not None:
            assert tuple(d.PatientOrientation) == tuple(images.patient_orientation)
        # Pixel Spacing: the view's own if given, a slice's at its size, else none
        same_shape = px.shape[1:3] == (int(series.first.Rows), int(series.first.Columns))
        spacing = images.pixel_spacing or (series.pixel_spacing if src is not None and same_shape else None)
        if spacing is not None:
            np.testing.assert_allclose([float(x) for x in d.PixelSpacing], spacing, rtol=1e-5)
        else:
            assert "PixelSpacing" not in d


SC_CASES = [pytest.param(f, s, id=f"{f}-{s}") for f in ("grey8", "grey16", "rgb") for s in SYNTAXES]


@pytest.mark.parametrize(("flavour", "syntax"), SC_CASES)
def test_sc_series(sources: dict[str, list[Path]], tmp_path: Path, flavour: str, syntax: str) -> None:
    """Grey (8/16 bit) and RGB, several images -> one series 1..n, each referencing its slice; lossless."""
    series = load(sources, "ct-head")
    picks = [0, 9, 14, 27]
    images = Images(sc_pixels(series, flavour, picks), source_slices=picks)
    prov = provenance(series, f"sc-{flavour}-{syntax}", series_number=8000, series_description=f"SC {flavour}")
    out = build_sc(series, images, prov, transfer_syntax=SYNTAXES[syntax])
    check_sc_series(out, series, prov, images)
    for n, d in enumerate(out):
        path = write(d, tmp_path / f"sc-{n}.dcm", f"SC {flavour} {syntax}")
        back = pydicom.dcmread(path)
        assert back.file_meta.TransferSyntaxUID == SYNTAXES[syntax]
        assert back.PhotometricInterpretation in (("RGB", "YBR_RCT") if flavour == "rgb" else ("MONOCHROME2",))
        assert tuple(back.PatientOrientation) == ("L", "P")
        np.testing.assert_array_equal(back.pixel_array, images.pixels[n])


SC_SOURCES = [n for n in SOURCES]


@pytest.mark.parametrize("name", SC_SOURCES)
def test_sc_references_per_source(sources: dict[str, list[Path]], tmp_path: Path, name: str) -> None:
    """Slices and a derived view of every source: the right Source Image (and frame), orientation, spacing."""
    series = load(sources, name)
    n = len(series)
    picks = sorted({0, n // 2, n - 1})
    grey = sc_pixels(series, "grey8", picks)
    mip = grey.max(axis=0, keepdims=True)
    images = Images(np.concatenate([grey, mip]), source_slices=[*picks, None], description="slices and MIP")
    prov = provenance(series, f"sc-refs-{name}", series_number=8100)
    out = build_sc(series, images, prov)
    check_sc_series(out, series, prov, images)
    # Patient Orientation of each slice image: its row and column directions, as letters
    orientation = {
        "ct-head": ("L", "P"),
        "mr-sag": ("P", "F"),
        "ect-multiframe": ("R", "P"),
        "ct-tilted": ("L", "P"),
        "ct-oblique": ("L", "PH"),
        "ct-varspacing": ("L", "P"),
        "mr-coronal": ("L", "F"),
    }[name]
    assert all(tuple(d.PatientOrientation) == orientation for d in out)
    for i, d in enumerate(out):
        write(d, tmp_path / f"sc-{i}.dcm", f"SC {name}")
    # A reformat of another shape is a second output: own series, next number, its own orientation, no spacing
    v = sc_pixels(series, "grey8", list(range(n)))
    coronal = np.ascontiguousarray(v.max(axis=1)[None])
    view = Images(coronal, source_slices=None, patient_orientation=("L", "F"), pixel_spacing=(2.5, 0.5))
    out2 = build_sc(series, view, prov, index=1)
    check_sc_series(out2, series, prov, view, index=1)
    assert out2[0].SeriesInstanceUID != out[0].SeriesInstanceUID and out2[0].SeriesNumber == 8101
    write(out2[0], tmp_path / "sc-view.dcm", f"SC view {name}")


def test_sc_uids_deterministic_and_refusals(sources: dict[str, list[Path]]) -> None:
    series = load(sources, "mr-coronal")
    px = sc_pixels(series, "grey8", [0, 1, 2])
    prov = provenance(series, "sc-determinism")
    a = build_sc(series, Images(px, [0, 1, 2]), prov)
    b = build_sc(series, Images(px, [0, 1, 2]), prov)
    assert [d.SOPInstanceUID for d in a] == [d.SOPInstanceUID for d in b]
    assert a[0].SeriesInstanceUID == b[0].SeriesInstanceUID
    assert a[0].SeriesDescription == "blob-finder images" and a[0].SeriesNumber == 9000
    one = build_sc(series, Images(px[0]), prov)  # a single 2-D image
    assert len(one) == 1 and one[0].InstanceNumber == 1
    made_wrong = {
        "grey Images.pixels must be uint8 or uint16": lambda: Images(px.astype(np.float32)),
        "RGB Images.pixels must be uint8": lambda: Images(np.zeros((1, 8, 8, 3), np.uint16)),
        r"must be \(n, rows, columns\) grey .* drop the alpha channel": lambda: Images(
            np.zeros((1, 8, 8, 4), np.uint8)
        ),
        "3 images but 2 source_slices": lambda: Images(px, [0, 1]),
    }
    for message, make in made_wrong.items():
        with pytest.raises(ResultError, match=message):
            make()
    with pytest.raises(OutputError, match=r"source_slices holds 18, outside the series: slice indices are 0\.\.17"):
        build_sc(series, Images(px, [0, 1, 18]), prov)


# -- derived image series (issue 7: volumes on the source grid) -----------------------------------------


IMAGE_SOURCES = ("ct-head", "mr-sag", "ct-tilted", "ct-oblique", "mr-coronal")


def _affine_of(series: SeriesInput) -> np.ndarray:
    a = series.affine
    assert a is not None
    return np.asarray(a)


@pytest.mark.parametrize("name", IMAGE_SOURCES)
@pytest.mark.parametrize("kind", ["int", "float"])
def test_derived_image_series_stacks_like_its_source(
    sources: dict[str, list[Path]], tmp_path: Path, name: str, kind: str
) -> None:
    """The series reloads as a volume with the source's geometry and the plugin's values (exact, or within the
    precision the node reports), and dciodvfy finds no error in any instance."""
    series = load(sources, name)
    src = series.rescaled().astype(np.float64)
    rng = np.random.default_rng(3)
    if kind == "int":
        values = (np.round(src) - 7).astype(np.int32)
    else:
        values = src * 0.731 + rng.normal(0, 0.01, src.shape)  # a float map on the same grid
    prov = provenance(series, f"image-{name}-{kind}", series_description="smoothed (AI)")
    datasets, error = build_image_series(series, Volume(values, name="test"), prov, index=2)
    assert len(datasets) == len(series.datasets)
    paths = [write(ds, tmp_path / f"{i:03d}.dcm", f"image {name} {kind}") for i, ds in enumerate(datasets)]
    back = load_series(paths)
    np.testing.assert_allclose(_affine_of(back), _affine_of(series), atol=1e-3)
    # back is sorted along the normal like series: slice i is slice i (values in float64, as stored)
    full = [pydicom.dcmread(f) for f in back.files]
    got = np.stack(
        [d.pixel_array * float(d.get("RescaleSlope", 1)) + float(d.get("RescaleIntercept", 0)) for d in full]
    )
    if kind == "int":
        assert error == 0
        np.testing.assert_array_equal(got, values)
    else:
        assert 0 < error < (values.max() - values.min()) / 60000
        assert np.max(np.abs(got - values)) <= error + 1e-9
    for ds, src_ds in zip(back.datasets, series.datasets, strict=True):
        assert ds.SOPClassUID == src_ds.SOPClassUID and list(ds.ImageType[:2]) == ["DERIVED", "SECONDARY"]
        assert ds.StudyInstanceUID == src_ds.StudyInstanceUID and ds.SeriesInstanceUID != src_ds.SeriesInstanceUID
        assert ds.FrameOfReferenceUID == src_ds.FrameOfReferenceUID
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == src_ds.SOPInstanceUID
        assert ds.SeriesDescription == "smoothed (AI)" and ds.SOPInstanceUID.startswith(DERIVED_UID_ROOT)
    # deterministic: the same job makes the same UIDs
    again, _ = build_image_series(series, Volume(values, name="test"), prov, index=2)
    assert [d.SOPInstanceUID for d in again] == [d.SOPInstanceUID for d in datasets]


@pytest.mark.parametrize("kind", ["int", "float"])
def test_enhanced_ct_source_gives_an_enhanced_ct_frame_for_frame(
    sources: dict[str, list[Path]], tmp_path: Path, kind: str
) -> None:
    series = load(sources, "ect-multiframe")
    src = series.rescaled().astype(np.float64)
    values = (np.round(src) + 5).astype(np.int32) if kind == "int" else src * 0.37 + 0.125
    datasets, error = build_image_series(series, Volume(values, name="enhanced"), provenance(series, f"ect-{kind}"))
    (ds,) = datasets
    path = write(ds, tmp_path / "ect.dcm", f"derived enhanced CT {kind}")
    back = load_series([path])
    assert back.first.SOPClassUID == series.first.SOPClassUID and int(back.first.NumberOfFrames) == len(values)
    np.testing.assert_allclose(_affine_of(back), _affine_of(series), atol=1e-3)
    got = back.rescaled().astype(np.float64)
    if kind == "int":
        assert error == 0
        np.testing.assert_array_equal(got, values)
    else:
        assert np.max(np.abs(got - values)) <= error + np.abs(values).max() * 1e-6  # (float32 in rescaled())
    full = pydicom.dcmread(path)
    frame = full.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0].SourceImageSequence[0]
    assert frame.ReferencedSOPInstanceUID == series.first.SOPInstanceUID and frame.ReferencedFrameNumber == 1
    assert full.ImageType[0] == "DERIVED"


def test_float_range_round_trips_within_the_reported_precision(sources: dict[str, list[Path]]) -> None:
    series = load(sources, "ct-tilted")
    shape = series.voxels().shape
    values = np.random.default_rng(5).uniform(-0.5, 1e4, shape)
    values.flat[0], values.flat[1] = -0.5, 1e4
    datasets, error = build_image_series(series, Volume(values), provenance(series, "range"))
    assert error <= (1e4 + 0.5) / 65534 / 2 * 1.001
    stored = np.stack(
        [d.pixel_array.astype(np.float64) * float(d.RescaleSlope) + float(d.RescaleIntercept) for d in datasets]
    )
    assert np.max(np.abs(stored - values)) <= error + 1e-9
    with pytest.raises(OutputError, match=r"cannot be kept within 0.01 in 16 bits"):
        build_image_series(series, Volume(values, precision=0.01), provenance(series, "range"))


def test_volume_results_that_cannot_be_written_fail_clearly(sources: dict[str, list[Path]]) -> None:
    series = load(sources, "ct-tilted")
    prov = provenance(series, "bad-volume")
    shape = series.voxels().shape
    with pytest.raises(OutputError, match=rf"values must be \(slices, rows, columns\) = {re.escape(str(shape))} like"):
        build_image_series(series, Volume(np.zeros((2, 3, 4))), prov)
    bad = np.zeros(shape)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ResultError, match="NaN or infinite"):
        Volume(bad)
    multi = load(sources, "ect-multiframe")
    with pytest.raises(OutputError, match="single-frame CT and MR sources.*multi-frame"):
        build_image_series(multi, Volume(np.zeros(multi.voxels().shape), affine=_affine_of(multi)), prov)


def test_smooth_series_plugin_job_returns_the_median_filtered_ct(
    sources: dict[str, list[Path]], tmp_path: Path
) -> None:
    from scipy import ndimage

    out = tmp_path / "out"
    out.mkdir()
    files = sources["ct-head"]
    res = run_work(
        WorkSpec(
            files=[str(f) for f in files],
            steps=[StepSpec("smooth-series", "node.plugins.builtin.smooth:smooth_series", {"size": 5})],
            out_dir=str(out),
            job_key=("1.2.3", 1, "smooth", 0),
        )
    )
    assert res.ok, res.error
    assert {o.kind for o in res.outputs} == {"image"} and len(res.outputs) == len(files)
    assert res.notes == [f"{pydicom.dcmread(files[0]).SeriesDescription} median 5 stored exactly"]
    series = load(sources, "ct-head")
    expected = np.stack([ndimage.median_filter(s, size=5, mode="nearest") for s in series.rescaled()])
    back = load_series([Path(o.file) for o in res.outputs])
    np.testing.assert_array_equal(back.rescaled(), expected)
    for i, o in enumerate(res.outputs[:3]):
        verify(Path(o.file), f"smooth-series {i}")
    PRODUCED.extend(Path(o.file) for o in res.outputs)


@pytest.mark.parametrize("name", ["ct-head", "mr-sag", "ct-tilted"])
def test_parametric_map_keeps_float_values_units_and_geometry(
    sources: dict[str, list[Path]], tmp_path: Path, name: str
) -> None:
    from pydicom.sr.coding import Code

    series = load(sources, name)
    values = np.random.default_rng(11).uniform(-0.5, 1e4, series.voxels().shape).astype(np.float32)
    units = Code("mm2/s", "UCUM", "square millimeter per second")
    ds = build_parametric_map(
        series,
        Volume(values, name="ADC", kind="parametric-map", units=units),
        provenance(series, f"map-{name}"),
        index=1,
    )
    path = write(ds, tmp_path / "map.dcm", f"parametric map {name}")
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == "1.2.840.10008.5.1.4.1.1.30"  # Parametric Map Storage
    rwvm = back.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0]
    assert rwvm.MeasurementUnitsCodeSequence[0].CodeValue == "mm2/s"
    # each frame lies on a source slice (within 1e-3 mm) and holds that slice's values exactly (float32)
    pixels = back.pixel_array.reshape((-1, *values.shape[1:]))
    assert len(pixels) == len(values)
    seen = set()
    for k, f in enumerate(back.PerFrameFunctionalGroupsSequence):
        pos = np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient])
        i = int(np.argmin(np.linalg.norm(series.positions - pos, axis=1)))
        np.testing.assert_allclose(pos, series.positions[i], atol=1e-3)
        np.testing.assert_array_equal(pixels[k], values[i])
        seen.add(i)
    assert seen == set(range(len(values)))
    assert back.FrameOfReferenceUID == series.first.FrameOfReferenceUID
    assert back.StudyInstanceUID == series.first.StudyInstanceUID


def test_distance_map_chained_after_a_segmentation(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    """threshold-seg then distance-map in one job: a float Parametric Map in mm, negative inside the bone."""
    out = tmp_path / "out"
    out.mkdir()
    files = sources["ct-head"]
    steps = [
        StepSpec("threshold-seg", THRESHOLD, {}),
        StepSpec("distance-map", "node.plugins.builtin.distance:distance_map", {}),
    ]
    res = run_work(
        WorkSpec(files=[str(f) for f in files], steps=steps, out_dir=str(out), job_key=("1.2.3", 1, "dist", 0))
    )
    assert res.ok, res.error
    assert [o.kind for o in res.outputs] == ["SEG", "parametric map"]
    pm = pydicom.dcmread(res.outputs[1].file)
    verify(Path(res.outputs[1].file), "distance-map")
    PRODUCED.append(Path(res.outputs[1].file))
    series = load(sources, "ct-head")
    bone = series.rescaled() >= 300
    order = [
        int(
            np.argmin(
                np.linalg.norm(
                    series.positions - np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient]),
                    axis=1,
                )
            )
        )
        for f in pm.PerFrameFunctionalGroupsSequence
    ]
    d = np.empty(bone.shape, np.float32)
    d[order] = pm.pixel_array.reshape(bone.shape)
    assert (d[bone] <= 0).all() and (d[~bone] > 0).all()
    # one voxel outside the bone's edge, in-plane: about one pixel spacing away
    assert 0 < d[~bone].min() <= max(series.pixel_spacing) * 1.01
    unit = pm.SharedFunctionalGroupsSequence[0].RealWorldValueMappingSequence[0].MeasurementUnitsCodeSequence[0]
    assert unit.CodeValue == "mm"
    # without a segmentation before it, the job fails and says what to do
    res = run_work(
        WorkSpec(files=[str(f) for f in files], steps=steps[1:], out_dir=str(out), job_key=("1.2.3", 1, "dist2", 0))
    )
    assert not res.ok and "chain it after a segmentation plugin" in res.error


@pytest.mark.parametrize("name", ["ct-head", "mr-sag"])
def test_volume_on_its_own_grid(sources: dict[str, list[Path]], tmp_path: Path, name: str) -> None:
    """A resampled result (every other slice, half the in-plane resolution) with its affine: the derived series
    and the parametric map lie where the affine says, with the plugin's values."""
    series = load(sources, name)
    a = _affine_of(series).copy()
    a[:3, 0] *= 2  # every other slice
    a[:3, 1] *= 2  # every other row
    a[:3, 2] *= 2  # every other column
    values = np.round(series.rescaled()[::2, ::2, ::2]).astype(np.int16)
    datasets, error = build_image_series(series, Volume(values, affine=a), provenance(series, f"grid-{name}"))
    assert error == 0 and len(datasets) == len(values)
    paths = [write(ds, tmp_path / f"{i:03d}.dcm", f"image own grid {name}") for i, ds in enumerate(datasets)]
    back = load_series(paths)
    np.testing.assert_allclose(_affine_of(back), a, atol=1e-3)
    got = np.stack([pydicom.dcmread(f).pixel_array for f in back.files])
    np.testing.assert_array_equal(got, values)
    for ds, pos in zip(back.datasets, back.positions, strict=True):  # each names the source slice it lies on
        ref = ds.SourceImageSequence[0].ReferencedSOPInstanceUID
        src = next(d for d in series.datasets if d.SOPInstanceUID == ref)
        np.testing.assert_allclose([float(x) for x in src.ImagePositionPatient], pos, atol=1e-3)
    pm = build_parametric_map(
        series,
        Volume(values.astype(np.float32) / 7, kind="parametric-map", affine=a),
        provenance(series, f"grid-map-{name}"),
    )
    pm_path = write(pm, tmp_path / "map.dcm", f"parametric map own grid {name}")
    pm = pydicom.dcmread(pm_path)
    frames = [
        np.array([float(x) for x in f.PlanePositionSequence[0].ImagePositionPatient])
        for f in pm.PerFrameFunctionalGroupsSequence
    ]
    expected = a[:3, 3] + np.arange(len(values))[:, None] * a[:3, 0]
    assert sorted(map(tuple, np.round(frames, 3))) == sorted(map(tuple, np.round(expected, 3)))
    spacing = pm.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].PixelSpacing
    np.testing.assert_allclose([float(x) for x in spacing], [2 * x for x in series.pixel_spacing], atol=1e-6)
    with pytest.raises(ResultError, match="Volume.affine has row and column axes that are not perpendicular"):
        skew = a.copy()
        skew[:3, 1] = skew[:3, 2]
        Volume(values, affine=skew)


# -- segment templates (dcmqi metainfo.json) --------------------------------------------------------------


METAINFO = {
    "ContentCreatorName": "Reader1",
    "SeriesDescription": "Brain structures",
    "segmentAttributes": [
        [
            {
                "labelID": 1,
                "SegmentLabel": "Left ventricle",
                "SegmentDescription": "lateral ventricle, left",
                "SegmentAlgorithmType": "AUTOMATIC",
                "SegmentAlgorithmName": "vent-net",
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "123037004",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Anatomical Structure",
                },
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "66720007",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Lateral Ventricle",
                },
                "SegmentedPropertyTypeModifierCodeSequence": {
                    "CodeValue": "7771000",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Left",
                },
                "AnatomicRegionSequence": {
                    "CodeValue": "12738006",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Brain",
                },
                "AnatomicRegionModifierSequence": {
                    "CodeValue": "7771000",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Left",
                },
                "recommendedDisplayRGBValue": [88, 106, 215],
            },
            {
                "labelID": 3,
                "SegmentLabel": "Skull",
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "123037004",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Anatomical Structure",
                },
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "89546000",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Skull",
                },
                "recommendedDisplayRGBValue": [241, 214, 145],
            },
            {
                "labelID": 7,
                "SegmentLabel": "Lesion",
                "SegmentAlgorithmType": "SEMIAUTOMATIC",
                "SegmentedPropertyCategoryCodeSequence": {
                    "CodeValue": "49755003",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Morphologically Altered Structure",
                },
                "SegmentedPropertyTypeCodeSequence": {
                    "CodeValue": "52988006",
                    "CodingSchemeDesignator": "SCT",
                    "CodeMeaning": "Lesion",
                },
                "recommendedDisplayRGBValue": [255, 0, 0],
            },
        ]
    ],
}


def _labels(series: SeriesInput, values: tuple[int, ...]) -> np.ndarray:
    m = np.zeros(series.voxels().shape, np.uint8)
    for k, v in enumerate(values):
        m[:, 4 + 6 * k : 8 + 6 * k, 4:12] = v
    return m


def test_segment_template_describes_the_seg_and_exports_back(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    import json

    from node.derive.template import apply_template, export_template, load_template

    path = tmp_path / "metainfo.json"
    path.write_text(json.dumps(METAINFO))
    template = load_template(path)
    series = load(sources, "ct-tilted")
    plugin_result = Segmentation(_labels(series, (1, 3, 7)), [])  # a label map, without descriptions
    described = apply_template(plugin_result, template)
    ds = build_seg(series, described, provenance(series, "template"))
    seg_path = write(ds, tmp_path / "seg.dcm", "SEG from a dcmqi template")
    back = pydicom.dcmread(seg_path)
    segs = back.SegmentSequence
    assert [str(x.SegmentLabel) for x in segs] == ["Left ventricle", "Skull", "Lesion"]
    assert segs[0].SegmentDescription == "lateral ventricle, left"
    assert (
        segs[0].SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence[0].CodeValue == "7771000"
    )
    assert segs[0].AnatomicRegionSequence[0].CodeValue == "12738006"
    assert segs[2].SegmentAlgorithmType == "SEMIAUTOMATIC"
    # the colours, as CIELab in the SEG, come back to the template's RGB (within rounding)
    exported = export_template(back)
    got = exported["segmentAttributes"][0]
    want = METAINFO["segmentAttributes"][0]
    for g, w in zip(got, want, strict=True):
        assert (
            max(
                abs(a - b)
                for a, b in zip(g["recommendedDisplayRGBValue"], w["recommendedDisplayRGBValue"], strict=True)
            )
            <= 1
        )
        for key in (
            "SegmentLabel",
            "SegmentedPropertyCategoryCodeSequence",
            "SegmentedPropertyTypeCodeSequence",
            "SegmentedPropertyTypeModifierCodeSequence",
            "AnatomicRegionSequence",
            "AnatomicRegionModifierSequence",
        ):
            assert g.get(key) == w.get(key), key
    assert [g["labelID"] for g in got] == [1, 2, 3]  # SEG segment numbers count from 1 by 1
    # the CLI writes the same JSON, and it loads as a template again
    r = subprocess.run(
        [sys.executable, "-m", "node", "seg-template", str(seg_path), "-o", str(tmp_path / "out.json")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "out.json").read_text()) == exported
    assert [e.SegmentLabel for e in load_template(tmp_path / "out.json").entries] == [
        "Left ventricle",
        "Skull",
        "Lesion",
    ]


def test_segment_template_labels_missing_from_it_fail_or_are_skipped(
    sources: dict[str, list[Path]], tmp_path: Path
) -> None:
    import json

    from node.derive.template import TemplateError, apply_template, load_template

    path = tmp_path / "metainfo.json"
    path.write_text(json.dumps(METAINFO))
    template = load_template(path)
    series = load(sources, "ct-tilted")
    result = Segmentation(_labels(series, (1, 5)), [], kind="labelmap")
    with pytest.raises(TemplateError, match=r"label value\(s\) \[5\] .* have no entry .* labelIDs: \[1, 3, 7\]"):
        apply_template(result, template, "error", str(path))
    skipped = apply_template(result, template, "skip")
    assert [s.label for s in skipped.segments] == ["Left ventricle"] and set(np.unique(skipped.masks)) == {0, 1}


def test_plugin_job_with_a_segment_template(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    """The worker applies the rule's template: threshold-seg's bone, described as the template says."""
    import json

    meta = {"segmentAttributes": [[dict(METAINFO["segmentAttributes"][0][1], labelID=1, SegmentLabel="Cranium")]]}
    path = tmp_path / "bone.json"
    path.write_text(json.dumps(meta))
    out = tmp_path / "out"
    out.mkdir()
    res = run_work(
        WorkSpec(
            files=[str(f) for f in sources["ct-tilted"]],
            steps=[StepSpec("threshold-seg", THRESHOLD, {})],
            out_dir=str(out),
            job_key=("1.2.3", 1, "tpl", 0),
            segment_template=str(path),
        )
    )
    assert res.ok, res.error
    seg = pydicom.dcmread(res.outputs[0].file, stop_before_pixels=True)
    assert [str(x.SegmentLabel) for x in seg.SegmentSequence] == ["Cranium"]
    assert seg.SegmentSequence[0].SegmentedPropertyTypeCodeSequence[0].CodeValue == "89546000"


def test_broken_segment_template_names_the_segment_and_field(tmp_path: Path) -> None:
    import copy
    import json

    from node.derive.template import TemplateError, load_template

    bad = copy.deepcopy(METAINFO)
    del bad["segmentAttributes"][0][1]["SegmentedPropertyTypeCodeSequence"]["CodeValue"]
    bad["segmentAttributes"][0][2]["recommendedDisplayRGBValue"] = [255, 0, 300]
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(TemplateError) as e:
        load_template(path)
    msg = str(e.value)
    assert 'segmentAttributes[0][1] ("Skull").SegmentedPropertyTypeCodeSequence.CodeValue: Field required' in msg, msg
    assert 'segmentAttributes[0][2] ("Lesion")' in msg and "each value 0-255" in msg, msg
    # in a rule, the config does not load, and says so
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"""
[[rules]]
name = "brain"
actions = [{{ type = "plugin", plugin = "threshold-seg", segment_template = "{path}" }}]
""")
    r = subprocess.run(
        [sys.executable, "-m", "node", "rules", "check", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    text = " ".join(r.stderr.split())
    assert 'rules[0] ("brain").actions[0]' in text and '("Skull").SegmentedPropertyTypeCodeSequence.CodeValue' in text


# -- Orthanc: every object the tests produced is accepted over C-STORE ----------------------------------


def _some_outputs(sources: dict[str, list[Path]], tmp_path: Path) -> None:
    """When the Orthanc test runs alone: one object of each kind and syntax."""
    series = load(sources, "ct-tilted")
    masks = series_masks("ct-tilted", series)
    for kind, syntax in COMBOS:
        exp = plugin_result(kind, masks, 0)
        ds = build_seg(
            series, exp.result, provenance(series, f"alone-{kind}-{syntax}"), transfer_syntax=SYNTAXES[syntax]
        )
        write(ds, tmp_path / f"alone-{kind}-{syntax}.dcm", f"SEG {kind} {syntax}")
    for syntax in SYNTAXES:
        for i, d in enumerate(
            build_sc(
                series,
                Images(sc_pixels(series, "grey8", [0, 5]), [0, 5]),
                provenance(series, f"alone-sc-{syntax}"),
                transfer_syntax=SYNTAXES[syntax],
            )
        ):
            write(d, tmp_path / f"alone-sc-{syntax}-{i}.dcm", f"SC {syntax}")


def test_orthanc_accepts_every_object(module_orthanc: Orthanc, sources: dict[str, list[Path]], tmp_path: Path) -> None:
    if len(PRODUCED) < 10:
        _some_outputs(sources, tmp_path)
    files = list(PRODUCED)
    metas = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    wanted = {str(m.SOPInstanceUID): (str(m.SOPClassUID), str(m.file_meta.TransferSyntaxUID)) for m in metas.values()}
    for r in storescu_exact(module_orthanc.dicom_port, files, tmp_path, ae=module_orthanc.aet):
        assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr[-4000:] + module_orthanc.log()[-3000:]
    stored = module_orthanc.get("/instances?expand")
    held = {i["MainDicomTags"]["SOPInstanceUID"]: i["ID"] for i in stored}
    missing = sorted(set(wanted) - set(held))
    assert not missing, f"Orthanc lacks {len(missing)} of {len(wanted)} instances, e.g. {missing[:3]}"
    assert set(held) == set(wanted)
    for uid, (sop_class, ts) in wanted.items():
        oid = held[uid]
        assert module_orthanc.get(f"/instances/{oid}/metadata/SopClassUid").decode() == sop_class
        assert module_orthanc.get(f"/instances/{oid}/metadata/TransferSyntax").decode() == ts
    one = next(iter(wanted))
    assert module_orthanc.has_instance(one) and module_orthanc.tags(one)["SOPInstanceUID"] == one
    print(
        f"Orthanc holds all {len(wanted)} objects ({len(files)} files; "
        f"{sum(f.stat().st_size for f in files) / 2**20:.1f} MiB)"
    )
    # Only the senders it knows may store: another AE title is refused.
    (refused,) = storescu_exact(
        module_orthanc.dicom_port, files[:1], tmp_path, ae=module_orthanc.aet, aet="INTRUDER", timeout=60
    )
    assert refused.returncode != 0
    import tomllib

    (dest,) = tomllib.loads(module_orthanc.destination("pacs"))["destinations"]
    assert dest == {
        "name": "pacs",
        "ae_title": module_orthanc.aet,
        "host": "127.0.0.1",
        "port": module_orthanc.dicom_port,
    }
