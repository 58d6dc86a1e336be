"""segment-stats on real series whose index grid is not their geometry, against a physical-space reference.

Series: the real 5 mm head CT, the real 16.5 degree tilted-gantry head CT, the real sagittal T1 MR,
and variants made by ``tests/helpers/variants.py``: the head CT sheared by 20 degrees (each slice
shifted 1.8 mm in-plane), and slices dropped (gaps of 1, 2 and 3 steps) from the head CT, the tilted
CT and the MR. Each is segmented by threshold-seg, as a chain would.

The reference volume does not add up voxel volumes: it locates points of patient space. A jittered
lattice of points (one random point in every 1 mm cube) fills the box around the segment; each point
belongs to the slice whose slab along the normal holds it (slabs meet halfway between neighbouring
slices, the end ones reach half a gap beyond) and, in that slice, to the pixel whose centre is nearest
in-plane, measured from that slice's own Image Position (Patient). The volume is the number of points
landing in the mask times 1 mm³. Volumes must agree within 1 %; treating the step between positions
as the slice spacing would be 4.3 % (tilted) and 6.4 % (sheared) off, and the median spacing on the
unevenly spaced series more still.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from pydicom.sr.codedict import codes

from node.plugins.api import Measurements, NoParams, PluginError, Segmentation, SeriesInput
from node.plugins.builtin.segment_stats import segment_stats
from node.plugins.builtin.threshold import Params, Range, threshold_seg
from node.plugins.runtime import run_in_process
from node.plugins.series import load_series
from node.plugins.worker import StepSpec, WorkSpec
from tests.helpers import variants
from tests.helpers.dciodvfy import verify

#: Lattice step of the reference (mm): one jittered point per cube of this side.
CELL_MM = 1.0
CT_SEGMENTS = [
    Range(label="Bone", lower=300, category="Tissue", type="Bone"),
    Range(label="Head", lower=-300, category="Tissue", type="Head"),
]
MR_SEGMENTS = [Range(label="Bright", lower=600, category="Tissue", type="Tissue")]
CASES = [
    ("ct-head",),
    ("ct-head", "sheared"),
    ("ct-head", "uneven"),
    ("ct-tilted",),
    ("ct-tilted", "uneven"),
    ("mr-sag",),
    ("mr-sag", "uneven"),
]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("segment-stats")


def chained(folder: Path, source: str, *changes: str) -> SeriesInput:
    """The series loaded as the node loads it, with threshold-seg's Segmentation as the previous step."""
    files = variants.write(variants.make(source, *changes), folder / "-".join((source, *changes)))
    series = load_series(files)
    ranges = CT_SEGMENTS if series.modality == "CT" else MR_SEGMENTS
    series.previous = list(threshold_seg(series, Params(segments=ranges)))
    return series


def masks_of(series: SeriesInput) -> list[np.ndarray]:
    seg = series.previous[-1]
    assert isinstance(seg, Segmentation)
    return [seg.masks[..., n] for n in range(seg.masks.shape[-1])]


def slabs(series: SeriesInput) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The normal, and each slice's slab along it: (lower edge, upper edge) per slice, in slice order."""
    row, col = (np.array(v) for v in series.orientation)
    normal = np.cross(row, col)
    depth = series.positions @ normal
    order = np.argsort(depth)
    d = depth[order]
    edges = np.concatenate([[d[0] - (d[1] - d[0]) / 2], (d[1:] + d[:-1]) / 2, [d[-1] + (d[-1] - d[-2]) / 2]])
    lower, upper = np.empty(len(d)), np.empty(len(d))
    lower[order], upper[order] = edges[:-1], edges[1:]
    return normal, lower, upper


def reference_volume_ml(series: SeriesInput, mask: np.ndarray, seed: int = 0) -> float:
    """The mask's volume by locating jittered lattice points of patient space in the slices (see the module doc)."""
    row, col = (np.array(v) for v in series.orientation)
    dr, dc = series.pixel_spacing
    normal, lower, upper = slabs(series)
    k, i, j = np.nonzero(mask)
    # the box around the segment: its voxels' corners, each slab's full thickness
    corners = []
    for kk in np.unique(k):
        ii, jj = i[k == kk], j[k == kk]
        for a in (ii.min() - 0.5, ii.max() + 0.5):
            for b in (jj.min() - 0.5, jj.max() + 0.5):
                for z in (lower[kk], upper[kk]):
                    p = series.positions[kk] + a * dr * col + b * dc * row
                    corners.append(p + (z - p @ normal) * normal)
    lo, hi = np.min(corners, axis=0), np.max(corners, axis=0)
    axes = [np.arange(lo[a], hi[a], CELL_MM) for a in range(3)]
    sorted_k = np.argsort(lower)
    edges = np.append(lower[sorted_k], upper[sorted_k[-1]])
    rng = np.random.default_rng(seed)
    inside = 0
    gx, gy = np.meshgrid(axes[0], axes[1], indexing="ij")
    for z in axes[2]:
        pts = np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, z)], axis=1) + rng.uniform(0, CELL_MM, (gx.size, 3))
        t = pts @ normal
        slot = np.searchsorted(edges, t, side="right") - 1
        ok = (slot >= 0) & (slot < len(sorted_k))
        kk = sorted_k[slot[ok]]
        rel = pts[ok] - series.positions[kk]
        ii = np.rint(rel @ col / dr).astype(int)
        jj = np.rint(rel @ row / dc).astype(int)
        ok2 = (ii >= 0) & (ii < mask.shape[1]) & (jj >= 0) & (jj < mask.shape[2])
        inside += int(mask[kk[ok2], ii[ok2], jj[ok2]].sum())
    return inside * CELL_MM**3 / 1000


def run(series: SeriesInput) -> Measurements:
    out = segment_stats(series, NoParams())
    assert isinstance(out, Measurements)
    return out


def value(group_measurements: list, name: str) -> float:
    found = [m.value for m in group_measurements if (m.derivation or m.name).meaning == name]
    assert len(found) == 1, name
    return float(found[0])


@pytest.mark.parametrize("case", CASES, ids="-".join)
def test_volumes_match_a_physical_space_reference(folder: Path, case: tuple[str, ...]) -> None:
    series = chained(folder, *case)
    report = run(series)
    masks = masks_of(series)
    assert len(report.groups) == len(masks)
    for g, mask in zip(report.groups, masks, strict=True):
        reference = reference_volume_ml(series, mask)
        assert value(g.measurements, "Volume") == pytest.approx(reference, rel=0.01), g.tracking_id


def test_shearing_a_series_keeps_its_segment_volumes(folder: Path) -> None:
    """Shear moves slices in-plane, not along the normal: the sheared copy's volumes are the original's."""
    original, sheared = run(chained(folder, "ct-head")), run(chained(folder, "ct-head", "sheared"))
    regular = chained(folder, "ct-head")
    dz, dr, dc = 5.0, *regular.pixel_spacing
    for a, b, mask in zip(original.groups, sheared.groups, masks_of(regular), strict=True):
        # the regular grid's volume: voxel count times the voxel (5 mm slices of the real series)
        assert value(a.measurements, "Volume") == pytest.approx(mask.sum() * dz * dr * dc / 1000, rel=1e-6)
        assert value(b.measurements, "Volume") == pytest.approx(value(a.measurements, "Volume"), rel=1e-6)


@pytest.mark.parametrize("case", [("ct-head",), ("mr-sag",), ("ct-tilted", "uneven")], ids="-".join)
def test_value_statistics_are_numpys_on_the_mask(folder: Path, case: tuple[str, ...]) -> None:
    """Mean and SD weight each voxel by its slab (all alike on an even series), min and max are plain."""
    series = chained(folder, *case)
    report = run(series)
    values = series.rescaled().astype(np.float64)
    _, lower, upper = slabs(series)
    for g, mask in zip(report.groups, masks_of(series), strict=True):
        inside = values[mask]
        w = (upper - lower)[np.nonzero(mask)[0]]
        mean = np.average(inside, weights=w)
        if series.spacing_is_uniform:
            assert mean == pytest.approx(inside.mean(), rel=1e-9)
            assert np.sqrt(np.average((inside - mean) ** 2, weights=w)) == pytest.approx(inside.std(), rel=1e-9)
        assert value(g.measurements, "Mean") == pytest.approx(mean, rel=1e-9)
        assert value(g.measurements, "Standard Deviation") == pytest.approx(
            np.sqrt(np.average((inside - mean) ** 2, weights=w)), rel=1e-9
        )
        assert value(g.measurements, "Minimum") == inside.min()
        assert value(g.measurements, "Maximum") == inside.max()


def test_groups_name_their_segments_and_units(folder: Path) -> None:
    assert segment_stats.family == codes.cid7162.HistogramAnalysis  # statistics of values, not an AI model
    ct = chained(folder, "ct-head")
    report = run(ct)
    assert [g.tracking_id for g in report.groups] == ["Bone", "Head"]
    assert [g.finding for g in report.groups] == [codes.SCT.Bone, codes.SCT.Head]
    assert [(g.segment, g.segmentation) for g in report.groups] == [(1, 0), (2, 0)]
    volume, *stats = report.groups[0].measurements
    assert (volume.name, volume.unit.value, volume.derivation) == (codes.SCT.Volume, "ml", None)
    assert [m.derivation for m in stats] == [
        codes.SCT.Mean,
        codes.SCT.StandardDeviation,
        codes.SCT.Minimum,
        codes.SCT.Maximum,
    ]
    assert {(m.name, m.unit) for m in stats} == {(codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit)}
    mr = run(chained(folder, "mr-sag"))
    assert {(m.name, m.unit) for m in mr.groups[0].measurements[1:]} == {
        (codes.DCM.MRSignalIntensity, codes.UCUM.NoUnits)
    }


def test_an_empty_segment_has_volume_zero_and_no_statistics(folder: Path) -> None:
    series = chained(folder, "ct-head")
    seg = series.previous[-1]
    assert isinstance(seg, Segmentation)
    seg.masks[..., 1] = False
    group = run(series).groups[1]
    assert [(m.name, m.value) for m in group.measurements] == [(codes.SCT.Volume, 0.0)]


def test_without_a_segmentation_it_says_what_to_chain(folder: Path) -> None:
    series = chained(folder, "ct-head")
    series.previous = []
    with pytest.raises(PluginError, match='chain it after a segmentation plugin.*"segment-stats"'):
        run(series)


def test_a_threshold_seg_then_segment_stats_job_writes_a_seg_and_an_sr_referencing_it(tmp_path: Path) -> None:
    """The chain in the node's isolated runtime, as ``plugins = [{ name = "threshold-seg" }, { name =
    "segment-stats" }]`` runs it: one SEG, one SR (dciodvfy: no errors), each SR group naming its segment of
    that SEG, with the volume and statistics the plugin measured (read back with highdicom)."""
    files = variants.make_files(tmp_path / "in", "ct-tilted")
    out = tmp_path / "out"
    out.mkdir()
    ranges = [r.model_dump() for r in CT_SEGMENTS]
    steps = [
        StepSpec("threshold-seg", "node.plugins.builtin.threshold:threshold_seg", {"segments": ranges}),
        StepSpec("segment-stats", "node.plugins.builtin.segment_stats:segment_stats", {}),
    ]
    spec = WorkSpec(files=[str(f) for f in files], steps=steps, out_dir=str(out), job_key=("1.2.3", 1, "stats", 0))
    result = run_in_process(spec, timeout=300)
    assert result.ok, result.error
    assert sorted(o.kind for o in result.outputs) == ["SEG", "SR"], result.outputs
    by_kind = {o.kind: Path(o.file) for o in result.outputs}
    for kind, path in by_kind.items():
        verify(path, f"segment-stats job {kind}")
    seg = pydicom.dcmread(by_kind["SEG"])
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(by_kind["SR"]))
    groups = sr.content.get_volumetric_roi_measurement_groups()
    expected = run(chained(tmp_path, "ct-tilted"))  # the plugin's own figures, in this process
    assert [g.tracking_identifier for g in groups] == ["Bone", "Head"]
    for g, want in zip(groups, expected.groups, strict=True):
        ref = g.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [want.segment]
        got = {((m.derivation or m.name).meaning): m.value for m in g.get_measurements()}
        assert got == pytest.approx({(w.derivation or w.name).meaning: w.value for w in want.measurements}, rel=1e-6)


def test_a_segmentation_without_segments_is_refused_clearly(folder: Path) -> None:
    """A label map with no label and no descriptions (a template would describe them) has nothing to measure."""
    series = chained(folder, "ct-head")
    series.previous = [Segmentation(np.zeros(series.voxels().shape, np.uint8), [], kind="labelmap")]
    with pytest.raises(PluginError, match="has no segments: there is nothing to measure"):
        run(series)


def test_a_repeated_label_gets_its_segment_number_and_a_single_slice_its_thickness(folder: Path) -> None:
    """Tracking ids stay unique (the report needs it); one slice's slab is its Spacing Between Slices (5 mm)."""
    series = chained(folder, "ct-head", "single")
    seg = series.previous[-1]
    assert isinstance(seg, Segmentation)
    seg.segments[1].label = "Bone"
    report = run(series)
    assert [g.tracking_id for g in report.groups] == ["Bone", "Bone (segment 2)"]
    dr, dc = series.pixel_spacing
    assert value(report.groups[0].measurements, "Volume") == pytest.approx(seg.masks[..., 0].sum() * dr * dc * 5 / 1000)
    for d in series.datasets:
        del d.SpacingBetweenSlices, d.SliceThickness
    with pytest.raises(PluginError, match="single slice without Slice Thickness or Spacing Between Slices"):
        run(series)
