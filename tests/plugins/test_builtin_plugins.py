"""The built-in plugins body-parts-seg, overlay-sc and mip-sc, called directly on loaded series.

- A synthetic CT phantom written as DICOM files (body ellipse of soft tissue in air, two lungs, a
  bone ring, a table, a pocket of bowel gas and an air pocket opening to the outside through a notch)
  whose regions are known voxel by voxel; the real CT head and sagittal MR in shared/data.
- Every result goes through the node's SEG/SC builders, and the written objects through dciodvfy.
- The chain body-parts-seg -> overlay-sc through the worker as a job runs it, with the plugins loaded
  from their entry points.
"""

from __future__ import annotations

import math
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import make_ct_series, series_files
from scipy import ndimage

from node.derive.common import Provenance
from node.derive.sc import build_sc
from node.derive.seg import PALETTE, build_seg
from node.plugins.api import Images, ParamsError, PluginError, Segment, Segmentation, SeriesInput, codes
from node.plugins.builtin.body_parts import body_parts_seg
from node.plugins.builtin.mip import mip_sc
from node.plugins.builtin.overlay import overlay_sc, text_bitmap
from node.plugins.registry import discover
from node.plugins.series import load_series
from node.plugins.worker import StepSpec, WorkSpec
from node.plugins.worker import run as run_work

pytestmark = [
    # The real CT's Patient Name is "HEAD"; highdicom warns on every copy of it.
    pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning"),
]

PROV = Provenance(job_key=("1.2.3", 1, "r", 0), algorithm="x", algorithm_version="1")
DCIODVFY = "/usr/bin/dciodvfy"
#: The IOD names dciodvfy prints when it recognises the object.
IODS = ("Segmentation", "SCImage")

# -- the phantom -----------------------------------------------------------------------------------
#
# 20 axial slices of 128 x 128 pixels, 2 mm pixels, 5 mm apart, head-first supine geometry (rows run
# posterior, slices run towards the head). Index (k, r, c) = (slice, row, column).

N, ROWS, COLS = 20, 128, 128
PIXEL_MM, SLICE_MM = 2.0, 5.0
HU_BODY, HU_LUNG, HU_BONE, HU_TABLE, HU_AIR = 0, -800, 700, 100, -1000
LUNG_SLICES = range(5, 13)
BONE_SLICES = range(4, 14)
GAS_SLICES = range(0, 4)
POCKET_SLICES, NOTCH_SLICE = range(15, 20), 17


def ellipse(cr: float, cc: float, ar: float, ac: float) -> np.ndarray:
    r, c = np.mgrid[:ROWS, :COLS]
    return ((r - cr) / ar) ** 2 + ((c - cc) / ac) ** 2 <= 1.0


def make_phantom(out: Path, *, table_touches: bool = False, noise: float = 20.0) -> tuple[list[Path], dict]:
    """The phantom's files and its true regions (boolean arrays of shape (N, ROWS, COLS))."""
    body2d = ellipse(58, 64, 35, 55)  # rows 23..93, cols 9..119
    ring2d = ellipse(58, 64, 31, 51) & ~ellipse(58, 64, 28, 48)
    lungs2d = ellipse(58, 42, 20, 13) | ellipse(58, 86, 20, 13)
    gas2d = ellipse(58, 64, 22, 22)
    pocket2d = ellipse(45, 64, 15, 15)
    notch2d = np.zeros((ROWS, COLS), dtype=bool)
    notch2d[:45, 62:67] = True
    table2d = np.zeros((ROWS, COLS), dtype=bool)
    table2d[(92 if table_touches else 96) : (96 if table_touches else 100), 8:120] = True
    assert not (ring2d & lungs2d).any() and not ((ring2d | lungs2d | gas2d | pocket2d) & ~body2d).any()

    hu = np.full((N, ROWS, COLS), HU_AIR, dtype=np.float64)
    hu[:, table2d] = HU_TABLE
    hu[:, body2d] = HU_BODY
    truth = {k: np.zeros((N, ROWS, COLS), dtype=bool) for k in ("body", "lungs", "bone", "gas", "pocket", "table")}
    truth["table"][:] = table2d & ~body2d
    truth["body"][:] = body2d
    for k in BONE_SLICES:
        hu[k, ring2d] = HU_BONE
        truth["bone"][k] = ring2d
    for k in LUNG_SLICES:
        hu[k, lungs2d] = HU_LUNG
        truth["lungs"][k] = lungs2d
    for k in GAS_SLICES:  # pure gas, as in the bowel: not lung parenchyma
        hu[k, gas2d] = HU_AIR
        truth["gas"][k] = gas2d
    for k in POCKET_SLICES:  # lung-like air, but open to the outside through a notch in one slice
        hu[k, pocket2d] = HU_LUNG
        truth["pocket"][k] = pocket2d
    hu[NOTCH_SLICE, notch2d & body2d] = HU_AIR
    truth["body"][NOTCH_SLICE] &= ~(notch2d | pocket2d)
    hu += np.random.default_rng(1).normal(0, noise, hu.shape)
    hu = np.rint(hu)

    files = make_ct_series(out, N, ROWS, COLS)
    for i, path in enumerate(files):
        ds = pydicom.dcmread(path)
        ds.PixelSpacing = [PIXEL_MM, PIXEL_MM]
        ds.ImagePositionPatient = [-128.0, -128.0, -50.0 + SLICE_MM * i]
        ds.SliceThickness = SLICE_MM
        ds.BodyPartExamined = "CHEST"
        ds.PixelData = (hu[i] + 1024).astype(np.int16).tobytes()  # RescaleIntercept -1024
        ds.save_as(path, enforce_file_format=True)
    return files, {"hu": hu, **truth}


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], dict]:
    return make_phantom(tmp_path_factory.mktemp("phantom"))


@pytest.fixture
def series(phantom: tuple[list[Path], dict]) -> SeriesInput:
    return load_series(phantom[0])


def run(info, series: SeriesInput, **params):  # type: ignore[no-untyped-def]
    return info.run(series, info.validate_params(params))


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * float((a & b).sum()) / float(a.sum() + b.sum())


def masks_of(result: Segmentation) -> dict[str, np.ndarray]:
    return {s.label: result.masks[..., i] for i, s in enumerate(result.segments)}


def window(hu: np.ndarray, center: float, width: float) -> np.ndarray:
    return np.clip((hu - (center - width / 2)) / width, 0, 1) * 255


def dciodvfy_errors(path: Path) -> list[str]:
    r = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=120)
    lines = [x.strip() for x in (r.stdout + r.stderr).splitlines()]
    assert any(x in IODS for x in lines), f"dciodvfy did not check the object: {lines[:5]}"
    return [x for x in lines if x.startswith("Error")]


def save_and_check(datasets: list, folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for n, ds in enumerate(datasets):
        p = folder / f"{n:03d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        assert dciodvfy_errors(p) == [], p
        paths.append(p)
    return paths


# -- body-parts-seg ----------------------------------------------------------------------------------


def test_body_parts_finds_the_phantom_regions(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    truth = phantom[1]
    # min_lung_ml below the gas (122 ml) and the closed part of the pocket (57 ml): only the median
    # and the outside rule keep them out of the lungs.
    (result,) = run(body_parts_seg, series, min_lung_ml=30)
    assert result.kind == "binary" and result.masks.shape == (N, ROWS, COLS, 3) and result.masks.dtype == bool
    assert [s.label for s in result.segments] == ["Body", "Lungs", "Bone"]
    assert [(s.category, s.type) for s in result.segments] == [
        (codes.SCT.AnatomicalStructure, codes.SCT.EntireBody),
        (codes.SCT.AnatomicalStructure, codes.SCT.Lung),
        (codes.SCT.Tissue, codes.SCT.BoneTissue),
    ]
    m = masks_of(result)
    # the table (not touching) and the outside air are not body; the lungs and the gas are filled in
    assert np.array_equal(m["Body"], truth["body"])
    assert np.array_equal(m["Lungs"], truth["lungs"])
    assert np.array_equal(m["Bone"], truth["bone"])


def test_body_parts_lung_rules_each_matter(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    truth = phantom[1]
    lungs = masks_of(run(body_parts_seg, series, min_lung_ml=30, lung_min_median_hu=None)[0])["Lungs"]
    assert np.array_equal(lungs, truth["lungs"] | truth["gas"])  # without the median check, gas is "lung"
    lung_ml = truth["lungs"].sum() / 2 * PIXEL_MM * PIXEL_MM * SLICE_MM / 1000  # each, 129 ml
    lungs = masks_of(run(body_parts_seg, series, min_lung_ml=lung_ml + 0.5)[0])["Lungs"]
    assert not lungs.any()
    lungs = masks_of(run(body_parts_seg, series, min_lung_ml=lung_ml - 0.5)[0])["Lungs"]
    assert np.array_equal(lungs, truth["lungs"])
    # without the 3-D outside rule the closed slices of the pocket would be in: check it is body but not lung
    closed = truth["pocket"].copy()
    closed[NOTCH_SLICE] = False
    (result,) = run(body_parts_seg, series, min_lung_ml=1)
    assert masks_of(result)["Body"][closed].all() and not masks_of(result)["Lungs"][truth["pocket"]].any()


def test_body_parts_options(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    truth = phantom[1]
    (result,) = run(body_parts_seg, series, include_bone=False, include_lungs=False)
    assert [s.label for s in result.segments] == ["Body"] and result.masks.shape == (N, ROWS, COLS, 1)
    assert np.array_equal(result.masks[..., 0], truth["body"])
    (result,) = run(body_parts_seg, series, bone_threshold=800)
    assert not masks_of(result)["Bone"].any()  # the ring is 700 HU (noise sd 20)
    with pytest.raises(ParamsError, match="bone_threshold"):
        body_parts_seg.validate_params({"bone_threshold": -600})
    with pytest.raises(ParamsError, match="bone: Extra inputs are not permitted"):
        body_parts_seg.validate_params({"bone": 300})


def test_body_parts_table_removal_by_opening(tmp_path: Path) -> None:
    files, truth = make_phantom(tmp_path / "touching", table_touches=True)
    series = load_series(files)
    body = masks_of(run(body_parts_seg, series, include_lungs=False, include_bone=False)[0])["Body"]
    assert body[truth["table"]].all()  # touching the body, the table is part of its component
    body = masks_of(run(body_parts_seg, series, table_opening_mm=5, include_lungs=False)[0])["Body"]
    assert not body[:, 97:, :].any() and not body[:, :, :20][truth["table"][:, :, :20]].any()
    assert dice(body, truth["body"]) > 0.98
    # what stays of the table is the strip right under the contact, where body and table are one thick shape
    extra = body & ~truth["body"]
    assert not (extra & ~truth["table"]).any() and not extra[:, :, :40].any() and not extra[:, :, 90:].any()


def test_body_parts_real_ct_head() -> None:
    series = load_series(series_files("ct-head-philips-5mm"))
    (result,) = run(body_parts_seg, series)
    m = masks_of(result)
    hu = series.rescaled()
    ml = np.prod(series.spacing) / 1000
    assert 1000 < m["Body"].sum() * ml < 4000  # an adult head: a few litres
    assert 100 < m["Bone"].sum() * ml < 1000
    assert not m["Lungs"].any()  # the skull's air is open to the outside at the base; sinuses are small
    assert not (m["Bone"] & ~m["Body"]).any() and (hu[m["Bone"]] > 250).all()
    # the head holder below the head is not body; the closed skull is filled
    k = 14
    assert (m["Body"][k] & (hu[k] < -900)).sum() * series.spacing[1] * series.spacing[2] > 10000  # > 100 cm2
    assert not m["Body"][k, 480:, :].any() and (hu[k, 480:, :] > -500).any()
    assert m["Body"][:27].any(axis=(1, 2)).all()


def test_body_parts_refuses_mr() -> None:
    series = load_series(series_files("mr-t1-sag-siemens"))
    with pytest.raises(PluginError, match="works on CT.*MR"):
        run(body_parts_seg, series)


def test_body_parts_seg_builds_and_verifies(series: SeriesInput, tmp_path: Path) -> None:
    (result,) = run(body_parts_seg, series, min_lung_ml=30)
    ds = build_seg(series, result, PROV)
    assert [s.SegmentLabel for s in ds.SegmentSequence] == ["Body", "Lungs", "Bone"]
    save_and_check([ds], tmp_path)
    # a segment that is not found stays in the list (fixed numbering) and still makes a valid SEG
    (result,) = run(body_parts_seg, series, min_lung_ml=1000)
    assert not result.masks[..., 1].any()
    save_and_check([build_seg(series, result, PROV)], tmp_path / "no-lungs")


# -- overlay-sc ----------------------------------------------------------------------------------------

COLORS = [(230, 40, 40), (40, 90, 230)]


def two_segments(truth: dict) -> Segmentation:
    masks = np.stack([truth["lungs"], truth["bone"]], axis=-1)
    segments = [
        Segment("Lungs", codes.SCT.AnatomicalStructure, codes.SCT.Lung, COLORS[0]),
        Segment("Bone", codes.SCT.Tissue, codes.SCT.BoneTissue, COLORS[1]),
    ]
    return Segmentation(masks, segments, description="test seg")


def test_overlay_filled_colours_exactly_the_mask(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    truth = phantom[1]
    series.previous = [two_segments(truth)]
    (images,) = run(overlay_sc, series, window_center=40, window_width=400, opacity=0.5, legend=False)
    assert isinstance(images, Images) and images.pixels.dtype == np.uint8
    assert list(images.source_slices) == list(BONE_SLICES)  # "segmented": the slices with a mask
    assert images.pixels.shape == (len(BONE_SLICES), ROWS, COLS, 3)
    assert images.description == "test seg overlay"
    for n, k in enumerate(images.source_slices):
        px = images.pixels[n].astype(int)
        grey = window(truth["hu"][k], 40, 400)
        coloured = (px[..., 0] != px[..., 1]) | (px[..., 1] != px[..., 2])
        union = truth["lungs"][k] | truth["bone"][k]
        assert np.array_equal(coloured, union), k
        assert np.abs(px[~union] - np.rint(grey[~union])[:, None]).max() <= 1
        for mask, color in ((truth["lungs"][k], COLORS[0]), (truth["bone"][k], COLORS[1])):
            if mask.any():
                expected = 0.5 * grey[mask][:, None] + 0.5 * np.array(color)
                assert np.abs(px[mask] - expected).max() <= 1


def test_overlay_outline_selection_and_legend(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    truth = phantom[1]
    series.previous = [two_segments(truth)]
    (images,) = run(
        overlay_sc, series, style="outline", outline_px=2, segments=["Lungs"], slices="all", every=3, legend=False
    )
    assert list(images.source_slices) == list(range(0, N, 3))
    for n, k in enumerate(images.source_slices):
        px = images.pixels[n]
        mask = truth["lungs"][k]
        edge = mask & ~ndimage.binary_erosion(mask, iterations=2)
        assert np.array_equal(np.all(px == COLORS[0], axis=-1), edge)
        grey = (px[..., 0] == px[..., 1]) & (px[..., 1] == px[..., 2])
        assert grey[~edge].all()  # everything else grey: the bone is not drawn

    (images,) = run(overlay_sc, series, legend=True, window_center=40, window_width=400)
    px = images.pixels[0]
    coloured = (px[..., 0] != px[..., 1]) | (px[..., 1] != px[..., 2])
    outside = coloured & ~(truth["lungs"][BONE_SLICES[0]] | truth["bone"][BONE_SLICES[0]])
    # colour off the masks: only the two 7x7 swatches of the legend, in a corner free of segments
    assert outside.sum() == 2 * 49
    rows, cols = np.nonzero(outside)
    assert (rows.max() < 30 or rows.min() > ROWS - 30) and (cols.max() < 30 or cols.min() > COLS - 30)
    for color in COLORS:
        assert np.all(px == color, axis=-1).sum() >= 49
    assert np.all(px == 255, axis=-1).sum() >= text_bitmap("Lungs").sum() + text_bitmap("Bone").sum()


def test_overlay_label_maps_palette_and_default_window(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    truth = phantom[1]
    labelmap = truth["lungs"].astype(np.uint8) + 2 * truth["bone"].astype(np.uint8)
    segments = [Segment("A", codes.SCT.Tissue, codes.SCT.Tissue), Segment("B", codes.SCT.Tissue, codes.SCT.Bone)]
    series.previous = [Segmentation(labelmap, segments, kind="labelmap")]
    (images,) = run(overlay_sc, series, opacity=1.0, legend=False)  # CT default window 40/400
    k = images.source_slices[0]
    px = images.pixels[0]
    # without colours the node's SEG palette is used, so the pictures match the SEG's display colours
    assert np.all(px[truth["bone"][k]] == PALETTE[1], axis=-1).all()
    ring_free = ~truth["bone"][k] & ~truth["lungs"][k]
    assert np.abs(px[ring_free][:, 0] - np.rint(window(truth["hu"][k][ring_free], 40, 400))).max() <= 1


def test_overlay_needs_a_previous_segmentation(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    with pytest.raises(PluginError, match="after a segmentation plugin.*threshold-seg"):
        run(overlay_sc, series)
    series.previous = [Images(np.zeros((1, 8, 8), np.uint8))]
    with pytest.raises(PluginError, match="none"):
        run(overlay_sc, series)
    series.previous = [two_segments(phantom[1])]
    with pytest.raises(PluginError, match="Kidney.*not in the segmentation"):
        run(overlay_sc, series, segments=["Kidney"])
    wrong = Segmentation(np.zeros((N, 10, 10, 1), bool), [Segment("X", codes.SCT.Tissue, codes.SCT.Bone)])
    series.previous = [wrong]
    with pytest.raises(PluginError, match="does not fit"):
        run(overlay_sc, series)


def test_overlay_sc_builds_and_verifies(series: SeriesInput, phantom: tuple[list[Path], dict], tmp_path: Path) -> None:
    series.previous = [two_segments(phantom[1])]
    (images,) = run(overlay_sc, series, every=4)
    datasets = build_sc(series, images, PROV)
    assert len(datasets) == len(images.pixels) == 3
    for ds, k in zip(datasets, images.source_slices, strict=True):
        assert ds.PhotometricInterpretation == "RGB" and ds.SamplesPerPixel == 3
        assert ds.SourceImageSequence[0].ReferencedSOPInstanceUID == series.datasets[k].SOPInstanceUID
        assert list(ds.PatientOrientation) == ["L", "P"]
    paths = save_and_check(datasets, tmp_path)
    assert np.array_equal(pydicom.dcmread(paths[1]).pixel_array, images.pixels[1])


def test_chain_body_parts_then_overlay_in_a_job(phantom: tuple[list[Path], dict], tmp_path: Path) -> None:
    found = discover()
    steps = [
        StepSpec(name, found[name].target, params)
        for name, params in (("body-parts-seg", {"min_lung_ml": 30}), ("overlay-sc", {"segments": ["Lungs"]}))
    ]
    assert {"body-parts-seg", "overlay-sc", "mip-sc"} <= set(found)
    out = tmp_path / "out"
    out.mkdir()
    result = run_work(WorkSpec([str(f) for f in phantom[0]], steps, str(out), ("1.2.3", 1, "rule", 0)))
    assert result.ok, result.error
    assert result.plugins == ["body-parts-seg 1.0", "overlay-sc 1.0"]
    assert [o.kind for o in result.outputs] == ["SEG"] + ["SC"] * len(LUNG_SLICES)
    for o in result.outputs[:2]:
        assert dciodvfy_errors(Path(o.file)) == []


# -- mip-sc ----------------------------------------------------------------------------------------------


def test_mip_views_of_the_phantom(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    hu = phantom[1]["hu"]
    axial, coronal, sagittal = run(mip_sc, series, window_center=40, window_width=400)
    assert [i.description for i in (axial, coronal, sagittal)] == ["MIP axial", "MIP coronal", "MIP sagittal"]
    assert all(i.source_slices is None and i.pixels.dtype == np.uint8 for i in (axial, coronal, sagittal))

    # axial of an axial series: the source layout, max over the slices of the windowed volume
    expected = np.rint(window(hu, 40, 400)).max(axis=0)
    assert axial.pixels.shape == (1, ROWS, COLS) and axial.patient_orientation == ("L", "P")
    diff = np.abs(axial.pixels[0].astype(int) - expected)
    assert diff.max() <= 1 and (diff == 0).mean() > 0.999

    # coronal and sagittal: square pixels (5 mm slices at 2 mm pixels: 2.5 rows per slice), head up
    height = round(N * SLICE_MM / PIXEL_MM)
    assert coronal.pixels.shape == (1, height, COLS) and coronal.patient_orientation == ("L", "F")
    assert sagittal.pixels.shape == (1, height, ROWS) and sagittal.patient_orientation == ("P", "F")
    bone_rows = np.nonzero(coronal.pixels[0][:, 64 - 51] == 255)[0]  # the ring's left edge
    top_slice, bottom_slice = BONE_SLICES[-1], BONE_SLICES[0]
    # slice k (k = 0 at the feet) is around row (N - 1 - k) * 2.5 + 1.25 in the flipped, zoomed picture
    assert (
        abs(bone_rows.min() - (N - 1 - top_slice) * 2.5) <= 2 and abs(bone_rows.max() - (N - bottom_slice) * 2.5) <= 2
    )
    # without resampling: one row per slice, the head (last slice) at the top, the source's columns
    grey = np.rint(window(hu, 40, 400))
    coronal, sagittal = run(
        mip_sc, series, views=["coronal", "sagittal"], window_center=40, window_width=400, square_pixels=False
    )
    assert np.abs(coronal.pixels[0].astype(int) - grey.max(axis=1)[::-1, :]).max() <= 1
    assert np.abs(sagittal.pixels[0].astype(int) - grey.max(axis=2)[::-1, :]).max() <= 1


def test_mip_default_window_square_pixels_and_choices(series: SeriesInput, phantom: tuple[list[Path], dict]) -> None:
    hu = phantom[1]["hu"]
    (axial,) = run(mip_sc, series, views=["axial"])  # CT default 300/1500
    assert np.abs(axial.pixels[0].astype(int) - np.rint(window(hu, 300, 1500)).max(axis=0)).max() <= 1
    (coronal,) = run(mip_sc, series, views=["coronal"], square_pixels=False)
    assert coronal.pixels.shape == (1, N, COLS)
    (coronal,) = run(mip_sc, series, views=["coronal"], max_size=32)
    assert max(coronal.pixels.shape[1:]) <= 32 and coronal.pixels.shape[2] == 32
    assert abs(coronal.pixels.shape[1] / coronal.pixels.shape[2] - (N * SLICE_MM) / (COLS * PIXEL_MM)) < 0.05
    with pytest.raises(ParamsError, match="repeat"):
        mip_sc.validate_params({"views": ["axial", "axial"]})


def test_mip_uneven_slices_are_resampled(phantom: tuple[list[Path], dict]) -> None:
    full = load_series(phantom[0])
    gappy = load_series([f for i, f in enumerate(phantom[0]) if i != 9])  # a 10 mm gap between two slices
    assert not gappy.spacing_is_uniform
    (a,) = run(mip_sc, full, views=["coronal"], window_center=40, window_width=400)
    (b,) = run(mip_sc, gappy, views=["coronal"], window_center=40, window_width=400)
    assert a.pixels.shape == b.pixels.shape == (1, round(N * SLICE_MM / PIXEL_MM), COLS)
    # slices 8 and 10 carry the same structures as the missing 9, so the picture hardly changes
    assert np.abs(a.pixels.astype(int) - b.pixels.astype(int)).mean() < 2


def test_mip_of_a_sagittal_mr_in_patient_terms() -> None:
    series = load_series(series_files("mr-t1-sag-siemens"))
    assert series.orientation == ((0, 1, 0), (0, 0, -1))  # rows run posterior, columns to the feet
    dz, dr, dc = series.spacing
    n, rows, cols = len(series), int(series.first.Rows), int(series.first.Columns)
    axial, coronal, sagittal = run(mip_sc, series, window_center=300, window_width=600)
    width = round(n * dz / dr)  # the slices (patient x, 4.8 mm apart) become columns of 1.016 mm
    assert sagittal.patient_orientation == ("P", "F") and sagittal.pixels.shape == (1, rows, cols)
    assert coronal.patient_orientation == ("L", "F") and coronal.pixels.shape == (1, rows, width)
    assert axial.patient_orientation == ("L", "P") and axial.pixels.shape == (1, cols, width)

    grey = np.rint(window(series.rescaled(), 300, 600))
    # the source plane keeps its layout
    assert np.abs(sagittal.pixels[0].astype(int) - grey.max(axis=0)).max() <= 1
    # the slices run towards the patient's right (normal -x): the other views flip them, so left is right
    coronal, axial = run(
        mip_sc, series, views=["coronal", "axial"], window_center=300, window_width=600, square_pixels=False
    )
    assert np.abs(coronal.pixels[0].astype(int) - grey.max(axis=2).T[:, ::-1]).max() <= 1
    assert np.abs(axial.pixels[0].astype(int) - grey.max(axis=1).T[:, ::-1]).max() <= 1
    # without a window: the first image's Window Center/Width (MR has no modality default)
    (sagittal,) = run(mip_sc, series, views=["sagittal"])
    first = series.first
    grey = np.rint(window(series.rescaled(), float(first.WindowCenter), float(first.WindowWidth)))
    assert np.abs(sagittal.pixels[0].astype(int) - grey.max(axis=0)).max() <= 1


def test_mip_sc_builds_and_verifies(series: SeriesInput, tmp_path: Path) -> None:
    results = run(mip_sc, series)
    for i, images in enumerate(results):
        datasets = build_sc(series, images, PROV, index=i)
        assert len(datasets) == 1
        ds = datasets[0]
        assert tuple(ds.PatientOrientation) == images.patient_orientation
        assert len(ds.SourceImageSequence) == N  # a derived view references the whole series
        assert (ds.Rows, ds.Columns) == images.pixels.shape[1:]
        save_and_check(datasets, tmp_path / images.description.replace(" ", "-"))
    assert math.isclose(
        results[1].pixels.shape[1] / results[1].pixels.shape[2], (N * SLICE_MM) / (COLS * PIXEL_MM), rel_tol=0.02
    )
