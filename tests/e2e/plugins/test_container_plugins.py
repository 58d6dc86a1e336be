"""Container plugins in a real container (podman, on an image built from Debian's packages by
tests/data/containers/build.sh): a label map with its metainfo comes back, a missing image says so, and a killed
job leaves no container once removed. The command-plugin tests without a container: tests/plugins/test_commands.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers import COMMAND_PLUGINS, REPO, TEST_PLUGINS
from test_commands import _ct2, _expected_labels, _probe  # beside the unit tests (tests/plugins)

from node.plugins.api import PluginError
from node.plugins.commands import CommandPlugin, run_command
from node.plugins.series import load_series

SCRIPTS = COMMAND_PLUGINS
METAINFO = TEST_PLUGINS / "templated-metainfo.json"  # labelIDs 1 ("Upper left") and 2 ("Lower right")
BASE = "localhost/dicom-node-test-python:1"
IMAGE = "localhost/dicom-node-test-labelmap:latest"
CONTAINERS = REPO / "tests" / "data" / "containers"


def _podman_reason() -> str | None:
    """Why a container cannot run here, or None."""
    if shutil.which("podman") is None:
        return "podman is not installed (scripts/test.sh installs it and builds the test image)"
    return None


@pytest.fixture(scope="module")
def test_image(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The base image (Debian's python3, numpy, pydicom; built by build.sh) with this test's script on top."""
    reason = _podman_reason()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "CONTAINERS_CONF": str(CONTAINERS / "containers.conf")}
    # Built once per machine (about half a minute), from Debian's packages; scripts/test.sh does it.
    subprocess.run([str(CONTAINERS / "build.sh")], env=env, check=True, capture_output=True, timeout=900)
    context = tmp_path_factory.mktemp("image")
    shutil.copyfile(SCRIPTS / "write_labelmap.py", context / "write_labelmap.py")
    shutil.copyfile(METAINFO, context / "metainfo.json")
    (context / "Containerfile").write_text(f"FROM {BASE}\nCOPY write_labelmap.py metainfo.json /opt/test/\n")
    subprocess.run(
        ["podman", "build", "--pull=never", "-q", "-t", IMAGE, str(context)],
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return IMAGE


def test_container_plugin_writes_a_labelmap_with_metainfo(
    shared_data: Path, tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTAINERS_CONF", str(CONTAINERS / "containers.conf"))
    series = load_series(_ct2())
    cmd = CommandPlugin(
        container=test_image,
        command=[
            "python3",
            "/opt/test/write_labelmap.py",
            "{input}",
            "{output}",
            "--metainfo",
            "/opt/test/metainfo.json",
        ],
        env={"EXTRA_Y": "2"},
    )
    out = run_command("boxed", cmd, series, tmp_path, device=None)
    assert np.array_equal(out.results[0].masks, _expected_labels(series))
    assert [s.label for s in out.results[0].segments] == ["Upper left", "Lower right"]
    probe = _probe(tmp_path)
    assert probe["env"]["MERCURE_IN_DIR"] == "/input" and probe["env"]["HOLOSCAN_OUTPUT_PATH"] == "/output"
    assert probe["env"]["EXTRA_Y"] == "2" and probe["modes"] == ["0o444"]
    assert probe["writable"] is False  # a read-only mount: not even root in the container can write
    for name, src in zip(sorted((tmp_path / "input").glob("*.dcm")), series.files, strict=True):
        assert name.read_bytes() == src.read_bytes()
    left = subprocess.run(["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True, check=True)
    assert "dicom-node-boxed" not in left.stdout


def test_container_with_a_missing_image_says_so(
    shared_data: Path, tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CONTAINERS_CONF", str(CONTAINERS / "containers.conf"))
    series = load_series(_ct2())
    cmd = CommandPlugin(container="localhost/dicom-node-no-such-image:0")
    with pytest.raises(PluginError, match=r"exited with code 125 \(podman could not run the container"):
        run_command("gone", cmd, series, tmp_path)


def _run_boxed(work: str, image: str) -> None:
    """A job process's part (forked): run a container that hangs."""
    series = load_series(_ct2())
    run_command("hang", CommandPlugin(container=image, command=["sleep", "600"]), series, Path(work))


def test_killed_job_leaves_no_container_once_removed(
    shared_data: Path, tmp_path: Path, test_image: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A timeout kills the job's tree (the podman client with it); remove_container clears what podman kept."""
    import multiprocessing as mp

    from helpers import wait_for

    from node.plugins.commands import remove_container
    from node.plugins.runtime import kill_tree

    monkeypatch.setenv("CONTAINERS_CONF", str(CONTAINERS / "containers.conf"))

    def names() -> str:
        ps = subprocess.run(
            ["podman", "ps", "-a", "--format", "{{.Names}}"], capture_output=True, text=True, check=True
        )
        return ps.stdout

    proc = mp.get_context("fork").Process(target=_run_boxed, args=(str(tmp_path), test_image))
    proc.start()
    try:
        wait_for(lambda: "dicom-node-hang-" in names(), 60, "the container to start")
    finally:
        kill_tree(proc.pid)
        proc.join(10)
    assert "dicom-node-hang-" in names()  # what a killed client leaves
    remove_container(tmp_path)
    assert "dicom-node-hang-" not in names()
