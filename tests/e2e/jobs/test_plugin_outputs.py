"""What a plugin job keeps and where its outputs go: a node in a subprocess, real peers downstream.

- A chain whose later step fails keeps what the earlier steps made and sends it; the job fails naming the step.
- A label map SEG reaches a PACS that refuses Label Map Segmentation Storage (DCMTK 3.6.7's storescp) as a
  BINARY SEG with the same segments, while a PACS that accepts it (Orthanc, told to take SOP classes its
  DCMTK does not know) gets the label map; the copy is in the audit trail.
"""

from __future__ import annotations

import io
import os
import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import TEST_PLUGINS, NodeProcess, StoreSCP, series_files, storescu, wait_for
from helpers.orthanc import Orthanc

from node.plugins.series import load_series

HERE = Path(__file__).resolve().parent
CT = "ct-head-philips-5mm"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"

pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")


def job_rows(node: NodeProcess) -> list[tuple]:
    return node.query("select id, state, result, last_error from job order by id")


def ended(node: NodeProcess, count: int) -> bool:
    rows = job_rows(node)
    return len(rows) == count and all(r[1] in ("succeeded", "failed") for r in rows)


@pytest.fixture
def scp(tmp_path: Path):
    s = StoreSCP(tmp_path / "scp-out").start()
    yield s
    s.stop()


def test_a_failed_step_keeps_and_sends_what_the_earlier_steps_made(tmp_path: Path, scp: StoreSCP) -> None:
    # threshold-seg finds nothing above 5000 HU (an empty segment: a valid, empty SEG); distance-map then
    # has no surface to measure from and fails.
    node = NodeProcess(
        tmp_path / "node",
        extra_config=f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[[rules]]
name = "chain"
[[rules.actions]]
type = "plugin"
plugins = [{{ name = "threshold-seg", params = {{ segments = [{{ label = "Metal", lower = 5000, category = "Tissue", type = "Bone" }}] }} }}, {{ name = "distance-map" }}]
send_to = ["scp"]
""",
    )
    node.start()
    try:
        assert storescu(node.port, series_files(CT)).returncode == 0
        wait_for(lambda: ended(node, 1), 120, "the chain's job to end")
        ((job_id, state, result, error),) = job_rows(node)
        assert state == "failed"
        assert "running plugin distance-map" in error and "segment 1 is empty" in error, error
        assert "kept 1 output(s)" in error and "queued 1 instance(s) for scp" in error, error
        node.wait_delivered(1)
        (seg_file,) = scp.received()
        ds = pydicom.dcmread(seg_file)
        assert ds.SOPClassUID == SEG and ds.SegmentSequence[0].SegmentLabel == "Metal"
        rows = node.query("select sop_instance_uid from instance where job_fk = ?", job_id)
        assert rows == [(ds.SOPInstanceUID,)]
    finally:
        node.stop()


def test_a_label_map_seg_goes_as_binary_where_the_pacs_refuses_it(tmp_path: Path, scp: StoreSCP) -> None:
    with Orthanc(tmp_path / "orthanc") as orthanc:
        node = NodeProcess(
            tmp_path / "node",
            extra_config=f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
{orthanc.destination("pacs")}
[plugins.local]
two-labels = "outputs_plugins:two_labels"
[[rules]]
name = "labels"
[[rules.actions]]
type = "plugin"
plugin = "two-labels"
send_to = ["scp", "pacs"]
""",
        )
        node.env = {"PYTHONPATH": os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
        node.start()
        try:
            files = series_files(CT)
            assert storescu(node.port, files).returncode == 0
            wait_for(lambda: ended(node, 1), 120, "the label map job to end")
            ((_, state, result, error),) = job_rows(node)
            assert state == "succeeded", error
            assert "1 label map SEG(s) also written as BINARY SEG for scp: it does not accept Label Map" in result
            node.wait_delivered(2)
            # storescp (DCMTK 3.6.7) holds the BINARY copy, and only that
            (got,) = scp.received()
            binary = pydicom.dcmread(got)
            assert binary.SOPClassUID == SEG and binary.SegmentationType == "BINARY"
            # Orthanc holds the label map, and only that
            (oid,) = orthanc.instances()
            label_map = pydicom.dcmread(io.BytesIO(orthanc.get(f"/instances/{oid}/file")))
            assert label_map.SOPClassUID == LABEL_MAP_SEG and label_map.SegmentationType == "LABELMAP"
            assert binary.SOPInstanceUID != label_map.SOPInstanceUID
            # The same segments, voxel for voxel
            from outputs_plugins import label_map as expected_labels

            series = load_series(files)
            want = expected_labels(series)
            uids = [str(d.SOPInstanceUID) for d in series.datasets]
            from_binary = hd.seg.segread(got).get_pixels_by_source_instance(uids, assert_missing_frames_are_empty=True)
            np.testing.assert_array_equal(from_binary[..., 0], want == 1)
            np.testing.assert_array_equal(from_binary[..., 1], want == 2)
            assert [s.SegmentLabel for s in binary.SegmentSequence] == ["Bone", "Soft"]
            # Lineage: both are the job's outputs; the copy says what it is
            details = node.query("select sop_instance_uid, detail from audit_event where kind = 'output_produced'")
            assert {u for u, _ in details} == {binary.SOPInstanceUID, label_map.SOPInstanceUID}
            (copy_detail,) = [d for u, d in details if u == binary.SOPInstanceUID]
            assert f"BINARY copy of label map SEG {label_map.SOPInstanceUID}" in copy_detail
        finally:
            node.stop()


def test_an_invalid_output_fails_its_job_with_the_validators_message_and_is_not_written(tmp_path: Path) -> None:
    from node.plugins.worker import StepSpec, WorkSpec, run

    out = tmp_path / "out"
    out.mkdir()
    spec = WorkSpec(
        files=[str(f) for f in series_files(CT)],
        out_dir=str(out),
        job_key=("x", 1, "r", 0),
        steps=[StepSpec("bad-label", "outputs_plugins:bad_label", {})],
    )
    sys.path.insert(0, str(HERE))
    try:
        result = run(spec)
    finally:
        sys.path.remove(str(HERE))
    assert not result.ok
    assert (
        "building output 2 of 2 (bad-label): the SEG is not valid DICOM, so it was not stored or sent" in result.error
    )
    assert "SegmentLabel (0062,0005) (Type 1 in module segmentation-image): 2 value(s)" in result.error
    # The valid first SEG is kept; nothing of the second was written.
    (kept,) = result.outputs
    assert sorted(p.name for p in out.iterdir()) == [Path(kept.file).name]
    assert pydicom.dcmread(kept.file).SegmentSequence[0].SegmentLabel == "Bone"


def test_a_patient_name_invalid_in_the_source_is_kept_so_the_result_files_with_it(tmp_path: Path) -> None:
    from helpers import make_ct_series

    from node.plugins.worker import StepSpec, WorkSpec, run

    # Five "=" groups: PN allows three. The PACS holds the source under this name; the SEG must match it.
    name = "A^B=C^D=E^F=G=H"
    files = make_ct_series(tmp_path / "src", 3, patient_name=name)
    out = tmp_path / "out"
    out.mkdir()
    spec = WorkSpec(
        files=[str(f) for f in files],
        out_dir=str(out),
        job_key=("pn", 1, "r", 0),
        steps=[StepSpec("threshold-seg", "node.plugins.builtin.threshold:threshold_seg", {})],
    )
    result = run(spec)
    assert result.ok, result.error
    (seg,) = result.outputs
    assert str(pydicom.dcmread(seg.file).PatientName) == name
    assert any("PatientName kept as the source has it" in n for n in result.notes), result.notes


def test_a_retried_chain_sends_what_it_kept_exactly_once(tmp_path: Path, scp: StoreSCP) -> None:
    """Step 2 fails retryably on attempt 1 (after step 1's SEG was kept and queued) and succeeds on attempt 2."""
    plugins_dir = TEST_PLUGINS
    marker = tmp_path / "flaky-marker"
    node = NodeProcess(
        tmp_path / "node",
        extra_config=f"""
[tracker]
stable_after = 1
[jobs]
retry_delay = 0.5
{scp.destination("scp")}
[plugins.local]
flaky = "faulty_plugins:flaky"
[[rules]]
name = "chain"
max_attempts = 2
[[rules.actions]]
type = "plugin"
plugins = [{{ name = "threshold-seg" }}, {{ name = "flaky", params = {{ marker = "{marker}" }} }}]
send_to = ["scp"]
""",
    )
    node.env = {"PYTHONPATH": os.pathsep.join([str(plugins_dir), *filter(None, [os.environ.get("PYTHONPATH")])])}
    node.start()
    try:
        assert storescu(node.port, series_files(CT)).returncode == 0
        wait_for(lambda: job_rows(node) and job_rows(node)[0][1] == "succeeded", 120, "the chain to succeed")
        attempts = node.query("select attempts from job")[0][0]
        assert attempts == 2, attempts
        node.wait_delivered(2)
        # Both SEGs (threshold-seg's from attempt 1, flaky's from attempt 2) delivered once each, one row each
        rows = node.query("select sop_instance_uid, state, attempts from delivery where destination = 'scp'")
        assert len(rows) == 2 and {r[1] for r in rows} == {"delivered"}, rows
        assert len({r[0] for r in rows}) == 2
        assert len(scp.received()) == 2
        assert node.query("select count(*) from instance where job_fk is not null")[0][0] == 2
    finally:
        node.stop()
