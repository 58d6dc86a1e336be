"""A plugin author's loop: ``plugins new`` -> pip install -> its own test -> ``plugins run`` on a real CT.

``plugins run`` goes through the node's own plugin runtime (a process from the fork server, output
validation), so what it writes is what a node would store and send: the SEG is checked with dciodvfy
and its frames against the source's values. The other tests pin what an author sees when something
is wrong: each names what to change, and nothing half-made is left as if it were a result.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import REPO, TEST_PLUGINS
from helpers.dciodvfy import verify
from pydicom.uid import SegmentationStorage, generate_uid

CT = "series/ct-head-philips-5mm"


def cli(*args: str, cwd: Path, pythonpath: list[Path] = (), timeout: float = 300) -> subprocess.CompletedProcess[str]:  # type: ignore[assignment]
    """``dicom-node ARGS`` in a fresh process, from ``cwd`` (no config/node.toml there: the embedded defaults)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([*map(str, pythonpath), *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.run(
        [sys.executable, "-m", "node", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
    )


def hu_by_sop(files: list[Path]) -> dict[str, np.ndarray]:
    """Each source image's rescaled values (HU), by SOP Instance UID."""
    out = {}
    for f in files:
        ds = pydicom.dcmread(f)
        out[str(ds.SOPInstanceUID)] = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    return out


def test_new_package_installs_passes_its_test_and_runs_on_a_real_ct(tmp_path: Path, shared_data: Path) -> None:
    pkg, site = tmp_path / "bone-author", tmp_path / "site"
    r = cli("plugins", "new", "bone-author", str(pkg), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (pkg / "pyproject.toml").is_file() and (pkg / "bone_author" / "plugin.py").is_file()
    assert "dicom-node plugins run bone-author" in r.stdout  # the next steps are printed

    # Installed as a user would (a wheel built from the folder), into a folder of its own on PYTHONPATH:
    # its entry point is then found by the node like any installed plugin's.
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps"]
        + ["--no-build-isolation", "--target", str(site), str(pkg)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    assert (site / "bone_author" / "plugin.py").is_file()

    # Its own test passes out of the box (run from the package folder, against the installed copy).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")])))
    own = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"],
        capture_output=True,
        text=True,
        cwd=pkg,
        env=env,
        timeout=300,
    )
    assert own.returncode == 0, own.stdout + own.stderr
    assert "3 passed" in own.stdout

    listed = cli("plugins", cwd=tmp_path, pythonpath=[site])
    assert "bone-author 0.1.0" in listed.stdout and "lower: number = 300.0" in listed.stdout, listed.stdout

    # On a real CT (a folder as copied from a CD, DICOMDIR included), with a parameter.
    src = shared_data / CT
    out = tmp_path / "out"
    r = cli(
        "plugins",
        "run",
        "bone-author",
        str(src),
        "--params",
        '{"lower": 200}',
        "--out",
        str(out),
        cwd=tmp_path,
        pythonpath=[site],
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "DIRFILE: a DICOMDIR" in r.stderr
    assert 'CT series 201 "STD BRAIN 5MM" (28 files): bone-author 0.1.0' in r.stdout, r.stdout
    for part in ("load ", "plugin ", "build ", "write ", "peak memory"):
        assert part in r.stdout, r.stdout
    segs = list(out.glob("*/seg-*.dcm"))
    assert len(segs) == 1, list(out.rglob("*"))
    assert f"SEG    {segs[0]}  (Segmentation Storage)" in r.stdout
    verify(segs[0], "plugins run: SEG of a scaffolded plugin")

    seg = pydicom.dcmread(segs[0])
    assert seg.SOPClassUID == SegmentationStorage
    assert segs[0].parent.name == seg.ReferencedSeriesSequence[0].SeriesInstanceUID
    assert seg.SegmentSequence[0].SegmentLabel == "Bone"
    algo = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algo.AlgorithmName, algo.AlgorithmVersion) == ("bone-author", "0.1.0")
    # Every frame is the source image it references, thresholded with the parameters given.
    sources = [p for p in src.iterdir() if p.name != "DIRFILE"]
    hu = hu_by_sop(sources)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns).astype(bool)
    covered = set()
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence, strict=True):
        sop = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        covered.add(sop)
        assert np.array_equal(frame, (hu[sop] >= 200) & (hu[sop] <= 3000)), sop
    # Frames without bone are left out (as the node does); none of those slices has any.
    assert all(not ((v >= 200) & (v <= 3000)).any() for sop, v in hu.items() if sop not in covered)
    assert covered


def test_a_chain_writes_each_steps_outputs_and_a_second_run_replaces_them(tmp_path: Path, shared_data: Path) -> None:
    src = tmp_path / "ct"
    src.mkdir()
    for name in ("I10", "I20"):
        shutil.copy(shared_data / CT / name, src / name)
    out = tmp_path / "out"
    args = ("plugins", "run", "threshold-seg,overlay-sc", str(src), "--out", str(out))
    r = cli(*args, "--params", json.dumps([{"largest_component": True}, {"style": "outline"}]), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "threshold-seg 1.0, overlay-sc 1.0" in r.stdout
    first = sorted(p.name for p in out.glob("*/*.dcm"))
    assert [n for n in first if n.startswith("seg-")] == ["seg-000-00000.dcm"]
    assert len([n for n in first if n.startswith("sc-")]) == 2, first  # one picture per slice
    for f in out.glob("*/*.dcm"):
        verify(f, f"plugins run chain: {f.name}")
    seg_uid = pydicom.dcmread(next(out.glob("*/seg-*.dcm"))).SOPInstanceUID

    # Run again (the author changed something): the folder holds this run's outputs only, with new UIDs.
    r = cli(*args, "--params", json.dumps([{}, {}]), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert sorted(p.name for p in out.glob("*/*.dcm")) == first
    assert pydicom.dcmread(next(out.glob("*/seg-*.dcm"))).SOPInstanceUID != seg_uid


def test_a_plugin_in_an_environment_of_its_own_runs_in_a_warm_worker(tmp_path: Path, shared_data: Path) -> None:
    """As in a node: the plugin runs in its environment's interpreter (numpy 1.x there), the node builds the SEG."""
    from helpers.envs import sdk_env

    config = tmp_path / "node.toml"
    config.write_text(
        '[plugins.local]\nenv-bone = { entry = "env_plugins:Bone", environment = "old" }\n'
        f'[plugins.environments.old]\npython = "{sdk_env()}"\nenv = {{ PYTHONPATH = "{TEST_PLUGINS}" }}\n'
    )
    files = [str(shared_data / CT / name) for name in ("I10", "I20")]
    r = cli("plugins", "run", "env-bone", *files, "--out", "out", "--config", str(config), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "env-bone 2.0" in r.stdout and "worker transfer" in r.stdout, r.stdout
    assert "worker start and setup" in r.stdout  # its setup() (the model's loading) apart from the run
    (seg_file,) = (tmp_path / "out").glob("*/seg-*.dcm")
    assert f"SEG    {seg_file.relative_to(tmp_path)}  (Segmentation Storage)" in r.stdout  # as --out was given
    verify(seg_file, "plugins run: SEG of a plugin in an environment")
    assert "numpy 1." in pydicom.dcmread(seg_file, stop_before_pixels=True).SeriesDescription


def test_a_command_plugin_gets_its_label_map_built_and_its_log_kept(tmp_path: Path, shared_data: Path) -> None:
    script = REPO / "tests" / "data" / "command-plugins" / "write_labelmap.py"
    config = tmp_path / "node.toml"
    command = [
        sys.executable,
        str(script),
        "{input}",
        "{output}",
        "--metainfo",
        str(TEST_PLUGINS / "templated-metainfo.json"),
    ]
    config.write_text(f"[plugins.commands.labels]\ncommand = {json.dumps(command)}\n")
    files = [str(shared_data / CT / name) for name in ("I10", "I20")]
    r = cli("plugins", "run", "labels", *files, "--out", "out", "--config", str(config), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    (seg_file,) = (tmp_path / "out").glob("*/seg-*.dcm")
    verify(seg_file, "plugins run: SEG of a command plugin's label map")
    seg = pydicom.dcmread(seg_file, stop_before_pixels=True)
    assert [s.SegmentLabel for s in seg.SegmentSequence] == ["Upper left", "Lower right"]  # from its metainfo.json
    log = seg_file.parent / "labels.log"
    assert f"log    {log.relative_to(tmp_path)}  (what the command printed)" in r.stdout, r.stdout
    assert "write_labelmap.py" in log.read_text()


def copy_series(sources: list[Path], folder: Path, **values: str) -> list[Path]:
    """The real slices under a new Series (and SOP) Instance UID, with ``values`` set (another study, number...)."""
    folder.mkdir(parents=True)
    series_uid = generate_uid()
    out = []
    for p in sources:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID, ds.SOPInstanceUID = series_uid, generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for keyword, value in values.items():
            setattr(ds, keyword, value)
        ds.save_as(folder / p.name, enforce_file_format=True)
        out.append(folder / p.name)
    return out


def test_a_study_plugin_gets_the_studys_series_as_inputs_and_its_priors(tmp_path: Path, shared_data: Path) -> None:
    """--study: the series of a study as a study rule without declared inputs names them; --prior: a prior study."""
    slices = [shared_data / CT / name for name in ("I10", "I20")]
    current = tmp_path / "current"
    (current / "original").mkdir(parents=True)
    for p in slices:
        shutil.copy(p, current / "original" / p.name)
    copy_series(slices, current / "second", SeriesNumber="5")  # the same study, series 5
    prior_study = generate_uid()
    copy_series(slices, tmp_path / "prior", StudyInstanceUID=prior_study, StudyDate="20100101", SeriesNumber="3")
    config = tmp_path / "node.toml"
    config.write_text(f'[plugins]\npaths = ["{TEST_PLUGINS}"]\nlocal = {{ pair = "study_plugins:pair" }}\n')
    report = tmp_path / "report.json"
    args = ["plugins", "run", "pair", str(current), "--out", "out", "--config", str(config)]
    args += ["--params", json.dumps({"report": str(report)})]

    r = cli(*args, cwd=tmp_path)  # a study plugin on one series at a time: it says what to give
    assert r.returncode == 1 and 'takes a study (takes = "study")' in r.stderr, r.stderr

    r = cli(*args, "--study", "--primary", "series-201", "--prior", str(tmp_path / "prior"), cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    original = pydicom.dcmread(slices[0], stop_before_pixels=True)
    assert (
        f"study {original.StudyInstanceUID}: series-5 (2 files), series-201 (2 files); primary series-201" in r.stdout
    )
    got = json.loads(report.read_text())
    assert got["study_uid"] == original.StudyInstanceUID and got["study_date"] == "20150206"
    assert sorted(got["inputs"]) == ["series-201", "series-5"]
    assert got["primary"] == original.SeriesInstanceUID
    assert [(p["study_uid"], p["study_date"]) for p in got["priors"]] == [(prior_study, "20100101")]
    # The outputs are built on the primary, as in a node.
    (seg_file,) = (tmp_path / "out").glob("*/seg-*.dcm")
    assert seg_file.parent.name == original.SeriesInstanceUID
    verify(seg_file, "plugins run --study: SEG of a study plugin")

    r = cli(*args, "--study", "--primary", "series-9", cwd=tmp_path)
    assert r.returncode == 1 and "--primary series-9: study" in r.stderr and "series-5, series-201" in r.stderr


def test_mistakes_are_named_before_anything_runs(tmp_path: Path, shared_data: Path) -> None:
    src = shared_data / CT / "I10"
    out = tmp_path / "out"
    r = cli("plugins", "run", "no-such-plugin", str(src), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 1
    assert "no plugin 'no-such-plugin' is installed" in r.stderr and "threshold-seg" in r.stderr, r.stderr

    r = cli(
        "plugins", "run", "threshold-seg", str(src), "--out", str(out), "--params", '{"fil_holes": true}', cwd=tmp_path
    )
    assert r.returncode == 1
    assert "threshold-seg params.fil_holes" in r.stderr, r.stderr

    r = cli("plugins", "run", "threshold-seg", str(src), "--out", str(out), "--params", "{lower: 1}", cwd=tmp_path)
    assert r.returncode == 2 and "--params is not JSON" in r.stderr, r.stderr
    assert not list(out.rglob("*.dcm"))

    # A folder with no DICOM series in it: the files are named, and the run says there was nothing to run on.
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not DICOM")
    (junk / "I10.part").write_bytes((shared_data / CT / "I10").read_bytes()[:3000])  # cut short
    r = cli("plugins", "run", "threshold-seg", str(junk), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 1
    assert "notes.txt" in r.stderr and "I10.part" in r.stderr and "no DICOM series in the given paths" in r.stderr

    (tmp_path / "a-file").write_text("not a folder")
    r = cli("plugins", "run", "threshold-seg", str(src), "--out", str(tmp_path / "a-file"), cwd=tmp_path)
    assert r.returncode == 1 and "cannot make that folder" in r.stderr, r.stderr

    # A folder of someone else's files is not emptied.
    series_uid = pydicom.dcmread(src, stop_before_pixels=True).SeriesInstanceUID
    (out / series_uid).mkdir(parents=True)
    (out / series_uid / "mine.txt").write_text("keep me")
    r = cli("plugins", "run", "threshold-seg", str(src), "--out", str(out), cwd=tmp_path)
    assert r.returncode == 1 and "holds files this command did not write" in r.stderr, r.stderr
    assert (out / series_uid / "mine.txt").read_text() == "keep me"


def test_a_failing_plugin_fails_the_run_with_its_message(tmp_path: Path, shared_data: Path) -> None:
    from faulty_plugins import RAISER_MESSAGE

    config = tmp_path / "node.toml"
    # A local plugin module in a folder of its own: [plugins] paths makes it importable (no PYTHONPATH).
    config.write_text(f'[plugins]\npaths = ["{TEST_PLUGINS}"]\nlocal = {{ raiser = "faulty_plugins:raiser" }}\n')
    out = tmp_path / "out"
    args = ("plugins", "run", "raiser", str(shared_data / CT / "I10"), "--out", str(out), "--config", str(config))
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == 1
    assert f"failed: running plugin raiser: ValueError: {RAISER_MESSAGE}" in r.stderr, r.stderr
    assert "1 of 1 series failed" in r.stderr
    assert not list(out.rglob("*.dcm"))


@pytest.mark.parametrize(
    ("name", "why"),
    [("Bone_Seg", "lowercase letters, digits and hyphens"), ("numpy", "already importable"), ("class", "keyword")],
)
def test_new_refuses_a_name_it_cannot_use(tmp_path: Path, name: str, why: str) -> None:
    r = cli("plugins", "new", name, cwd=tmp_path)
    assert r.returncode == 2 and why in r.stderr, r.stderr
    assert not list(tmp_path.iterdir())


def test_new_never_writes_into_a_folder_in_use(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "work.py").write_text("x = 1\n")
    r = cli("plugins", "new", "fresh-plugin", str(tmp_path / "pkg"), cwd=tmp_path)
    assert r.returncode == 2 and "is not an empty folder" in r.stderr, r.stderr
    assert [p.name for p in (tmp_path / "pkg").iterdir()] == ["work.py"]
