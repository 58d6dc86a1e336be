"""volume-change on the real CT head: the current volume, the prior's and the change, against a direct count.

The prior is the same real series with its top slices dropped (under new UIDs, an earlier Study Date), so
the bone in it is smaller by what those slices held; both volumes are counted here independently
(voxels above 300 HU x pixel area x the series' even 5 mm spacing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers import variants
from pydicom.sr.codedict import codes

from node.plugins.api import Measurements, Segmentation
from node.plugins.builtin.threshold import Params
from node.plugins.builtin.volume_change import PRIOR_VOLUME, VOLUME_CHANGE, volume_change
from node.plugins.series import load_priors, load_series

CT = "ct-head"
DROPPED = 6


def _bone_ml(files: list[Path]) -> float:
    """Voxels >= 300 HU times the voxel volume (pixel area x 5 mm, the series' spacing)."""
    import pydicom

    dsets = [pydicom.dcmread(f) for f in files]
    row, col = (float(v) for v in dsets[0].PixelSpacing)
    count = sum(
        int(np.count_nonzero(d.pixel_array * float(d.RescaleSlope) + float(d.RescaleIntercept) >= 300)) for d in dsets
    )
    return count * row * col * 5.0 / 1000.0


@pytest.fixture(scope="module")
def studies(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], list[Path]]:
    root = tmp_path_factory.mktemp("volume-change")
    current = variants.write(variants.load(CT), root / "current")
    prior_sets = variants.make(CT)[:-DROPPED]
    for d in prior_sets:
        d.StudyDate = "20190101"
    prior = variants.write(prior_sets, root / "prior")
    return current, prior


def _values(m: Measurements) -> dict[str, float]:
    [group] = m.groups
    return {x.name.meaning: x.value for x in group.measurements}


def test_volumes_now_and_in_the_prior_and_the_change(studies: tuple[list[Path], list[Path]]) -> None:
    current, prior = studies
    series = load_series(current)
    series.priors = load_priors([{"study_uid": "1.2.3", "study_date": "20190101", "series": [[str(p) for p in prior]]}])
    seg, report = volume_change(series, Params())
    assert isinstance(seg, Segmentation) and isinstance(report, Measurements)
    now, before = _bone_ml(current), _bone_ml(prior)
    assert before < now  # the dropped slices held bone
    values = _values(report)
    assert values[codes.SCT.Volume.meaning] == pytest.approx(now, rel=1e-9)
    assert values[PRIOR_VOLUME.meaning] == pytest.approx(before, rel=1e-9)
    assert values[VOLUME_CHANGE.meaning] == pytest.approx(now - before, rel=1e-9)
    assert values[codes.DCM.FractionalChange.meaning] == pytest.approx(100 * (now - before) / before, rel=1e-9)
    [group] = report.groups
    assert group.tracking_id == "Bone" and group.segment == 1  # as segment-stats tracks the same segment
    assert "20190101" in report.description


def test_without_a_prior_only_the_current_volume(studies: tuple[list[Path], list[Path]]) -> None:
    current, _ = studies
    _seg, report = volume_change(load_series(current), Params())
    assert list(_values(report)) == [codes.SCT.Volume.meaning]
    assert _values(report)[codes.SCT.Volume.meaning] == pytest.approx(_bone_ml(current), rel=1e-9)
    assert report.description == "volume-change: no prior study"


def test_the_sr_names_the_prior_it_compared_with_and_tracks_findings_as_segment_stats_does(
    tmp_path: Path, studies: tuple[list[Path], list[Path]]
) -> None:
    """A reader of the report can tell where "volume in prior study" came from (Pertinent Other Evidence), the
    local codes are declared, and the Bone finding has the Tracking UID segment-stats gives it."""
    import highdicom as hd
    import pydicom
    from helpers.dciodvfy import verify

    from node.derive.common import Provenance
    from node.derive.seg import build_seg
    from node.derive.sr import build_sr
    from node.plugins.builtin.segment_stats import segment_stats

    current, prior = studies
    series = load_series(current)
    series.priors = load_priors([{"study_uid": "1.2.3", "study_date": "20190101", "series": [[str(p) for p in prior]]}])
    seg, report = volume_change(series, Params())

    def sr(plugin: str, m: Measurements) -> Path:
        prov = Provenance((str(series.first.SeriesInstanceUID), 1, plugin, 0), plugin, "1.0")
        segs = {0: build_seg(series, seg, prov, index=0)}
        path = tmp_path / f"{plugin}.dcm"
        build_sr(series, m, prov, index=1, segs=segs).save_as(path, enforce_file_format=True)
        return path

    path = sr("volume-change", report)
    verify(path, "volume-change SR")
    ds = pydicom.dcmread(path)
    prior_uids = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in prior}
    [other_study] = ds.PertinentOtherEvidenceSequence
    assert other_study.StudyInstanceUID == pydicom.dcmread(prior[0], stop_before_pixels=True).StudyInstanceUID
    listed = {s.ReferencedSOPInstanceUID for x in other_study.ReferencedSeriesSequence for s in x.ReferencedSOPSequence}
    assert listed == prior_uids
    assert "99DICOMNODE" in {d.CodingSchemeDesignator for d in ds.CodingSchemeIdentificationSequence}

    series.previous = [seg]
    stats_path = sr("segment-stats", segment_stats(series, segment_stats.validate_params({})))

    def tracking(p: Path) -> dict[str, str]:
        back = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(p)).content)
        return {g.tracking_identifier: g.tracking_uid for g in back.get_volumetric_roi_measurement_groups()}

    assert tracking(path) == tracking(stats_path) and set(tracking(path)) == {"Bone"}


def test_a_single_slice_without_thickness_is_refused_saying_what_is_missing(
    studies: tuple[list[Path], list[Path]],
) -> None:
    """One slice has no neighbour to measure its slab against: the plugin says what the series lacks."""
    from node.plugins.api import PluginError

    current, _ = studies
    series = load_series(current[:1])
    for d in series.datasets:
        for keyword in ("SliceThickness", "SpacingBetweenSlices"):
            if keyword in d:
                delattr(d, keyword)
    with pytest.raises(PluginError) as e:
        volume_change(series, Params())
    assert "volume-change cannot measure the volume of a single slice without Slice Thickness" in str(e.value)
