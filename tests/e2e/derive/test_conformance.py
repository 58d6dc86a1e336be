"""The conformance harness: every result kind and every built-in plugin, on every real series and its damaged variants.

Sources: the real CT head (axial, 28 slices), the real tilted-gantry CT (58 slices, 16.5 degrees) and the
real sagittal MR (35 slices), each as received and as hospitals also send it (tests/helpers/variants.py):
anonymised (Type 2 attributes gone), orientations jittered by 1e-5, no Slice Thickness, slices dropped
(uneven spacing), a sheared "tilted" copy, a single slice. For each, one plugin job (the node's own
worker, in this process) returns every result kind the node writes: BINARY, LABELMAP (and its BINARY copy
for destinations that refuse Label Map SEG) and FRACTIONAL SEG, grey and RGB Secondary Captures, a derived
image series, a Parametric Map and a measurement report (SR, TID 1500, on the label map SEG, so its BINARY
copy gets an SR of its own), with a Key Object Selection listing them; a second job chains every built-in
plugin (segment-stats measuring threshold-seg's SEG among them). Each output must:

- come out of a job that succeeded (nothing here should fail);
- have 0 dciodvfy errors (tests/helpers/dciodvfy.py);
- read back (highdicom for SEG and SR, pydicom for the rest) equal to what the plugin returned;
- lie where its sources lie (per frame or per instance positions, orientation, spacing);
- be accepted by a real Orthanc (the last test sends them all and asks Orthanc for each).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import storescu_exact
from helpers import variants as V
from helpers.dciodvfy import LABEL_MAP_SEGMENTATION_STORAGE, verify
from helpers.orthanc import Orthanc
from pydicom.dataset import Dataset

from node.plugins.api import (
    Images,
    Measurement,
    MeasurementGroup,
    Measurements,
    Segment,
    Segmentation,
    SeriesInput,
    Volume,
    codes,
    plugin,
)
from node.plugins.series import load_series
from node.plugins.worker import Output, StepSpec, WorkResult, WorkSpec
from node.plugins.worker import run as run_work

pytestmark = [pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")]

CASES = [(s, v) for s in V.SOURCES for v in V.VARIANTS]
SEGMENTS = [
    Segment("Dense", codes.SCT.Tissue, codes.SCT.Bone),
    Segment("Faint", codes.SCT.Tissue, codes.SCT.SoftTissue),
    Segment("Core", codes.SCT.Organ, codes.SCT.Brain, anatomic_region=codes.SCT.Head),
]
#: Every object the harness made, for the Orthanc test at the end.
MADE: list[Path] = []


# -- the plugin: one result of every kind, computed from the series so the test can compute it again ----------


Result = Segmentation | Images | Volume | Measurements
VOXELS = codes.UCUM.NoUnits


def expected(series: SeriesInput) -> list[Result]:
    v = series.rescaled()
    lo, hi = np.percentile(v, [35, 80])
    dense, faint = v > hi, (v > lo) & (v <= hi)
    n, rows, cols = v.shape
    core = np.zeros_like(dense)
    core[:, rows // 3 : 2 * rows // 3, cols // 3 : 2 * cols // 3] = True
    core &= dense | faint  # overlaps both
    stacked = np.stack([dense, faint, core], axis=-1)
    labels = (dense * 1 + faint * 2).astype(np.uint8)
    frac = np.clip((v - lo) / max(hi - lo, 1e-6), 0, 1).astype(np.float32) * (v > lo)
    picks = sorted({0, n // 2, n - 1})
    grey = np.clip((v[picks] - lo) / max(hi - lo, 1e-6) * 255, 0, 255).astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    rgb[..., 0] = np.where(dense[picks], 255, rgb[..., 0])
    return [
        Segmentation(stacked, SEGMENTS, "binary"),
        Segmentation(labels, SEGMENTS[:2], "labelmap"),
        Segmentation(frac, SEGMENTS[:1], "fractional"),
        Images(grey, source_slices=picks),
        Images(rgb, source_slices=picks),
        Volume(v * 0.5 + 3.25, name="half"),
        Volume(frac * 0.002, kind="parametric-map", name="prob", units=codes.UCUM.NoUnits),
        Measurements(
            [
                MeasurementGroup(
                    tracking_id=seg.label,
                    finding=seg.type,
                    measurements=[Measurement(codes.SCT.Volume, float(np.count_nonzero(labels == k + 1)), VOXELS)],
                    segment=k + 1,
                    segmentation=1,
                )
                for k, seg in enumerate(SEGMENTS[:2])
            ]
            + [
                MeasurementGroup(
                    tracking_id="Middle slice",
                    finding=codes.SCT.Tissue,
                    measurements=[Measurement(codes.SCT.Mean, float(v[n // 2].mean()), VOXELS)],
                    source_slices=[n // 2],
                )
            ],
            description="harness",
        ),
    ]


@plugin(name="every-kind", version="1.0")
def every_kind(series: SeriesInput, params: object) -> list[Result]:
    return expected(series)


BUILTIN_STEPS = [
    StepSpec("threshold-seg", "node.plugins.builtin.threshold:threshold_seg", {}),
    StepSpec("segment-stats", "node.plugins.builtin.segment_stats:segment_stats", {}),
    StepSpec("distance-map", "node.plugins.builtin.distance:distance_map", {}),
    StepSpec("overlay-sc", "node.plugins.builtin.overlay:overlay_sc", {}),
    StepSpec("mip-sc", "node.plugins.builtin.mip:mip_sc", {}),
    StepSpec("smooth-series", "node.plugins.builtin.smooth:smooth_series", {}),
]
BODY_PARTS = StepSpec("body-parts-seg", "node.plugins.builtin.body_parts:body_parts_seg", {})


def run_job(files: list[Path], out: Path, steps: list[StepSpec], tag: str) -> WorkResult:
    out.mkdir(parents=True, exist_ok=True)
    spec = WorkSpec(
        files=[str(f) for f in files],
        steps=steps,
        out_dir=str(out),
        job_key=(tag, 1, "harness", 0),
        labelmap_as_binary=True,
        key_objects={"value": "113000", "scheme": "DCM", "meaning": "Of Interest", "description": "harness"},
    )
    result = run_work(spec)
    assert result.ok, f"{tag}: {result.error}"
    return result


@pytest.fixture(scope="module")
def case_files(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[tuple[str, str], list[Path]]]:
    root = tmp_path_factory.mktemp("variants")
    made: dict[tuple[str, str], list[Path]] = {}

    class Lazy(dict):  # type: ignore[type-arg]
        def __missing__(self, key: tuple[str, str]) -> list[Path]:
            made[key] = V.make_files(root / "-".join(key), *key)
            return made[key]

    yield Lazy()


# -- checks ---------------------------------------------------------------------------------------------------------


def positions_of(series: SeriesInput) -> np.ndarray:
    return np.array([[float(x) for x in d.ImagePositionPatient] for d in series.datasets])


def check_frames_geometry(ds: Dataset, series: SeriesInput) -> list[str]:
    """Each frame at its source slice's position, in the source plane; Pixel Measures complete. Returns the frames' sources."""
    shared = ds.SharedFunctionalGroupsSequence[0]
    iop = [float(x) for x in shared.PlaneOrientationSequence[0].ImageOrientationPatient]
    for d in series.datasets:  # every source slice's own orientation, within the loader's tolerance
        np.testing.assert_allclose(iop, [float(x) for x in d.ImageOrientationPatient], atol=1e-3)
    measures = shared.PixelMeasuresSequence[0]
    np.testing.assert_allclose([float(x) for x in measures.PixelSpacing], series.pixel_spacing, rtol=1e-6)
    assert float(measures.SliceThickness) > 0
    by_uid = {str(d.SOPInstanceUID): i for i, d in enumerate(series.datasets)}
    pos = positions_of(series)
    refs = []
    for item in ds.PerFrameFunctionalGroupsSequence:
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        got = [float(x) for x in item.PlanePositionSequence[0].ImagePositionPatient]
        np.testing.assert_allclose(got, pos[by_uid[uid]], atol=1e-3)
        refs.append(uid)
    return refs


def check_seg(path: Path, series: SeriesInput, want: np.ndarray, kind: str) -> None:
    ds = pydicom.dcmread(path)
    labelmap = kind == "labelmap"
    assert ds.SOPClassUID == (LABEL_MAP_SEGMENTATION_STORAGE if labelmap else "1.2.840.10008.5.1.4.1.1.66.4")
    assert ds.SegmentationType == kind.upper()
    check_frames_geometry(ds, series)
    seg = hd.seg.segread(path)
    uids = [str(d.SOPInstanceUID) for d in series.datasets]
    got = seg.get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True, rescale_fractional=False)
    if kind == "fractional":
        np.testing.assert_array_equal(got[..., 0], np.around(want * 255).astype(np.uint8))
    else:
        np.testing.assert_array_equal(got.astype(bool), want)


def check_images(paths: list[Path], series: SeriesInput, want: Images) -> None:
    assert len(paths) == len(want.pixels)
    for p, img, src in zip(paths, want.pixels, want.source_slices or [], strict=True):
        ds = pydicom.dcmread(p)
        np.testing.assert_array_equal(ds.pixel_array, img)
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == series.datasets[src].SOPInstanceUID


def check_image_series(paths: list[Path], series: SeriesInput, want: Volume) -> None:
    assert len(paths) == len(series.datasets)
    pos = positions_of(series)
    for k, p in enumerate(paths):
        ds = pydicom.dcmread(p)
        np.testing.assert_allclose([float(x) for x in ds.ImagePositionPatient], pos[k], atol=1e-3)
        np.testing.assert_allclose(
            [float(x) for x in ds.ImageOrientationPatient],
            [float(x) for x in series.datasets[k].ImageOrientationPatient],
            atol=1e-6,
        )
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == series.datasets[k].SOPInstanceUID
        values = ds.pixel_array * float(ds.get("RescaleSlope", 1)) + float(ds.get("RescaleIntercept", 0))
        np.testing.assert_allclose(values, want.values[k], atol=1e-6 + float(ds.get("RescaleSlope", 1)) / 2)
        for keyword in ("ScanningSequence", "SequenceVariant") if ds.Modality == "MR" else ():
            assert ds.get(keyword), f"Type 1 {keyword} empty"


def check_parametric_map(path: Path, series: SeriesInput, want: Volume) -> None:
    ds = pydicom.dcmread(path)
    refs = check_frames_geometry(ds, series)
    by_uid = {str(d.SOPInstanceUID): i for i, d in enumerate(series.datasets)}
    frames = ds.pixel_array.reshape(len(refs), int(ds.Rows), int(ds.Columns))
    for f, uid in zip(frames, refs, strict=True):
        np.testing.assert_array_equal(f, want.values[by_uid[uid]].astype(np.float32))


def check_sr(path: Path, seg_path: Path, series: SeriesInput, want: Measurements) -> None:
    """The report reads back as the plugin's figures; each segment group references its segment of that SEG."""
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    seg_uid = str(pydicom.dcmread(seg_path, stop_before_pixels=True).SOPInstanceUID)
    volumetric = report.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in volumetric] == [g.tracking_id for g in want.groups[:2]]
    for k, (got, group) in enumerate(zip(volumetric, want.groups[:2], strict=True)):
        assert got.referenced_segment.referenced_sop_instance_uid == seg_uid
        assert got.referenced_segment.referenced_segment_numbers == [k + 1]
        assert [m.value for m in got.get_measurements()] == [m.value for m in group.measurements]
    (image_level,) = report.get_image_measurement_groups()
    assert {s.referenced_sop_instance_uid for s in image_level.source_images} == {
        str(series.datasets[len(series) // 2].SOPInstanceUID)
    }
    assert [m.value for m in image_level.get_measurements()] == [m.value for m in want.groups[2].measurements]


def check_kos(path: Path, listed: list[Path]) -> None:
    """The selection lists exactly the job's outputs a destination gets."""
    ds = pydicom.dcmread(path)
    got = {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }
    assert got == {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in listed}


def by_result(outputs: list[Output]) -> dict[str, list[Path]]:
    """Output files grouped by the result they came from (the worker names them NNN-...)."""
    groups: dict[str, list[Path]] = {}
    for o in outputs:
        key = Path(o.file).name.split("-")[0] + ("-binary" if o.twin_of else "")
        groups.setdefault(key, []).append(Path(o.file))
    return {k: sorted(v) for k, v in groups.items()}


def verify_all(paths: list[Path], label: str) -> None:
    for p in paths:
        verify(p, label)
        MADE.append(p)


# -- the harness ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "variant"), CASES)
def test_every_result_kind(
    case_files: dict[tuple[str, str], list[Path]], tmp_path: Path, source: str, variant: str
) -> None:
    files = case_files[(source, variant)]
    result = run_job(
        files, tmp_path / "out", [StepSpec("every-kind", f"{__name__}:every_kind", {})], f"{source}-{variant}"
    )
    series = load_series(files)
    want = expected(series)
    out = by_result(result.outputs)
    assert sorted(out) == [
        "000",
        "001",
        "001-binary",
        "002",
        "003",
        "004",
        "005",
        "006",
        "007",
        "007-binary",
        "key",
        "key-binary",
    ], sorted(out)
    for key, paths in out.items():
        verify_all(paths, f"{source}/{variant} output {key}")
    check_seg(out["000"][0], series, want[0].masks, "binary")
    labels = want[1].masks
    stacked = labels[..., None] == np.arange(1, 3, dtype=np.uint8)
    check_seg(out["001"][0], series, stacked, "labelmap")
    check_seg(out["001-binary"][0], series, stacked, "binary")
    check_seg(out["002"][0], series, want[2].masks, "fractional")
    check_images(out["003"], series, want[3])
    check_images(out["004"], series, want[4])
    check_image_series(out["005"], series, want[5])
    check_parametric_map(out["006"][0], series, want[6])
    for sr, seg in ((out["007"][0], out["001"][0]), (out["007-binary"][0], out["001-binary"][0])):
        check_sr(sr, seg, series, want[7])
    for kos, listed in (
        ("key", ("000", "001", "002", "003", "004", "005", "006", "007")),
        ("key-binary", ("000", "001-binary", "002", "003", "004", "005", "006", "007-binary")),
    ):
        check_kos(out[kos][0], [p for k in listed for p in out[k]])


@pytest.mark.parametrize(("source", "variant"), CASES)
def test_every_builtin_plugin(
    case_files: dict[tuple[str, str], list[Path]], tmp_path: Path, source: str, variant: str
) -> None:
    files = case_files[(source, variant)]
    steps = BUILTIN_STEPS + ([BODY_PARTS] if source.startswith("ct") else [])
    result = run_job(files, tmp_path / "out", steps, f"builtin-{source}-{variant}")
    series = load_series(files)
    kinds = sorted(o.kind for o in result.outputs)
    assert kinds.count("SEG") == (2 if source.startswith("ct") else 1), kinds
    assert "parametric map" in kinds and "image" in kinds and "SC" in kinds
    assert kinds.count("SR") == 1, kinds  # segment-stats on threshold-seg's SEG
    for key, paths in by_result(result.outputs).items():
        verify_all(paths, f"{source}/{variant} built-in output {key}")
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        if "PerFrameFunctionalGroupsSequence" in ds:  # SEG and Parametric Map: frames on the sources
            check_frames_geometry(ds, series)
        assert ds.StudyInstanceUID == series.first.StudyInstanceUID


# -- Orthanc accepts every object -------------------------------------------------------------------------------


def test_orthanc_accepts_every_object(
    module_orthanc: Orthanc, case_files: dict[tuple[str, str], list[Path]], tmp_path: Path
) -> None:
    if not MADE:  # run alone: one case
        test_every_result_kind(case_files, tmp_path, "ct-tilted", "anonymised")
    files = list(MADE)
    metas = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in files}
    wanted = {str(m.SOPInstanceUID): (str(m.SOPClassUID), str(m.file_meta.TransferSyntaxUID)) for m in metas.values()}
    for r in storescu_exact(module_orthanc.dicom_port, files, tmp_path, ae=module_orthanc.aet):
        assert r.returncode == 0 and "Store Failed" not in r.stderr, r.stderr[-4000:] + module_orthanc.log()[-3000:]
    held = {i["MainDicomTags"]["SOPInstanceUID"] for i in module_orthanc.get("/instances?expand")}
    missing = sorted(set(wanted) - held)
    assert not missing, f"Orthanc lacks {len(missing)} of {len(wanted)} objects, e.g. {missing[:3]}"
    print(f"Orthanc holds all {len(wanted)} objects the harness made")
