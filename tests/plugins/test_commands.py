"""Command and container plugins: real processes on real series, the outputs the node takes from them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import COMMAND_PLUGINS, REPO, SHARED, TEST_PLUGINS, series_files
from pydantic import ValidationError

from node.derive.template import load_template
from node.plugins.api import PluginError
from node.plugins.commands import CommandPlugin, container_argv, run_command, write_input
from node.plugins.series import load_series

SCRIPTS = COMMAND_PLUGINS
METAINFO = TEST_PLUGINS / "templated-metainfo.json"  # labelIDs 1 ("Upper left") and 2 ("Lower right")
BASE = "localhost/dicom-node-test-python:1"
IMAGE = "localhost/dicom-node-test-labelmap:latest"
CONTAINERS = REPO / "tests" / "data" / "containers"


def _ct2() -> list[Path]:
    return sorted((SHARED / "seg" / "ct2-source").iterdir())  # 4 CT slices, 16x16


def _probe(work: Path) -> dict:
    """The JSON line write_labelmap.py printed (the log starts with the command line)."""
    lines = (work / "command.log").read_text().splitlines()
    return json.loads(next(line for line in lines if line.startswith("{")))


def _expected_labels(series) -> np.ndarray:
    """What write_labelmap.py computes, from the series as the node sorted it."""
    out = []
    for k, px in enumerate(series.voxels().astype(np.float64)):
        lab = (px > px.mean()).astype(np.uint8)
        lab[: k + 2] = 2
        out.append(lab)
    return np.stack(out)


def _py(script: str, *args: str) -> list[str]:
    return [sys.executable, str(SCRIPTS / script), "{input}", "{output}", *args]


def test_npy_labelmap_with_metainfo_becomes_a_segmentation(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    cmd = CommandPlugin(
        command=_py("write_labelmap.py", "--metainfo", str(METAINFO)), env={"EXTRA_X": "1"}, settings={"sigma": 2}
    )
    out = run_command("labels", cmd, series, tmp_path, device=None)
    assert not out.ready and len(out.results) == 1
    seg = out.results[0]
    written = np.load(tmp_path / "output" / "labels.npy")
    assert np.array_equal(seg.masks, written) and np.array_equal(seg.masks, _expected_labels(series))
    template = load_template(METAINFO)
    assert [(s.label, s.type, s.color) for s in seg.segments] == [
        (e.SegmentLabel, e.SegmentedPropertyTypeCodeSequence.code(), e.recommendedDisplayRGBValue)
        for e in template.entries
    ]
    probe = _probe(tmp_path)
    env = probe["env"]
    for key in ("MERCURE_IN_DIR", "MONAI_INPUTPATH", "HOLOSCAN_INPUT_PATH"):
        assert env[key] == str(tmp_path / "input")
    for key in ("MERCURE_OUT_DIR", "MONAI_OUTPUTPATH", "HOLOSCAN_OUTPUT_PATH"):
        assert env[key] == str(tmp_path / "output")
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["EXTRA_X"] == "1"
    assert probe["task"]["process"] == {"module_name": "labels", "settings": {"sigma": 2}}
    assert out.seconds > 0


def test_input_is_the_series_in_slice_order_read_only_and_byte_identical(shared_data: Path, tmp_path: Path) -> None:
    files = list(reversed(series_files("mr-t1-sag-siemens")))  # the node sorts; the names follow its order
    series = load_series(files)
    cmd = CommandPlugin(command=_py("write_labelmap.py", "--metainfo", str(METAINFO)))
    run_command("labels", cmd, series, tmp_path, device="1")
    uid = str(series.first.SeriesInstanceUID)
    names = sorted(p.name for p in (tmp_path / "input").glob("*.dcm"))
    assert names == [f"{uid}#{i:05d}.dcm" for i in range(len(series))]
    for name, src in zip(names, series.files, strict=True):
        assert (tmp_path / "input" / name).read_bytes() == src.read_bytes()
    probe = _probe(tmp_path)
    assert probe["modes"] == ["0o444"] and probe["env"]["CUDA_VISIBLE_DEVICES"] == "1"
    assert sorted(probe["input"]) == sorted([*names, "task.json"])
    assert np.array_equal(np.load(tmp_path / "output" / "labels.npy"), _expected_labels(series))


def test_write_input_links_stored_files_and_makes_them_read_only(shared_data: Path, tmp_path: Path) -> None:
    stored = tmp_path / "storage"
    stored.mkdir()
    for f in _ct2():
        shutil.copyfile(f, stored / f.name)
    series = load_series(sorted(stored.iterdir()))
    linked = write_input(series, tmp_path / "linked", link=True)
    copied = write_input(series, tmp_path / "copied", link=False)
    for a, b, src in zip(linked, copied, series.files, strict=True):
        assert a.stat().st_ino == src.stat().st_ino and b.stat().st_ino != src.stat().st_ino
        assert oct(a.stat().st_mode & 0o777) == oct(b.stat().st_mode & 0o777) == "0o444"
        assert b.read_bytes() == src.read_bytes()


@pytest.mark.parametrize("ornt", ["canonical", "2,-1;0,1;1,-1", "1,1;2,-1;0,-1"])
def test_nifti_labelmap_with_axes_reordered_or_flipped_maps_back_exactly(
    shared_data: Path, tmp_path: Path, ornt: str
) -> None:
    series = load_series(series_files("mr-t1-sag-siemens"))  # sagittal: RAS canonical reorders all three axes
    cmd = CommandPlugin(command=_py("write_labelmap.py", "--nifti", ornt), metainfo=METAINFO)
    out = run_command("nifti", cmd, series, tmp_path)
    import nibabel as nib

    stored = np.asanyarray(nib.load(str(tmp_path / "output" / "labels.nii.gz")).dataobj)
    expected = _expected_labels(series)
    assert stored.shape != expected.shape or not np.array_equal(stored, expected)  # really reordered
    assert np.array_equal(out.results[0].masks, expected)


def test_nifti_label_map_off_the_input_grid_is_refused(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(series_files("mr-t1-sag-siemens"))
    cmd = CommandPlugin(command=_py("write_labelmap.py", "--nifti", "shifted"), metainfo=METAINFO)
    with pytest.raises(PluginError, match=r"labels.nii.gz: the label map is not on the input grid"):
        run_command("nifti", cmd, series, tmp_path)


def test_ready_seg_is_returned_as_a_dataset(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    out = run_command("seg", CommandPlugin(command=_py("make_seg.py")), series, tmp_path)
    assert not out.results and len(out.ready) == 1
    seg = out.ready[0]
    assert seg.Modality == "SEG" and seg.StudyInstanceUID == series.first.StudyInstanceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == series.first.SeriesInstanceUID
    assert "PixelData" in seg and seg.SegmentSequence[0].SegmentLabel == "Bright"


@pytest.mark.parametrize(
    ("flag", "error"),
    [
        ("--other-series", r"seg.dcm: it does not reference the input series .*Referenced Series Sequence"),
        ("--other-study", r"seg.dcm: StudyInstanceUID is '[0-9.]+', the input's is '[0-9.]+'"),
    ],
)
def test_seg_of_another_series_or_study_is_refused(shared_data: Path, tmp_path: Path, flag: str, error: str) -> None:
    series = load_series(_ct2())
    with pytest.raises(PluginError, match=error):
        run_command("seg", CommandPlugin(command=_py("make_seg.py", flag)), series, tmp_path)


def test_copy_of_an_input_instance_is_refused(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    cmd = CommandPlugin(command=["sh", "-c", 'cp "$MERCURE_IN_DIR"/*#00000.dcm "$MERCURE_OUT_DIR"/copy.dcm'])
    with pytest.raises(PluginError, match=r"copy.dcm: it has the SOP Instance UID of an input instance"):
        run_command("copy", cmd, series, tmp_path)


def test_failing_command_reports_its_exit_code_and_log_tail(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    script = "for i in $(seq 1 40); do echo line $i; done; echo 'model weights missing' >&2; exit 3"
    with pytest.raises(PluginError) as e:
        run_command("broken", CommandPlugin(command=["sh", "-c", script]), series, tmp_path)
    text = str(e.value)
    assert "command plugin broken exited with code 3" in text and "model weights missing" in text
    assert "line 40" in text and "line 5\n" not in text  # the tail, not the whole log
    assert str(tmp_path / "command.log") in text


def test_command_that_writes_nothing_usable_says_what_it_found(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    with pytest.raises(PluginError, match=r"wrote no result into its output folder \(found: nothing\)"):
        run_command("idle", CommandPlugin(command=["true"]), series, tmp_path / "a")
    cmd = CommandPlugin(command=["sh", "-c", "echo hi > {output}/notes.txt"])
    with pytest.raises(PluginError, match=r"\(found: notes.txt\); it should write DICOM objects or a label map"):
        run_command("idle", cmd, series, tmp_path / "b")


def test_label_map_without_metainfo_says_where_to_put_one(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    with pytest.raises(PluginError, match=r"no metainfo.json .* set metainfo = .* \[plugins.commands.bare\]"):
        run_command("bare", CommandPlugin(command=_py("write_labelmap.py")), series, tmp_path)


def test_empty_label_map_is_a_note_not_a_failure(shared_data: Path, tmp_path: Path) -> None:
    series = load_series(_ct2())
    out = run_command(
        "none", CommandPlugin(command=_py("write_labelmap.py", "--empty"), metainfo=METAINFO), series, tmp_path
    )
    assert not out.results and not out.ready and any("labels no voxel" in n for n in out.notes)


# -- configuration -------------------------------------------------------------


@pytest.mark.parametrize(
    ("table", "error"),
    [
        ({}, r"give command = \[.*\] or container = \"image\""),
        ({"command": ["/nonexistent/run.sh", "{input}"]}, r"command\[0\] = '/nonexistent/run.sh' does not exist"),
        ({"command": ["no-such-tool-here"]}, r"'no-such-tool-here' is not on PATH"),
        ({"command": ["true", "{inpt}"]}, r"\{inpt\} is not a placeholder; use \{input\} and \{output\}"),
        ({"command": ["true"], "runtime": "docker"}, r'runtime = "docker" is for a container'),
        (
            {"container": "img", "runtime": "docker"} if not shutil.which("docker") else {"container": ""},
            r"docker is not on PATH; install it, or set runtime = \"podman\"|container = \"\"",
        ),
        ({"command": ["true"], "gpu": "always"}, r"gpu"),
        ({"command": ["true"], "outputs": "dicom"}, r"outputs"),
    ],
)
def test_config_errors_name_the_key(table: dict, error: str) -> None:
    with pytest.raises(ValidationError, match=error):
        CommandPlugin.model_validate(table)


def test_container_argv(tmp_path: Path) -> None:
    cmd = CommandPlugin(
        container="localhost/seg:2",
        runtime="podman",
        command=["--in", "{input}", "--out={output}"],
        env={"MODEL": "fast"},
    )
    conventions = [
        "-e",
        "MERCURE_IN_DIR=/input",
        "-e",
        "MONAI_INPUTPATH=/input",
        "-e",
        "HOLOSCAN_INPUT_PATH=/input",
        "-e",
        "MERCURE_OUT_DIR=/output",
        "-e",
        "MONAI_OUTPUTPATH=/output",
        "-e",
        "HOLOSCAN_OUTPUT_PATH=/output",
        "-e",
        "MODEL=fast",
    ]
    head = [
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        "--name",
        "dicom-node-seg-1",
        "-v",
        f"{tmp_path}/in:/input:ro",
        "-v",
        f"{tmp_path}/out:/output",
        *conventions,
    ]
    tail = ["localhost/seg:2", "--in", "/input", "--out=/output"]
    argv = container_argv(cmd, tmp_path / "in", tmp_path / "out", "dicom-node-seg-1", None)
    assert argv == ["podman", *head, *tail]
    argv = container_argv(cmd, tmp_path / "in", tmp_path / "out", "dicom-node-seg-1", "1")
    assert argv == ["podman", *head, "--device", "nvidia.com/gpu=1", *tail]
    docker = cmd.model_copy(update={"runtime": "docker"})
    argv = container_argv(docker, tmp_path / "in", tmp_path / "out", "dicom-node-seg-1", "0")
    assert argv == ["docker", *head, "--gpus", "device=0", *tail]
    bare = CommandPlugin(container="localhost/seg:2")
    assert container_argv(bare, tmp_path / "in", tmp_path / "out", "n", None)[-1] == "localhost/seg:2"


def test_plugins_lists_a_command_plugin_with_what_it_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "node.toml"
    cfg.write_text(
        '[plugins.commands.labels]\ncommand = ["/bin/sh", "-c", "echo {input} {output}"]\n'
        'description = "writes a label map"\nversion = "2.1"\n'
    )
    done = subprocess.run(
        [sys.executable, "-m", "node", "plugins", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "labels 2.1 -- writes a label map" in done.stdout
    assert "from config [plugins.commands]" in done.stdout
    assert "runs: command /bin/sh -c echo {input} {output}" in done.stdout, done.stdout
