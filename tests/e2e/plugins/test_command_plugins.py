"""Command and container plugins in a running node: a node in a subprocess, DCMTK upstream, Orthanc downstream.

- A command writes a label map (.npy) and a dcmqi metainfo.json: the job succeeds, the node's SEG reaches
  Orthanc once, its masks are the label map, its segments the metainfo's, and dciodvfy finds no error.
- The same from a NIfTI label map in another axis order, described by the plugin's configured metainfo.
- A command writes a ready DICOM SEG: the node validates it and forwards it as it is (same SOP Instance
  UID, same segments, same pixels; a missing Type 2 attribute added empty, which the job's result says);
  a SEG lacking a Type 1 attribute fails the job with the validator's message, and nothing is stored or sent.
- A command that exits non-zero fails its job with the exit code and the tail of its log; one whose label
  map labels nothing succeeds with no output and says why.
- The label map flow through a container (podman, an image built from Debian's packages, nothing
  pulled); a container that outlives its timeout fails the job, and neither the container nor its
  processes are left.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import psutil
import pydicom
import pytest
from helpers import COMMAND_PLUGINS, REPO, TEST_PLUGINS, NodeProcess, storescu, wait_for
from helpers.dciodvfy import verify
from helpers.variants import make_files

from node.derive.template import load_template
from node.plugins.series import load_series

SCRIPTS = COMMAND_PLUGINS
METAINFO = TEST_PLUGINS / "templated-metainfo.json"  # labelIDs 1 ("Upper left") and 2 ("Lower right")
CONTAINERS = REPO / "tests" / "data" / "containers"
CONTAINERS_CONF = str(CONTAINERS / "containers.conf")
BASE_IMAGE = "localhost/dicom-node-test-python:1"
IMAGE = "localhost/dicom-node-test-e2e:latest"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"

pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")


def toml(value: object) -> str:
    """A TOML value (JSON's strings and arrays are TOML's)."""
    return json.dumps(value, default=str)


# -- the series, the jobs ---------------------------------------------------------


def send(node: NodeProcess, folder: Path, description: str, *variants: str) -> tuple[list[Path], str]:
    """A real CT series (a variant of its own, so its own UIDs) with ``description``, sent with storescu.

    Returns the files sent and the series' Study Instance UID; the rules pick the plugin by description.
    """
    files = make_files(folder / "made", "ct-head", *variants)
    out = folder / "sent"
    out.mkdir(parents=True)
    for f in files:
        ds = pydicom.dcmread(f)
        ds.SeriesDescription = description
        ds.save_as(out / f.name)
    sent = sorted(out.iterdir())
    r = storescu(node.port, sent)
    assert r.returncode == 0, r.stderr
    return sent, str(pydicom.dcmread(sent[0], stop_before_pixels=True).StudyInstanceUID)


def job_of(node: NodeProcess, files: list[Path], timeout: float = 120) -> tuple[int, str, str, str]:
    """(id, state, result, last_error) of the one job of the series ``files`` are, once it has ended."""
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)

    def rows() -> list[tuple]:
        return node.query(
            "select job.id, job.state, job.result, job.last_error from job join series "
            "on series.id = job.series_fk where series.series_instance_uid = ?",
            uid,
        )

    wait_for(lambda: len(rows()) == 1 and rows()[0][1] in ("succeeded", "failed"), timeout, f"the job of {uid}")
    return rows()[0]


def outputs_of(node: NodeProcess, job_id: int) -> list[str]:
    return [u for (u,) in node.query("select sop_instance_uid from instance where job_fk = ? order by id", job_id)]


def deliveries_of(node: NodeProcess, job_id: int) -> list[tuple[str, str]]:
    return node.query("select sop_instance_uid, state from delivery where job_fk = ?", job_id)


def in_orthanc(orthanc, study_uid: str) -> list[str]:
    """Orthanc's instances of the study (Orthanc never got the sources: only what the node made)."""
    return list(orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid}}))


# -- what the label map command computes --------------------------------------------


def expected_labels(files: list[Path]) -> np.ndarray:
    """write_labelmap.py's label map, computed here from the series as the node orders it."""
    out = []
    for k, px in enumerate(load_series(files).voxels().astype(np.float64)):
        lab = (px > px.mean()).astype(np.uint8)
        lab[: k + 2] = 2
        out.append(lab)
    return np.stack(out)


def seg_pixels(data: bytes, files: list[Path]) -> tuple[Any, np.ndarray]:
    """The SEG and its segments as (slices, rows, cols, segments) booleans on the source's slice order."""
    seg = hd.seg.segread(io.BytesIO(data))
    uids = [str(d.SOPInstanceUID) for d in load_series(files).datasets]
    vol = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, combine_segments=False, skip_overlap_checks=True
    )
    return seg, vol.astype(bool)


def check_label_map_seg(orthanc, study_uid: str, files: list[Path], sop_uid: str, tmp_path: Path) -> None:
    """The SEG Orthanc holds is the command's label map described by the metainfo, and valid DICOM."""
    assert in_orthanc(orthanc, study_uid) == [orthanc.find_instance(sop_uid)]  # that SEG, nothing else
    data = orthanc.file(sop_uid)
    seg, masks = seg_pixels(data, files)
    assert seg.SOPClassUID == SEG
    want = expected_labels(files)
    assert masks.shape[-1] == 2
    for n in (1, 2):  # label value n is segment n (the metainfo lists labelIDs 1 and 2)
        assert np.array_equal(masks[..., n - 1], want == n), f"segment {n} differs from label {n}"
    template = load_template(METAINFO)
    got = [
        (
            s.SegmentLabel,
            s.SegmentedPropertyCategoryCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeValue,
            s.SegmentedPropertyTypeCodeSequence[0].CodeMeaning,
        )
        for s in seg.SegmentSequence
    ]
    assert got == [
        (
            e.SegmentLabel,
            e.SegmentedPropertyCategoryCodeSequence.CodeValue,
            e.SegmentedPropertyTypeCodeSequence.CodeValue,
            e.SegmentedPropertyTypeCodeSequence.CodeMeaning,
        )
        for e in template.entries
    ]
    path = tmp_path / "from-orthanc.dcm"
    path.write_bytes(data)
    verify(path, "command plugin label map SEG")


# -- a node with command plugins ---------------------------------------------------


def py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / script), "{input}", "{output}", *args]


def rule(name: str, plugin: str, **extra: object) -> str:
    more = "".join(f", {k} = {toml(v)}" for k, v in extra.items())
    return f"""
[[rules]]
name = "{name}"
match = {{ SeriesDescription = {{ regex = "^{name}$" }} }}
actions = [{{ type = "plugin", plugin = "{plugin}", send_to = ["orthanc"]{more} }}]
"""


@pytest.fixture(scope="module")
def keep(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where the ready-SEG command leaves a copy of what it wrote (the node removes the job's folder)."""
    return tmp_path_factory.mktemp("kept")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, module_orthanc, keep: Path) -> Iterator[NodeProcess]:
    # A ready SEG without its (Type 2) Content Description: the node may add it, empty, and says so.
    make_seg = f'"{sys.executable}" "{SCRIPTS / "make_seg.py"}" "{{input}}" "{{output}}" --without ContentDescription'
    n = NodeProcess(
        tmp_path_factory.mktemp("node"),
        extra_config=f"""
[tracker]
stable_after = 1
{module_orthanc.destination("orthanc")}
[plugins.commands.labels]
command = {toml(py("write_labelmap.py", "--metainfo", METAINFO))}
version = "2.1"
[plugins.commands.nifti-labels]
command = {toml(py("write_labelmap.py", "--nifti", "canonical"))}
metainfo = {toml(METAINFO)}
[plugins.commands.ready-seg]
command = {toml(["sh", "-c", f'{make_seg} && cp "{{output}}/seg.dcm" "{keep}/"'])}
[plugins.commands.invalid-seg]
command = {toml(py("make_seg.py", "--without", "SegmentationType"))}
[plugins.commands.finds-nothing]
command = {toml(py("write_labelmap.py", "--empty", "--metainfo", METAINFO))}
[plugins.commands.broken]
command = {toml(["sh", "-c", "for i in $(seq 1 40); do echo step $i; done; echo 'model weights missing' >&2; exit 7"])}
{rule("labels", "labels")}
{rule("nifti", "nifti-labels")}
{rule("ready", "ready-seg")}
{rule("invalid", "invalid-seg")}
{rule("broken", "broken")}
{rule("nothing", "finds-nothing")}
""",
    )
    n.start()
    yield n
    assert n.stop() == 0, n.log()[-4000:]  # (its log quotes the commands' output, tracebacks included)


def test_a_label_map_with_metainfo_becomes_the_seg_orthanc_gets(
    node: NodeProcess, module_orthanc, tmp_path: Path
) -> None:
    files, study = send(node, tmp_path, "labels")
    job_id, state, result, error = job_of(node, files)
    assert state == "succeeded", error
    assert result.startswith(f"1 SEG from {len(files)} source instances (labels 2.1;"), result
    (uid,) = outputs_of(node, job_id)
    node.wait_delivered()
    assert deliveries_of(node, job_id) == [(uid, "delivered")]
    check_label_map_seg(module_orthanc, study, files, uid, tmp_path)
    seg = pydicom.dcmread(io.BytesIO(module_orthanc.file(uid)))
    # The node's own SEG: its provenance names the command plugin and its version.
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("labels", "2.1")


def test_a_nifti_label_map_with_the_configured_metainfo_becomes_the_seg_orthanc_gets(
    node: NodeProcess, module_orthanc, tmp_path: Path
) -> None:
    # NIfTI in RAS canonical order (axes reversed and flipped against the series); the metainfo comes from
    # the plugin's table (metainfo = "..."), not from the command.
    files, study = send(node, tmp_path, "nifti", "no-thickness")
    job_id, state, result, error = job_of(node, files)
    assert state == "succeeded", error
    (uid,) = outputs_of(node, job_id)
    node.wait_delivered()
    assert deliveries_of(node, job_id) == [(uid, "delivered")]
    check_label_map_seg(module_orthanc, study, files, uid, tmp_path)


def test_a_ready_seg_is_validated_and_forwarded_as_the_command_wrote_it(
    node: NodeProcess, module_orthanc, keep: Path, tmp_path: Path
) -> None:
    files, study = send(node, tmp_path, "ready", "uneven")
    job_id, state, result, error = job_of(node, files)
    assert state == "succeeded", error
    assert result.startswith(f"1 SEG from {len(files)} source instances (ready-seg 1.0;"), result
    written = pydicom.dcmread(keep / "seg.dcm")
    assert outputs_of(node, job_id) == [written.SOPInstanceUID]
    node.wait_delivered()
    assert deliveries_of(node, job_id) == [(written.SOPInstanceUID, "delivered")]
    assert in_orthanc(module_orthanc, study) == [module_orthanc.find_instance(written.SOPInstanceUID)]
    held = pydicom.dcmread(io.BytesIO(module_orthanc.file(written.SOPInstanceUID)))
    for key in (
        "SOPClassUID",
        "SOPInstanceUID",
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "SegmentSequence",
        "ReferencedSeriesSequence",
        "PerFrameFunctionalGroupsSequence",
        "SharedFunctionalGroupsSequence",
    ):
        assert held[key] == written[key], key
    assert held.PixelData == written.PixelData
    # Everything the command wrote is there as it wrote it; what the node added (repairs) its result says.
    changed = sorted(e.keyword for e in written if e.tag.group != 0x0002 and (e.tag not in held or held[e.tag] != e))
    assert not changed, changed
    added = sorted(e.keyword for e in held if e.tag.group != 0x0002 and e.tag not in written)
    assert added == ["ContentDescription"] and held.ContentDescription == "", added
    assert "SEG: ContentDescription" in result, result  # the repair is in the job's result
    path = tmp_path / "held.dcm"
    path.write_bytes(module_orthanc.file(written.SOPInstanceUID))
    verify(path, "ready SEG from a command plugin")


def test_an_invalid_ready_seg_fails_the_job_with_the_validators_message(
    node: NodeProcess, module_orthanc, tmp_path: Path
) -> None:
    before = module_orthanc.new_instance_events()
    files, study = send(node, tmp_path, "invalid", "sheared")
    job_id, state, result, error = job_of(node, files)
    assert state == "failed", result
    assert "checking DICOM object 1 of 1 written by invalid-seg" in error, error
    assert "the SEG is not valid DICOM, so it was not stored or sent" in error, error
    assert "SegmentationType" in error or "Segmentation Type" in error, error
    assert outputs_of(node, job_id) == [] and deliveries_of(node, job_id) == []
    assert in_orthanc(module_orthanc, study) == [] and module_orthanc.new_instance_events() == before


def test_a_command_that_exits_non_zero_fails_with_its_exit_code_and_log_tail(
    node: NodeProcess, module_orthanc, tmp_path: Path
) -> None:
    files, study = send(node, tmp_path, "broken", "jittered")
    job_id, state, result, error = job_of(node, files)
    assert state == "failed", result
    assert "running command plugin broken: command plugin broken exited with code 7" in error, error
    # The whole log is kept where the error says (the job's own folder is gone).
    kept = Path(error.split("the last lines of ")[1].split(":\n")[0])
    assert kept.is_file() and "step 5\n" in kept.read_text() and "logs/commands" in str(kept), error
    assert "model weights missing" in error and "step 40" in error, error
    assert "step 5\n" not in error  # the tail, not the whole log
    assert outputs_of(node, job_id) == [] and in_orthanc(module_orthanc, study) == []


def test_a_label_map_that_labels_nothing_succeeds_with_no_output_and_says_why(
    node: NodeProcess, module_orthanc, tmp_path: Path
) -> None:
    files, study = send(node, tmp_path, "nothing", "single")
    job_id, state, result, error = job_of(node, files)
    assert state == "succeeded", error
    assert result.startswith("no output from 1 source instances"), result
    assert "labels.npy labels no voxel: no segmentation made from it" in result, result
    assert outputs_of(node, job_id) == [] and in_orthanc(module_orthanc, study) == []


# -- a node with container plugins ---------------------------------------------------


def podman_ps() -> str:
    r = subprocess.run(
        ["podman", "ps", "-a", "--format", "{{.Names}}"],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF},
    )
    return r.stdout


@pytest.fixture(scope="module")
def image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The base image (Debian's python3, numpy, pydicom; built by build.sh) with the label map script on top."""
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (scripts/test.sh installs it and builds the test image)")
    env = {**os.environ, "CONTAINERS_CONF": CONTAINERS_CONF}
    subprocess.run([str(CONTAINERS / "build.sh")], env=env, check=True, capture_output=True, timeout=900)
    context = tmp_path_factory.mktemp("image")
    shutil.copyfile(SCRIPTS / "write_labelmap.py", context / "write_labelmap.py")
    shutil.copyfile(METAINFO, context / "metainfo.json")
    (context / "Containerfile").write_text(f"FROM {BASE_IMAGE}\nCOPY write_labelmap.py metainfo.json /opt/test/\n")
    subprocess.run(
        ["podman", "build", "--pull=never", "-q", "-t", IMAGE, str(context)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return IMAGE


@pytest.fixture(scope="module")
def container_node(tmp_path_factory: pytest.TempPathFactory, module_orthanc, image: str) -> Iterator[NodeProcess]:
    n = NodeProcess(
        tmp_path_factory.mktemp("container-node"),
        extra_config=f"""
[tracker]
stable_after = 1
{module_orthanc.destination("orthanc")}
[plugins.commands.boxed-labels]
container = "{image}"
command = {
            toml(
                [
                    "python3",
                    "/opt/test/write_labelmap.py",
                    "{input}",
                    "{output}",
                    "--metainfo",
                    "/opt/test/metainfo.json",
                ]
            )
        }
[plugins.commands.boxed-sleep]
container = "{image}"
command = ["sleep", "617"]  # a number of its own: its process is looked for below
{rule("boxed", "boxed-labels")}
{rule("sleeps", "boxed-sleep", timeout=3)}
""",
    )
    n.env = {"CONTAINERS_CONF": CONTAINERS_CONF}
    n.start()
    yield n
    assert n.stop() == 0, n.log()[-4000:]  # (its log quotes the commands' output, tracebacks included)


def test_a_container_label_map_becomes_the_seg_orthanc_gets(
    container_node: NodeProcess, module_orthanc, tmp_path: Path
) -> None:
    files, study = send(container_node, tmp_path, "boxed", "anonymised")
    job_id, state, result, error = job_of(container_node, files)
    assert state == "succeeded", error
    (uid,) = outputs_of(container_node, job_id)
    container_node.wait_delivered()
    assert deliveries_of(container_node, job_id) == [(uid, "delivered")]
    check_label_map_seg(module_orthanc, study, files, uid, tmp_path)
    assert "dicom-node-boxed-labels-" not in podman_ps()


def test_a_container_past_its_timeout_fails_the_job_and_leaves_no_container(
    container_node: NodeProcess, tmp_path: Path
) -> None:
    files, _ = send(container_node, tmp_path, "sleeps", "single")
    wait_for(lambda: "dicom-node-boxed-sleep-" in podman_ps(), 60, "the container to start")
    job_id, state, result, error = job_of(container_node, files, timeout=60)
    assert state == "failed", result
    assert "did not finish within its timeout of 3 s" in error, error
    assert "dicom-node-boxed-sleep-" not in podman_ps()
    # Nor its processes: conmon (which names the container) and what ran in it went with the job.
    left = []
    for p in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(p.info["cmdline"] or [])
        if "dicom-node-boxed-sleep-" in cmdline or cmdline == "sleep 617":
            left.append(cmdline)
    assert not left, left
    assert outputs_of(container_node, job_id) == []
