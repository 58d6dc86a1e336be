"""The IOD check before dispatch (node.derive.validate), on the objects the node really makes.

Every output kind is built from the real CT head and sagittal MR series the way the node builds it,
checked by the validator and by dciodvfy (dicom3tools), then damaged one attribute at a time: each
damage must give exactly the problem that names it, and dciodvfy must name the same attribute.
``repair`` must fix what the standard lets it fix (an anonymiser's damage copied into a derived
series, invalid optional values) so that both checks pass again, and leave what it may not touch.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from node.derive import validate as validation  # noqa: E402
from node.derive.common import Provenance  # noqa: E402
from node.derive.image import build_image_series, build_parametric_map  # noqa: E402
from node.derive.sc import build_sc  # noqa: E402
from node.derive.seg import build_seg  # noqa: E402
from node.derive.validate import Problem, TablesUnavailable, dciodvfy, repair, validate  # noqa: E402
from node.plugins.api import Images, Segment, Segmentation, SeriesInput, Volume, codes  # noqa: E402
from node.plugins.series import load_series  # noqa: E402
from tests.helpers import series_files  # noqa: E402
from tests.helpers.dciodvfy import LABELMAP_TOOL_ERRORS  # noqa: E402
from tests.helpers.variants import ANONYMISED_AWAY, make_files  # noqa: E402

pytestmark = [
    # The real CT's Patient Name is "HEAD"; highdicom warns on every copy of it.
    pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning"),
]

SERIES = {"ct": "ct-head-philips-5mm", "mr": "mr-t1-sag-siemens"}
KINDS = ("seg binary", "seg labelmap", "seg fractional", "sc grey", "sc rgb", "image", "parametric map")
LABELS = [f"{s} {k}" for s in SERIES for k in KINDS]


def _provenance(series: SeriesInput) -> Provenance:
    return Provenance(
        job_key=(str(series.first.SeriesInstanceUID), 1, "validate", 0),
        algorithm="validate-test",
        algorithm_version="1.0",
        station_name="NODE_TEST",
        parameters={"threshold": "90%"},
    )


def build_all(series: SeriesInput) -> dict[str, list[Dataset]]:
    """Each kind of output the node makes, from one real series, as the builders make it."""
    prov = _provenance(series)
    voxels = series.rescaled().astype(np.float32)
    bright = voxels > np.percentile(voxels, 90)
    brighter = voxels > np.percentile(voxels, 97)
    segments = [
        Segment("Bright", codes.SCT.Tissue, codes.SCT.Bone),
        Segment("Brightest", codes.SCT.MorphologicallyAbnormalStructure, codes.SCT.Lesion),
    ]
    labels = bright.astype(np.uint8) + brighter.astype(np.uint8)
    fraction = np.clip((voxels - voxels.min()) / np.ptp(voxels), 0, 1)[..., None] * bright[..., None]
    grey = (np.clip((voxels[:3] - voxels.min()) / np.ptp(voxels), 0, 1) * 255).astype(np.uint8)
    return {
        "seg binary": [build_seg(series, Segmentation(np.stack([bright, brighter], -1), segments, "binary"), prov)],
        "seg labelmap": [build_seg(series, Segmentation(labels, segments, "labelmap"), prov, index=1)],
        "seg fractional": [build_seg(series, Segmentation(fraction, segments[:1], "fractional"), prov, index=2)],
        "sc grey": build_sc(series, Images(grey, [0, 1, 2]), prov, index=3),
        "sc rgb": build_sc(series, Images(np.stack([grey] * 3, -1), [0, 1, 2]), prov, index=4),
        "image": build_image_series(series, Volume(voxels * 0.5 + 3, name="halved"), prov, index=5)[0],
        "parametric map": [build_parametric_map(series, Volume(voxels, kind="parametric-map"), prov, index=6)],
    }


@pytest.fixture(scope="module")
def sources() -> dict[str, SeriesInput]:
    return {name: load_series(series_files(folder)) for name, folder in SERIES.items()}


@pytest.fixture(scope="module")
def outputs(sources: dict[str, SeriesInput]) -> dict[str, list[Dataset]]:
    return {f"{name} {kind}": dss for name, series in sources.items() for kind, dss in build_all(series).items()}


@pytest.fixture(scope="module", autouse=True)
def _dciodvfy_installed() -> None:
    if validation.dciodvfy_path() is None:
        pytest.fail("dciodvfy is not installed (Debian package dicom3tools; scripts/test.sh installs it)")


def tool_errors(ds: Dataset) -> list[str]:
    """dciodvfy's errors for ``ds``, without those of its missing Label Map SEG support."""
    errors = dciodvfy(ds)
    if ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.7":
        errors = [e for e in errors if e not in LABELMAP_TOOL_ERRORS]
    return errors


# -- valid objects -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("label", LABELS)
def test_what_the_node_makes_is_valid_and_dciodvfy_agrees(outputs: dict[str, list[Dataset]], label: str) -> None:
    datasets = outputs[label]
    problems = {i: [str(p) for p in validate(ds)] for i, ds in enumerate(datasets)}
    assert not any(problems.values()), problems
    for ds in {id(d): d for d in (datasets[0], datasets[-1])}.values():
        assert tool_errors(ds) == []


@pytest.mark.parametrize("label", ["ct image", "mr image", "ct seg binary", "mr sc rgb", "ct parametric map"])
def test_repair_keeps_valid_objects_valid_and_only_drops_empty_optional_attributes(
    outputs: dict[str, list[Dataset]], sources: dict[str, SeriesInput], label: str
) -> None:
    ds = copy.deepcopy(outputs[label][0])
    before = {e.tag for e in ds}
    changes = repair(ds, sources[label.split()[0]].first)
    assert all(c.endswith("empty -> dropped") and "(Type 3," in c for c in changes), changes
    assert len(before - {e.tag for e in ds}) == len([c for c in changes if "[" not in c.split(" ")[0]])
    assert validate(ds) == [] and tool_errors(ds) == []


# -- one damage, one problem ------------------------------------------------------------------------------


def _set(keyword: str, value: object) -> Callable[[Dataset], None]:
    return lambda ds: setattr(ds, keyword, value)


def _remove(keyword: str) -> Callable[[Dataset], None]:
    return lambda ds: delattr(ds, keyword)


def _remove_segment_label(ds: Dataset) -> None:
    del ds.SegmentSequence[0].SegmentLabel


#: damage -> (output, how, (keyword, tag, module, type, path), what the problem says)
DAMAGE: dict[str, tuple[str, Callable[[Dataset], None], tuple[str, str, str, str, str], str]] = {
    "type 1 removed": (
        "mr image",
        _remove("ScanningSequence"),
        ("ScanningSequence", "(0018,0020)", "mr-image", "1", ""),
        "missing",
    ),
    "type 1 emptied": (
        "mr image",
        _set("SequenceVariant", None),
        ("SequenceVariant", "(0018,0021)", "mr-image", "1", ""),
        "empty",
    ),
    "type 1 removed in an item": (
        "ct seg binary",
        _remove_segment_label,
        ("SegmentLabel", "(0062,0005)", "segmentation-image", "1", "SegmentSequence[0]"),
        "missing",
    ),
    "type 1 emptied (SEG)": (
        "mr seg fractional",
        _set("ContentLabel", ""),
        ("ContentLabel", "(0070,0080)", "segmentation-image", "1", ""),
        "empty",
    ),
    "type 1 removed (SC)": (
        "ct sc grey",
        _remove("ConversionType"),
        ("ConversionType", "(0008,0064)", "sc-equipment", "1", ""),
        "missing",
    ),
    "type 2 removed": (
        "ct image",
        _remove("StudyDate"),
        ("StudyDate", "(0008,0020)", "general-study", "2", ""),
        "missing",
    ),
    "type 2 removed (map)": (
        "ct parametric map",
        _remove("PositionReferenceIndicator"),
        ("PositionReferenceIndicator", "(0020,1040)", "frame-of-reference", "2", ""),
        "missing",
    ),
    "type 2C removed where its condition holds": (
        "mr image",
        _remove("RepetitionTime"),
        ("RepetitionTime", "(0018,0080)", "mr-image", "2C", ""),
        "missing (required unless Scanning Sequence is EP",
    ),
    "DS too long": (
        "ct image",
        _set("SliceThickness", "1.234567890123456789"),
        ("SliceThickness", "(0018,0050)", "image-plane", "2", ""),
        "The value length (20) exceeds the maximum length of 16 allowed for VR DS",
    ),
    "IS not an integer": (
        "mr image",
        _set("InstanceNumber", "1.5"),
        ("InstanceNumber", "(0020,0013)", "general-image", "2", ""),
        "Invalid value for VR IS",
    ),
    "UI with a leading zero": (
        "ct sc rgb",
        _set("SeriesInstanceUID", "1.2.826.0.01"),
        ("SeriesInstanceUID", "(0020,000E)", "general-series", "1", ""),
        "Invalid value for VR UI",
    ),
    "CS lower case": (
        "mr parametric map",
        _set("PatientSex", "male"),
        ("PatientSex", "(0010,0040)", "patient", "2", ""),
        "Invalid value for VR CS",
    ),
    "CS too long": (
        "ct image",
        _set("ImageType", ["DERIVED", "SECONDARY", "AXIAL", "RECONSTRUCTED_FROM_RAW"]),
        ("ImageType", "(0008,0008)", "ct-image", "1", ""),
        "The value length (22) exceeds the maximum length of 16 allowed for VR CS",
    ),
    "VM too small": (
        "mr image",
        _set("PixelSpacing", [0.9]),
        ("PixelSpacing", "(0028,0030)", "image-plane", "1", ""),
        "1 value(s), the data dictionary allows VM 2",
    ),
}


def _tool_names(error: str, keyword: str, tag: str) -> bool:
    """Whether a dciodvfy error line is about this attribute (it names it by keyword or by tag)."""
    group, element = tag.strip("()").lower().split(",")
    return f"<{keyword}>" in error or f"(0x{group},0x{element})" in error


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_damage_gives_exactly_the_problem_that_names_it(outputs: dict[str, list[Dataset]], damage: str) -> None:
    label, harm, expected, what = DAMAGE[damage]
    ds = copy.deepcopy(outputs[label][0])
    harm(ds)
    problems = validate(ds)
    assert [(p.keyword, p.tag, p.module, p.type, p.path) for p in problems] == [expected], [str(p) for p in problems]
    assert what in problems[0].what
    keyword, tag = expected[:2]
    errors = tool_errors(ds)
    assert any(_tool_names(e, keyword, tag) for e in errors), f"dciodvfy disagrees: {errors}"


def test_a_problem_reads_as_one_line_naming_attribute_tag_type_and_module(outputs: dict[str, list[Dataset]]) -> None:
    ds = copy.deepcopy(outputs["ct seg binary"][0])
    _remove_segment_label(ds)
    ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness = "0.12345678901234567"
    lines = [str(p) for p in validate(ds)]
    assert lines == [
        "SegmentSequence[0].SegmentLabel (0062,0005) (Type 1 in module segmentation-image): missing",
        "SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0].SliceThickness (0018,0050) (Type 1C in module "
        "segmentation-multi-frame-functional-groups): value '0.12345678901234567': The value length (19) exceeds "
        "the maximum length of 16 allowed for VR DS.",
    ]


def test_an_unknown_sop_class_is_a_problem_not_a_pass(outputs: dict[str, list[Dataset]]) -> None:
    ds = copy.deepcopy(outputs["ct sc grey"][0])
    ds.SOPClassUID = "1.2.826.0.1.3680043.10.1431.99"
    assert [str(p) for p in validate(ds)] == [
        "SOPClassUID (0008,0016) (Type 1 in module sop-common): 1.2.826.0.1.3680043.10.1431.99 is no IOD's"
    ]


def test_highdicom_without_its_tables_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from highdicom import _standard_utils

    monkeypatch.delattr(_standard_utils, "get_iod_module_map")
    with pytest.raises(TablesUnavailable, match=r"highdicom>=0.28,<0.29 or adapt node/derive/validate.py:_tables"):
        validation._tables()


# -- repairs -----------------------------------------------------------------------------------------------


def test_repair_fixes_an_anonymisers_damage_copied_into_a_derived_mr(outputs: dict[str, list[Dataset]]) -> None:
    """What an anonymiser drops (Type 1 and 2 of MR Image among it), missing from a derived slice: repaired
    without a source (nothing to copy), the slice passes the validator and dciodvfy."""
    ds = copy.deepcopy(outputs["mr image"][0])
    for keyword in ANONYMISED_AWAY:
        ds.pop(keyword, None)
    missing = {(p.keyword, p.type) for p in validate(ds)}
    assert {
        ("ScanningSequence", "1"),
        ("SequenceVariant", "1"),
        ("StudyDate", "2"),
        ("PatientSex", "2"),
        ("EchoTime", "2"),
        ("SeriesNumber", "2"),
    } <= missing
    changes = repair(ds, None)
    assert validate(ds) == []
    assert tool_errors(ds) == []
    assert (ds.ScanningSequence, ds.SequenceVariant) == ("RM", "NONE")
    for keyword in ("StudyDate", "PatientSex", "PatientBirthDate", "EchoTime", "PatientPosition", "RepetitionTime"):
        assert keyword in ds and not ds[keyword].value, keyword  # present, empty: unknown
    assert (
        "ScanningSequence (0018,0020) (Type 1, module mr-image): missing -> set to 'RM' (Research Mode: the "
        "source does not say how it was acquired)" in changes
    )
    assert "StudyDate (0008,0020) (Type 2, module general-study): missing -> added empty (unknown)" in changes
    assert len(changes) >= len(missing)


def test_repair_copies_patient_and_study_attributes_only_from_a_source_of_the_same_study(
    outputs: dict[str, list[Dataset]], sources: dict[str, SeriesInput]
) -> None:
    source = sources["ct"].first
    ds = copy.deepcopy(outputs["ct seg binary"][0])
    del ds.StudyDate, ds.PatientSex, ds.PatientBirthDate
    ds.StudyTime = None  # Type 2: present and empty is valid, so kept as it is
    changes = repair(ds, source)
    assert (ds.StudyDate, ds.PatientSex) == (source.StudyDate, source.PatientSex)
    assert not ds.PatientBirthDate and not source.PatientBirthDate  # the source does not know it either
    assert not ds.StudyTime
    assert (
        f"StudyDate (0008,0020) (Type 2, module general-study): missing -> copied from the source "
        f"('{source.StudyDate}')" in changes
    )
    other = copy.deepcopy(source)
    other.StudyInstanceUID = "1.2.826.0.1.3680043.10.1431.98"
    ds = copy.deepcopy(outputs["ct seg binary"][0])
    del ds.StudyDate
    repair(ds, other)
    assert "StudyDate" in ds and not ds.StudyDate and validate(ds) == []


def test_repair_drops_invalid_optional_values_empties_type_2_and_never_touches_identity(
    outputs: dict[str, list[Dataset]], sources: dict[str, SeriesInput]
) -> None:
    ds = copy.deepcopy(outputs["mr image"][0])
    ds.PatientWeight = "70.0000000000000000001"  # Type 3, DS too long
    ds.BodyPartExamined = ""  # Type 3, empty
    ds.SliceThickness = "4.79999999999999999"  # Type 2, DS too long
    ds.PatientID = "X" * 70  # Type 2, LO too long: but it files the object under its patient
    changes = repair(ds, sources["mr"].first)
    assert "PatientWeight" not in ds and "BodyPartExamined" not in ds
    assert "SliceThickness" in ds and not ds.SliceThickness
    assert ds.PatientID == "X" * 70
    assert any(
        c.startswith("PatientWeight (0010,1030) (Type 3, module patient-study): value '70.00")
        and c.endswith("-> dropped")
        for c in changes
    )
    assert any(
        c.startswith("SliceThickness (0018,0050) (Type 2, module image-plane)")
        and c.endswith("-> emptied (Type 2: unknown)")
        for c in changes
    )
    assert [(p.keyword, p.type) for p in validate(ds)] == [("PatientID", "2")]


def test_repair_leaves_type_1_values_it_cannot_know(outputs: dict[str, list[Dataset]]) -> None:
    ds = copy.deepcopy(outputs["ct image"][0])
    del ds.ImageOrientationPatient  # geometry: never guessed
    ds.SeriesInstanceUID = "1.2.826.0.01"
    assert not any("ImageOrientationPatient" in c or "SeriesInstanceUID" in c for c in repair(ds, None))
    assert {p.keyword for p in validate(ds)} == {"ImageOrientationPatient", "SeriesInstanceUID"}


def test_a_derived_series_from_an_anonymised_real_mr_is_valid_once_repaired(tmp_path: Path) -> None:
    """The chain the plugin worker runs: a damaged real source, the builder, repair, then both checks."""
    files = make_files(tmp_path / "anon", "mr-sag", "anonymised")
    series = load_series(files)
    datasets, _ = build_image_series(series, Volume(series.rescaled().astype(np.float32) + 1), _provenance(series))
    for ds in datasets:
        repair(ds, series.datasets[0])
        assert [str(p) for p in validate(ds)] == []
    for ds in (datasets[0], datasets[-1]):
        assert tool_errors(ds) == []


def test_dciodvfy_returns_error_lines_only(tmp_path: Path, outputs: dict[str, list[Dataset]]) -> None:
    ds = copy.deepcopy(outputs["ct image"][0])
    del ds.StudyDate
    path = tmp_path / "damaged.dcm"
    ds.save_as(path, enforce_file_format=True)
    errors = dciodvfy(path)
    assert errors and all(e.startswith("Error") for e in errors)
    assert "Error - Missing attribute Type 2 Required Element=<StudyDate> Module=<GeneralStudy>" in errors
    assert pydicom.dcmread(path).SOPInstanceUID == ds.SOPInstanceUID  # the file is left as it was


def test_problem_is_a_value() -> None:
    p = Problem("StudyDate", "(0008,0020)", "general-study", "2", "missing")
    assert str(p) == "StudyDate (0008,0020) (Type 2 in module general-study): missing"
    assert p == Problem("StudyDate", "(0008,0020)", "general-study", "2", "missing")
