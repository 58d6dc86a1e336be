"""Measurements as a DICOM SR (TID 1500) and a job's Key Object Selection, built from a real CT and its SEG.

What a user relies on: a viewer reading the SR with highdicom gets back exactly the plugin's numbers,
codes and findings; each finding points at the segment of the SEG it measures; the same finding keeps
its Tracking UID in a follow-up job; dciodvfy finds no error in what the node made; a wrong reference
is an error that says what to change.
"""

from __future__ import annotations

import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import SHARED, series_files
from helpers.dciodvfy import NOT_A_SEGMENTATION, verify
from helpers.dciodvfy import lines as dciodvfy_lines
from pydicom.dataset import Dataset

from node.derive.common import Provenance
from node.derive.errors import OutputError
from node.derive.kos import build_kos
from node.derive.seg import build_seg
from node.derive.sr import build_sr, tracking_uid
from node.derive.validate import validate
from node.plugins.api import (
    Code,
    Measurement,
    MeasurementGroup,
    Measurements,
    QualitativeFinding,
    Segment,
    Segmentation,
    SeriesInput,
    codes,
)
from node.plugins.builtin.threshold import Params, threshold_seg
from node.plugins.series import load_series

pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")

CT = "ct-head-philips-5mm"
ML = Code("ml", "UCUM", "milliliter")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
MM2 = Code("mm2", "UCUM", "square millimeter")
MALIGNANCY = Code("RID5705", "RADLEX", "Malignancy")


@pytest.fixture(scope="module")
def ct() -> SeriesInput:
    return load_series(series_files(CT))


@pytest.fixture(scope="module")
def seg_result(ct: SeriesInput) -> Segmentation:
    params = Params.model_validate(
        {
            "segments": [
                {"label": "Bone", "lower": 300, "type": "Bone"},
                {"label": "Brain", "lower": 20, "upper": 60, "type": "Brain"},
            ]
        }
    )
    (result,) = threshold_seg(ct, params)
    return result


def prov(job: str = "job-1", plugin: str = "measure") -> Provenance:
    return Provenance((f"1.2.3.{job}", 1, "rule", 0), plugin, "0.3", parameters={"threshold": "300"})


@pytest.fixture(scope="module")
def seg(ct: SeriesInput, seg_result: Segmentation) -> Dataset:
    return build_seg(ct, seg_result, prov(plugin="threshold-seg"), index=0)


def report(seg_result: Segmentation) -> Measurements:
    groups = [
        MeasurementGroup(
            tracking_id=s.label,
            finding=s.type,
            segment=k + 1,
            segmentation=0,
            finding_site=codes.SCT.Head,
            measurements=[
                # Values a decimal string (16 characters) cannot hold: the SR keeps them exactly anyway.
                Measurement(codes.SCT.Volume, 1234.567890123456 + k, ML),
                Measurement(codes.SCT.Mean, -12.000000000001 * (k + 1), HU, codes.SCT.Mean),
            ],
        )
        for k, s in enumerate(seg_result.segments)
    ]
    groups.append(
        MeasurementGroup(
            "Nodule 1",
            codes.SCT.Nodule,
            [Measurement(codes.SCT.Volume, 0.5, ML)],
            qualitative=[QualitativeFinding(MALIGNANCY, codes.SCT.Malignant)],
            source_slices=[4, 3],
        )
    )
    return Measurements(groups, description="head measurements")


def read(ds: Dataset, path: Path) -> hd.sr.MeasurementReport:
    ds.save_as(path, enforce_file_format=True)
    sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path))
    return hd.sr.MeasurementReport.from_sequence(sr.content)


def code(c: object) -> tuple[str, str, str]:
    return (c.value, c.scheme_designator, c.meaning)  # type: ignore[attr-defined]


def test_the_sr_reads_back_as_the_plugins_measurements_and_dciodvfy_finds_no_error(
    tmp_path: Path, ct: SeriesInput, seg_result: Segmentation, seg: Dataset
) -> None:
    m = report(seg_result)
    ds = build_sr(ct, m, prov(), index=1, segs={0: seg})
    assert validate(ds) == []
    back = read(ds, tmp_path / "sr.dcm")
    verify(tmp_path / "sr.dcm", "measurement SR")
    assert ds.SeriesDescription == "head measurements" and ds.Modality == "SR"
    assert ds.StudyInstanceUID == ct.first.StudyInstanceUID and ds.PatientID == ct.first.PatientID
    # The device that observed: the plugin.
    (observer,) = back.get_observer_contexts()
    assert "measure" in {str(item.get("TextValue", "")) for item in observer}
    # Each group names the algorithm (TID 4019): the plugin, its version, its parameters.
    for group in back.get_volumetric_roi_measurement_groups() + back.get_image_measurement_groups():
        algorithm = [
            (i.ConceptNameCodeSequence[0].CodeMeaning, str(i.TextValue))
            for top in group
            for i in (top, *_walk_items(top))
            if "TextValue" in i
        ]
        assert {
            ("Algorithm Name", "measure"),
            ("Algorithm Version", "0.3"),
            ("Algorithm Parameters", "threshold=300"),
        } <= set(algorithm)

    volumetric = back.get_volumetric_roi_measurement_groups()
    assert [g.tracking_identifier for g in volumetric] == ["Bone", "Brain"]
    for k, (want, got) in enumerate(zip(m.groups[:2], volumetric, strict=True)):
        assert got.tracking_uid == tracking_uid(str(ct.first.PatientID), want.tracking_id)
        assert code(got.finding_type) == code(want.finding)
        assert [code(s.value) for s in got.finding_sites] == [code(codes.SCT.Head)]
        ref = got.referenced_segment
        assert ref.referenced_sop_instance_uid == seg.SOPInstanceUID
        assert ref.referenced_segment_numbers == [k + 1]
        # The segment's source images are the slices it lies on (a subset of the CT's).
        sources = {s.referenced_sop_instance_uid for s in ref.source_images_for_segmentation}
        assert sources and sources <= {d.SOPInstanceUID for d in ct.datasets}
        measured = [
            (code(x.name), x.value, code(x.unit), x.derivation and code(x.derivation)) for x in got.get_measurements()
        ]
        assert measured == [
            (code(x.name), x.value, code(x.unit), x.derivation and code(x.derivation)) for x in want.measurements
        ]

    (image_level,) = back.get_image_measurement_groups()
    assert image_level.tracking_identifier == "Nodule 1"
    assert {s.referenced_sop_instance_uid for s in image_level.source_images} == {
        ct.datasets[3].SOPInstanceUID,
        ct.datasets[4].SOPInstanceUID,
    }
    ((name, value),) = [(code(q.name), code(q.value)) for q in image_level.get_qualitative_evaluations()]
    assert (name, value) == (code(MALIGNANCY), code(codes.SCT.Malignant))
    assert [x.value for x in image_level.get_measurements()] == [0.5]
    # Evidence: every source image and the SEG.
    evidence = {
        s.ReferencedSOPInstanceUID
        for study in ds.CurrentRequestedProcedureEvidenceSequence
        for series in study.ReferencedSeriesSequence
        for s in series.ReferencedSOPSequence
    }
    assert evidence == {d.SOPInstanceUID for d in ct.datasets} | {seg.SOPInstanceUID}


def test_a_finding_keeps_its_tracking_uid_in_another_job_and_the_report_gets_its_own(
    ct: SeriesInput, seg_result: Segmentation, seg: Dataset
) -> None:
    m = report(seg_result)
    first = build_sr(ct, m, prov("job-1"), index=1, segs={0: seg})
    again = build_sr(ct, m, prov("job-1"), index=1, segs={0: seg})
    follow_up = build_sr(ct, m, prov("job-2"), index=1, segs={0: seg})
    assert first.SOPInstanceUID == again.SOPInstanceUID  # a retry makes the same object (a re-send)
    assert follow_up.SOPInstanceUID != first.SOPInstanceUID

    def uids(ds: Dataset) -> list[str]:
        r = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(ds).content)
        return [g.tracking_uid for g in r.get_volumetric_roi_measurement_groups()]

    assert uids(first) == uids(follow_up)
    assert len(set(uids(first))) == 2
    assert tracking_uid("other patient", "Bone") != tracking_uid(str(ct.first.PatientID), "Bone")
    # Another plugin tracking the same finding under the same id gives it the same UID.
    assert uids(build_sr(ct, m, prov("job-3", plugin="other-plugin"), index=1, segs={0: seg})) == uids(first)


def test_series_without_a_patient_id_never_share_a_tracking_uid() -> None:
    """Anonymised exports without Patient ID: two studies' findings would otherwise be "the same finding"."""
    m = Measurements([MeasurementGroup("X", codes.SCT.Bone, [Measurement(codes.SCT.Volume, 1.0, ML)])])
    study_uids = []
    for study in ("1.2.3.4.1", "1.2.3.4.2"):
        anonymous = load_series(series_files(CT))
        for d in anonymous.datasets:
            d.PatientID = ""
            d.StudyInstanceUID = study
        ds = build_sr(anonymous, m, prov(), index=0)
        (group,) = hd.sr.MeasurementReport.from_sequence(
            hd.sr.Comprehensive3DSR.from_dataset(ds).content
        ).get_image_measurement_groups()
        study_uids.append(group.tracking_uid)
    assert study_uids[0] != study_uids[1]


def test_a_label_map_seg_is_referenced_through_its_source_series(tmp_path: Path, ct: SeriesInput) -> None:
    labels = np.zeros((len(ct), int(ct.first.Rows), int(ct.first.Columns)), np.uint8)
    labels[10:14, 200:260, 200:260] = 1
    labels[12:16, 300:320, 300:320] = 2
    segments = [Segment("A", codes.SCT.Tissue, codes.SCT.Tissue), Segment("B", codes.SCT.Tissue, codes.SCT.Bone)]
    label_map = build_seg(ct, Segmentation(labels, segments, kind="labelmap"), prov(plugin="lm"), index=0)
    m = Measurements([MeasurementGroup("B", codes.SCT.Bone, [Measurement(codes.SCT.Volume, 2.0, ML)], segment=2)])
    ds = build_sr(ct, m, prov(), index=1, segs={0: label_map})
    back = read(ds, tmp_path / "sr.dcm")
    # dicom3tools 1.00~20220618 predates Label Map Segmentation Storage (Sup 243, 2024), so it takes a segment
    # reference to one for a reference to something that is not a segmentation; verify tolerates that error
    # only when the same SR referring to the SEG as Segmentation Storage has no error at all.
    assert NOT_A_SEGMENTATION in dciodvfy_lines(tmp_path / "sr.dcm")
    verify(tmp_path / "sr.dcm", "SR on a label map SEG")
    (group,) = back.get_volumetric_roi_measurement_groups()
    ref = group.referenced_segment
    assert (ref.referenced_sop_instance_uid, ref.referenced_segment_numbers) == (label_map.SOPInstanceUID, [2])
    assert ref.source_series_for_segmentation.value == ct.first.SeriesInstanceUID


def _walk_items(ds: Dataset) -> list[Dataset]:
    """Every item of every sequence in ``ds``, depth first."""
    out = []
    for elem in ds:
        if elem.VR == "SQ":
            for item in elem.value:
                out += [item, *_walk_items(item)]
    return out


def test_an_enhanced_multi_frame_source_is_referenced_by_its_frames(tmp_path: Path) -> None:
    mf = load_series([SHARED / "transfer-syntaxes" / "misc" / "eCT_Supplemental.dcm"])
    assert mf.frames is not None and list(mf.frames) == [1, 0]  # slice order is not frame order
    (result,) = threshold_seg(
        mf, Params.model_validate({"segments": [{"label": "Body", "lower": -300, "type": "Bone"}]})
    )
    seg = build_seg(mf, result, prov(plugin="threshold-seg"), index=0)
    m = Measurements(
        [
            MeasurementGroup("Body", codes.SCT.Bone, [Measurement(codes.SCT.Volume, 1.0, ML)], segment=1),
            MeasurementGroup("Slice 0", codes.SCT.Bone, [Measurement(codes.SCT.Area, 2.0, MM2)], source_slices=[0]),
        ]
    )
    ds = build_sr(mf, m, prov(), index=1, segs={0: seg})
    assert validate(ds) == []
    back = read(ds, tmp_path / "sr.dcm")
    verify(tmp_path / "sr.dcm", "SR on an enhanced CT")
    (segment,) = back.get_volumetric_roi_measurement_groups()
    assert segment.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    (image_level,) = back.get_image_measurement_groups()
    (source,) = image_level.source_images
    # Slice 0 is frame 2 of the source.
    assert (source.referenced_sop_instance_uid, source.referenced_frame_numbers) == (mf.first.SOPInstanceUID, [2])


def one(**kw: object) -> Measurements:
    return Measurements([MeasurementGroup("X", codes.SCT.Bone, [Measurement(codes.SCT.Volume, 1.0, ML)], **kw)])


@pytest.mark.parametrize(
    ("result", "segs", "message"),
    [
        (one(segment=3), "seg", "segment 3 is not in the Segmentation it measures (its segments are 1, 2)"),
        (one(segment=1), None, "names segment 1 but the job made no Segmentation before it"),
        (one(segment=1, segmentation=5), "seg", "segmentation = 5 is not a Segmentation this job wrote"),
        (one(source_slices=[28]), None, "source_slices [28] out of range; the series has 28 slices (0..27)"),
    ],
)
def test_a_reference_that_cannot_hold_says_what_to_change(
    ct: SeriesInput, seg: Dataset, result: Measurements, segs: str | None, message: str
) -> None:
    with pytest.raises(OutputError) as e:
        build_sr(ct, result, prov(), index=1, segs={0: seg} if segs else {})
    assert message in str(e.value)


def test_the_key_object_selection_lists_the_outputs_and_dciodvfy_finds_no_error(
    tmp_path: Path, ct: SeriesInput, seg_result: Segmentation, seg: Dataset
) -> None:
    sr = build_sr(ct, report(seg_result), prov(), index=1, segs={0: seg})
    kos = build_kos([seg, sr], prov(), title=codes.DCM.OfInterest, series_number=9002)
    assert validate(kos) == []
    path = tmp_path / "kos.dcm"
    kos.save_as(path, enforce_file_format=True)
    verify(path, "KOS")
    back = hd.ko.KeyObjectSelectionDocument.from_dataset(pydicom.dcmread(path))
    listed = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in back.ContentSequence
        if "ReferencedSOPSequence" in item
    }
    assert listed == {seg.SOPInstanceUID, sr.SOPInstanceUID}
    assert code(hd.sr.CodedConcept.from_dataset(back.ConceptNameCodeSequence[0])) == code(codes.DCM.OfInterest)
    assert back.StudyInstanceUID == ct.first.StudyInstanceUID
    # The same outputs make the same KOS (a retry re-sends it); other outputs another one.
    assert build_kos([sr, seg], prov()).SOPInstanceUID == kos.SOPInstanceUID
    assert build_kos([seg], prov()).SOPInstanceUID != kos.SOPInstanceUID


def test_a_report_returned_before_its_segmentation_references_it(tmp_path: Path) -> None:
    """The node builds every SEG of a job before its SRs, and keeps the outputs in the order they were returned."""
    from helpers import TEST_PLUGINS

    from node.plugins.worker import StepSpec, WorkSpec, run

    spec = WorkSpec(
        files=[str(f) for f in series_files(CT)],
        out_dir=str(tmp_path),
        job_key=("order", 1, "r", 0),
        steps=[StepSpec("report-first", "measure_plugins:report_first", {})],
    )
    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        result = run(spec)
    finally:
        sys.path.remove(str(TEST_PLUGINS))
    assert result.ok, result.error
    assert [o.kind for o in result.outputs] == ["SR", "SEG"]
    sr, seg = (pydicom.dcmread(o.file) for o in result.outputs)
    back = hd.sr.MeasurementReport.from_sequence(hd.sr.Comprehensive3DSR.from_dataset(sr).content)
    (group,) = back.get_volumetric_roi_measurement_groups()
    assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
    assert [m.value for m in group.get_measurements()] == [3 * 50 * 50]


def _run(tmp_path: Path, steps: list[tuple[str, str]], **spec: object) -> object:
    """The node's worker on the CT with the test plugins ``steps`` ((name, module:function), ...)."""
    from helpers import TEST_PLUGINS

    from node.plugins.worker import StepSpec, WorkSpec, run

    work = WorkSpec(
        files=[str(f) for f in series_files(CT)],
        out_dir=str(tmp_path),
        job_key=("twins", 1, "r", 0),
        steps=[StepSpec(name, target, {}) for name, target in steps],
        **spec,  # type: ignore[arg-type]
    )
    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        return run(work)
    finally:
        sys.path.remove(str(TEST_PLUGINS))


KEY_OBJECTS = {"value": "113000", "scheme": "DCM", "meaning": "Of Interest"}


def _listed(kos: Dataset) -> set[str]:
    return {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
        for item in kos.ContentSequence
        if "ReferencedSOPSequence" in item
    }


def test_destinations_of_the_binary_seg_get_an_sr_and_a_kos_that_refer_to_it(tmp_path: Path) -> None:
    """A destination that refuses Label Map SEG gets the BINARY copy: the SR and KOS it gets must name that copy,
    not a label map it never received (the twins are routed as the copy is: twin_of)."""
    result = _run(
        tmp_path,
        [("label-boxes", "measure_plugins:label_boxes"), ("measure", "measure_plugins:measure")],
        labelmap_as_binary=True,
        key_objects=KEY_OBJECTS,
    )
    assert result.ok, result.error  # type: ignore[attr-defined]
    outputs = result.outputs  # type: ignore[attr-defined]
    assert [(o.kind, bool(o.twin_of)) for o in outputs] == [
        ("SEG", False),
        ("SEG", True),
        ("SR", False),
        ("SR", True),
        ("KOS", False),
        ("KOS", True),
    ]
    label_map, binary, sr, sr_twin, kos, kos_twin = outputs
    assert (binary.twin_of, sr_twin.twin_of, kos_twin.twin_of) == (
        label_map.sop_instance_uid,
        sr.sop_instance_uid,
        kos.sop_instance_uid,
    )

    def segments(path: str) -> list[tuple[str, list[int]]]:
        back = hd.sr.MeasurementReport.from_sequence(
            hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(path)).content
        )
        return [
            (g.referenced_segment.referenced_sop_instance_uid, g.referenced_segment.referenced_segment_numbers)
            for g in back.get_volumetric_roi_measurement_groups()
        ]

    assert segments(sr.file) == [(label_map.sop_instance_uid, [1]), (label_map.sop_instance_uid, [2])]
    assert segments(sr_twin.file) == [(binary.sop_instance_uid, [1]), (binary.sop_instance_uid, [2])]
    assert _listed(pydicom.dcmread(kos.file)) == {label_map.sop_instance_uid, sr.sop_instance_uid}
    assert _listed(pydicom.dcmread(kos_twin.file)) == {binary.sop_instance_uid, sr_twin.sop_instance_uid}
    # What a destination of the copies gets is valid throughout (the label map side has dicom3tools' known
    # Label Map SEG gap, see test_a_label_map_seg_is_referenced_through_its_source_series).
    verify(Path(sr_twin.file), "SR on the BINARY copy")
    verify(Path(kos_twin.file), "KOS of the BINARY copies")
    # The selection's observer is the plugin of the last step, the one that made the report.
    observer = {str(i.get("TextValue", "")) for i in _walk_items(pydicom.dcmread(kos.file)) if "TextValue" in i}
    assert "measure" in observer and "label-boxes" not in observer


def test_no_key_object_selection_when_a_retry_may_still_make_outputs(tmp_path: Path) -> None:
    """A retry that makes the missing outputs writes the KOS then: one selection, not one per attempt."""
    steps = [("label-boxes", "measure_plugins:label_boxes"), ("busy", "measure_plugins:busy_after_one")]
    result = _run(tmp_path, steps, key_objects=KEY_OBJECTS)
    assert not result.ok and result.retryable  # type: ignore[attr-defined]
    assert [o.kind for o in result.outputs] == ["SEG"]  # type: ignore[attr-defined]
    assert any("no Key Object Selection" in n for n in result.notes)  # type: ignore[attr-defined]


def test_evidence_series_outside_the_job_says_what_to_change(ct: SeriesInput) -> None:
    m = Measurements(
        [MeasurementGroup("X", codes.SCT.Bone, [Measurement(codes.SCT.Volume, 1.0, ML)])], evidence_series=["1.2.3"]
    )
    with pytest.raises(OutputError) as e:
        build_sr(ct, m, prov(), index=0)
    assert "evidence_series names 1.2.3, which is not among the job's inputs or priors" in str(e.value)
