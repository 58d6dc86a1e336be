"""A plugin's Measurements in a running node: threshold-seg, then a plugin that measures its segments.

The node (a subprocess, its real plugin runtime) writes the SEG, an SR that references it and,
with ``key_objects = true``, a Key Object Selection listing both; all three reach a DCMTK storescp,
dciodvfy finds no error in them, and the SR read back holds what the plugin computed.
"""

from __future__ import annotations

import os
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from helpers import TEST_PLUGINS, NodeProcess, StoreSCP, series_files, storescu, wait_for
from helpers.dciodvfy import verify

from node.plugins.api import Segmentation
from node.plugins.builtin.threshold import Params, threshold_seg
from node.plugins.series import load_series

pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")

CT = "ct-head-philips-5mm"
KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "KOS",
}


def expected() -> dict[str, list[tuple[str, float, str]]]:
    """What the measure plugin computes on the series, run here in-process: tracking id -> (name, value, unit)."""
    import sys

    sys.path.insert(0, str(TEST_PLUGINS))
    try:
        from measure_plugins import measure
    finally:
        sys.path.remove(str(TEST_PLUGINS))
    from node.plugins.api import NoParams

    series = load_series(series_files(CT))
    series.previous = [r for r in threshold_seg(series, Params()) if isinstance(r, Segmentation)]
    report = measure(series, NoParams())
    return {g.tracking_id: [(m.name.meaning, m.value, m.unit.value) for m in g.measurements] for g in report.groups}


@pytest.fixture
def scp(tmp_path: Path):
    s = StoreSCP(tmp_path / "scp-out").start()
    yield s
    s.stop()


def test_a_seg_an_sr_that_references_it_and_a_key_object_selection_reach_the_destination(
    tmp_path: Path, scp: StoreSCP
) -> None:
    node = NodeProcess(
        tmp_path / "node",
        extra_config=f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[plugins.local]
measure = "measure_plugins:measure"
[[rules]]
name = "measure"
[[rules.actions]]
type = "plugin"
plugins = [{{ name = "threshold-seg" }}, {{ name = "measure" }}]
key_objects = true
send_to = ["scp"]
""",
    )
    node.env = {"PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])}
    node.start()
    try:
        assert storescu(node.port, series_files(CT)).returncode == 0
        wait_for(
            lambda: node.query("select state from job") in ([("succeeded",)], [("failed",)]), 120, "the job to end"
        )
        ((state, result, error),) = node.query("select state, result, last_error from job")
        assert state == "succeeded", error
        assert "1 SEG, 1 SR, 1 KOS" in result, result
        node.wait_delivered(3)
        received = {KINDS[pydicom.dcmread(f).SOPClassUID]: f for f in scp.received()}
        assert sorted(received) == ["KOS", "SEG", "SR"]
        for kind, f in received.items():
            verify(f, f"{kind} from a job")
        seg = pydicom.dcmread(received["SEG"])
        sr = hd.sr.Comprehensive3DSR.from_dataset(pydicom.dcmread(received["SR"]))
        report = hd.sr.MeasurementReport.from_sequence(sr.content)
        got = {
            g.tracking_identifier: [(m.name.meaning, m.value, m.unit.value) for m in g.get_measurements()]
            for g in report.get_volumetric_roi_measurement_groups()
        }
        assert got == expected()
        (group,) = report.get_volumetric_roi_measurement_groups()
        assert group.referenced_segment.referenced_sop_instance_uid == seg.SOPInstanceUID
        kos = pydicom.dcmread(received["KOS"])
        listed = {
            item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
            for item in kos.ContentSequence
            if "ReferencedSOPSequence" in item
        }
        assert listed == {seg.SOPInstanceUID, sr.SOPInstanceUID}
        # All three are the job's outputs in the index, filed in the source study.
        rows = node.query("select sop_instance_uid from instance where job_fk is not null")
        assert {r[0] for r in rows} == {seg.SOPInstanceUID, sr.SOPInstanceUID, kos.SOPInstanceUID}
        assert {pydicom.dcmread(f).StudyInstanceUID for f in received.values()} == {seg.StudyInstanceUID}
    finally:
        node.stop()


def test_a_destination_that_gets_the_binary_seg_gets_an_sr_and_kos_that_refer_to_it(
    tmp_path: Path, scp: StoreSCP
) -> None:
    """storescp (DCMTK 3.6.7) refuses Label Map SEG, Orthanc takes it: each gets a SEG, an SR measuring that
    SEG and a KOS listing what it got; nothing either holds refers to an object it never received."""
    import io

    from helpers.orthanc import Orthanc

    with Orthanc(tmp_path / "orthanc") as orthanc:
        node = NodeProcess(
            tmp_path / "node",
            extra_config=f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
{orthanc.destination("pacs")}
[plugins.local]
label-boxes = "measure_plugins:label_boxes"
measure = "measure_plugins:measure"
[[rules]]
name = "measure"
[[rules.actions]]
type = "plugin"
plugins = [{{ name = "label-boxes" }}, {{ name = "measure" }}]
key_objects = true
send_to = ["scp", "pacs"]
""",
        )
        node.env = {"PYTHONPATH": os.pathsep.join([str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])])}
        node.start()
        try:
            assert storescu(node.port, series_files(CT)).returncode == 0
            wait_for(
                lambda: node.query("select state from job") in ([("succeeded",)], [("failed",)]), 120, "the job to end"
            )
            ((state, result, error),) = node.query("select state, result, last_error from job")
            assert state == "succeeded", error
            node.wait_delivered(6)
            at_scp = [pydicom.dcmread(f) for f in scp.received()]
            at_pacs = [pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{i}/file"))) for i in orthanc.instances()]
            for kind, got in (("BINARY", at_scp), ("LABELMAP", at_pacs)):
                by_kind = {KINDS.get(ds.SOPClassUID, "label map SEG"): ds for ds in got}
                assert sorted(by_kind) == (["KOS", "SEG", "SR"] if kind == "BINARY" else ["KOS", "SR", "label map SEG"])
                seg = by_kind.get("SEG") or by_kind["label map SEG"]
                assert seg.SegmentationType == kind
                report = hd.sr.MeasurementReport.from_sequence(
                    hd.sr.Comprehensive3DSR.from_dataset(by_kind["SR"]).content
                )
                refs = {
                    g.referenced_segment.referenced_sop_instance_uid
                    for g in report.get_volumetric_roi_measurement_groups()
                }
                assert refs == {seg.SOPInstanceUID}
                listed = {
                    item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                    for item in by_kind["KOS"].ContentSequence
                    if "ReferencedSOPSequence" in item
                }
                assert listed == {seg.SOPInstanceUID, by_kind["SR"].SOPInstanceUID}
            for f in scp.received():
                verify(f, "what the destination of BINARY copies got")
        finally:
            node.stop()
