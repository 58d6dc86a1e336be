"""Command and container plugins: a program (or a container image) that reads DICOM files and writes results.

``[plugins.commands.NAME]`` runs tools that were never written against the plugin API as they are:
mercure modules, MONAI Deploy application packages, TotalSegmentator or nnU-Net behind a shell
script. The job process (see worker.py) calls :func:`run_command`, which

1. writes the series into ``WORK/input`` as DICOM files in slice order, read-only: hard links of the
   stored files where that is safe (a container, whose mount is read-only, or a node not running as
   root, for whom mode 0444 holds), else copies; plus mercure's ``task.json``;
2. runs the command (``{input}``/``{output}`` replaced by the folders) or ``podman/docker run`` of the
   image (no network, input mounted read-only, output read-write, nothing pulled) as a child of the
   job process, so the job's timeout ends it; its output goes to ``WORK/command.log``;
3. takes what it wrote into ``WORK/output``: DICOM objects (which must reference the input series and
   belong to its study and patient) as they are, and label maps (``.npy`` in the order of the input
   files, or NIfTI on the input grid in any axis order) with a dcmqi ``metainfo.json`` as
   Segmentations, which the node encodes like any plugin's.

The folder conventions mercure modules and MONAI Deploy / Holoscan application packages read are set
as environment variables (:data:`CONVENTIONS`), so such tools need no wrapper.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from node.config import CommandPlugin
from node.plugins.api import PluginError, Segmentation, SeriesInput

#: Environment variables that name the input and output folders, as the tools this runs read them:
#: mercure sets all six for its modules (process/runtime_base.py ``_build_environment``); MONAI Deploy
#: App SDK reads HOLOSCAN_INPUT_PATH/HOLOSCAN_OUTPUT_PATH (monai/deploy/core/runtime_env.py), its older
#: releases MONAI_INPUTPATH/MONAI_OUTPUTPATH.
CONVENTIONS = {
    "input": ("MERCURE_IN_DIR", "MONAI_INPUTPATH", "HOLOSCAN_INPUT_PATH"),
    "output": ("MERCURE_OUT_DIR", "MONAI_OUTPUTPATH", "HOLOSCAN_OUTPUT_PATH"),
}
#: Where a container sees the folders.
CONTAINER_INPUT, CONTAINER_OUTPUT = "/input", "/output"
#: Lines of command.log quoted in an error.
LOG_TAIL = 20

_SEG = {"1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7"}  # Segmentation, Label Map Segmentation
_NIFTI = (".nii", ".nii.gz")


@dataclass
class CommandOutcome:
    """What a command produced: Segmentations to encode, DICOM objects to take as they are, notes."""

    results: list[Segmentation] = field(default_factory=list)
    ready: list[Dataset] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    #: Seconds the command (or container) ran.
    seconds: float = 0.0


# -- the input folder --------------------------------------------------------


def write_input(
    series: SeriesInput, folder: Path, *, link: bool, settings: dict[str, Any] | None = None, name: str = ""
) -> list[Path]:
    """The series' files in ``folder``, named in slice order, mode 0444; and mercure's task.json.

    Names are ``SERIESUID#00000.dcm``: mercure's convention (series UID, ``#``, instance) that its modules
    split on, and in slice order as sorted by name. ``link``: hard links of the stored files where the
    file system allows (a link shares the stored file, so it is made read-only too: stored files are
    never rewritten), else copies.
    """
    folder.mkdir(parents=True)
    uid = str(series.first.get("SeriesInstanceUID", "series"))
    written = []
    for i, src in enumerate(series.files):
        dst = folder / f"{uid}#{i:05d}.dcm"
        linked = False
        if link:
            try:
                os.link(src, dst)
                linked = True
            except OSError:  # another file system, or links not allowed: copy
                pass
        if not linked:
            shutil.copyfile(src, dst)
        os.chmod(dst, 0o444)
        written.append(dst)
    task = {
        "id": folder.parent.name,
        "info": {"uid": uid, "uid_type": "series"},
        "process": {"module_name": name, "settings": settings or {}},
    }
    (folder / "task.json").write_text(json.dumps(task, indent=2))
    os.chmod(folder / "task.json", 0o444)
    return written


# -- running -----------------------------------------------------------------


def _substitute(args: list[str], input_dir: str, output_dir: str) -> list[str]:
    return [a.replace("{input}", input_dir).replace("{output}", output_dir) for a in args]


def _convention_env(input_dir: str, output_dir: str) -> dict[str, str]:
    return {**{k: input_dir for k in CONVENTIONS["input"]}, **{k: output_dir for k in CONVENTIONS["output"]}}


def container_name(plugin: str) -> str:
    """A unique container name that says what made it (``dicom-node-NAME-<12 hex>``)."""
    slug = re.sub(r"[^a-zA-Z0-9_.-]", "-", plugin)[:40] or "plugin"
    return f"dicom-node-{slug}-{uuid.uuid4().hex[:12]}"


def container_argv(cmd: CommandPlugin, input_dir: Path, output_dir: Path, name: str, device: str | None) -> list[str]:
    """``<runtime> run ...`` for a container plugin.

    No network; the input mounted read-only; nothing pulled (``--pull=never``: an image missing here is
    an error, not a download); the folder conventions and ``env`` inside; for a GPU, only that device
    (podman through CDI, docker through ``--gpus``), which the container then sees as device 0.
    """
    assert cmd.container is not None
    argv = [
        cmd.runtime,
        "run",
        "--rm",
        "--pull=never",
        "--network=none",
        "--name",
        name,
        "-v",
        f"{input_dir}:{CONTAINER_INPUT}:ro",
        "-v",
        f"{output_dir}:{CONTAINER_OUTPUT}",
    ]
    for key, value in {**_convention_env(CONTAINER_INPUT, CONTAINER_OUTPUT), **cmd.env}.items():
        argv += ["-e", f"{key}={value}"]
    if device:
        argv += ["--device", f"nvidia.com/gpu={device}"] if cmd.runtime == "podman" else ["--gpus", f"device={device}"]
    return [*argv, cmd.container, *_substitute(cmd.command or [], CONTAINER_INPUT, CONTAINER_OUTPUT)]


def command_argv(cmd: CommandPlugin, input_dir: Path, output_dir: Path) -> list[str]:
    assert cmd.command is not None
    return _substitute(cmd.command, str(input_dir), str(output_dir))


def _tail(log: Path, lines: int = LOG_TAIL) -> str:
    try:
        with open(log, errors="replace") as f:
            return "".join(deque(f, lines)).rstrip()
    except OSError:
        return ""


def remove_container(work: Path) -> None:
    """Remove the container a job in ``work`` started, if it is still there.

    ``run_command`` does it itself, but not when its process is killed (a timeout, a cancel): a killed
    podman client leaves its container, and a docker container is not a descendant of the job at all
    (the daemon runs it), so the job's tree kill does not reach it. The node calls this after killing.
    """
    record = work / "container"
    try:
        runtime, name = record.read_text().split()
    except (OSError, ValueError):
        return
    try:
        subprocess.run(
            [runtime, "rm", "-f", name],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        pass


def _failed(name: str, code: int, log: Path, cmd: CommandPlugin) -> PluginError:
    if code < 0:
        import signal

        try:
            how = f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            how = f"was killed by signal {-code}"
    else:
        how = f"exited with code {code}"
        if cmd.container and code == 125:
            how += f" ({cmd.runtime} could not run the container: is the image {cmd.container!r} on this machine?)"
        elif code in (126, 127):
            how += " (the program could not be started or was not found)"
    tail = _tail(log)
    shown = f"; the last lines of {log}:\n{tail}" if tail else f" and wrote nothing to {log}"
    return PluginError(f"command plugin {name} {how}{shown}")


def run_command(
    name: str, cmd: CommandPlugin, series: SeriesInput, work: Path, *, device: str | None = None
) -> CommandOutcome:
    """Run a command plugin on ``series`` in the folder ``work`` (the job's own, empty) and take its outputs.

    Called in the job's process: the command is its child, so the job's timeout and memory limit hold
    for it. ``device``: the GPU given to the job (a CUDA device id), None for none. Raises PluginError
    for a command that fails or writes nothing usable, with what to look at.
    """
    work = Path(work)
    input_dir, output_dir, log = work / "input", work / "output", work / "command.log"
    for d in (input_dir, output_dir):
        if d.exists():  # a retry in the same folder starts clean
            shutil.rmtree(d)
    # A link is as safe as a copy only where the command cannot write to it: a read-only mount, or
    # mode 0444 for a process that is not root.
    write_input(series, input_dir, link=bool(cmd.container) or os.geteuid() != 0, settings=cmd.settings, name=name)
    output_dir.mkdir()
    if cmd.container:
        cname = container_name(name)
        argv = container_argv(cmd, input_dir, output_dir, cname, device)
        env = dict(os.environ)
        (work / "container").write_text(f"{cmd.runtime} {cname}\n")
    else:
        argv = command_argv(cmd, input_dir, output_dir)
        env = {
            **os.environ,
            **_convention_env(str(input_dir), str(output_dir)),
            **cmd.env,
            "CUDA_VISIBLE_DEVICES": device or "",
        }
    t = time.perf_counter()
    try:
        with open(log, "wb") as out:
            out.write(f"$ {shlex.join(argv)}\n".encode())
            out.flush()
            try:
                proc = subprocess.run(
                    argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, cwd=work, env=env, check=False
                )
            except OSError as e:
                raise PluginError(f"command plugin {name}: cannot start {argv[0]}: {e.strerror or e}") from None
    finally:
        if cmd.container:
            remove_container(work)
    seconds = time.perf_counter() - t
    if proc.returncode != 0:
        raise _failed(name, proc.returncode, log, cmd)
    outcome = collect(name, cmd, series, output_dir)
    outcome.seconds = seconds
    return outcome


# -- the output folder -------------------------------------------------------


def collect(name: str, cmd: CommandPlugin, series: SeriesInput, output_dir: Path) -> CommandOutcome:
    """What the command wrote, checked: DICOM objects of this series, label maps on its grid."""
    files = sorted(p for p in output_dir.rglob("*") if p.is_file())
    rel = [str(p.relative_to(output_dir)) for p in files]
    labelmaps = [p for p in files if p.suffix == ".npy" or p.name.endswith(_NIFTI)]
    metainfos = [p for p in files if p.suffix == ".json"]
    others = [p for p in files if p not in labelmaps and p not in metainfos]
    outcome = CommandOutcome()
    ignored: list[str] = []
    empty = 0  # label maps that label nothing: a valid answer ("found nothing"), not a failure
    for p in others:
        try:
            ds = dcmread(p)
        except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, AttributeError, TypeError):
            ignored.append(str(p.relative_to(output_dir)))
            continue
        if cmd.output == "labelmap":
            ignored.append(f'{p.relative_to(output_dir)} (DICOM; output = "labelmap")')
            continue
        check_references(ds, series, f"{name}: {p.relative_to(output_dir)}")
        outcome.ready.append(ds)
    if cmd.output == "dicom":
        ignored += [f'{p.relative_to(output_dir)} (output = "dicom")' for p in labelmaps]
        labelmaps = []
    if labelmaps:
        template, source = _metainfo(name, cmd, output_dir, metainfos)
        from node.derive.template import TemplateError, apply_template

        for p in labelmaps:
            where = f"{name}: {p.relative_to(output_dir)}"
            labels = read_labelmap(p, series, where)
            if not labels.any():
                empty += 1
                outcome.notes.append(f"{p.relative_to(output_dir)} labels no voxel: no segmentation made from it")
                continue
            try:
                outcome.results.append(apply_template(Segmentation(labels, []), template, "error", source))
            except TemplateError as e:
                raise PluginError(f"{where}: {e}") from None
    else:
        ignored += [str(p.relative_to(output_dir)) for p in metainfos]
    if ignored:
        outcome.notes.append(f"{name}: ignored in its output: {', '.join(ignored)}")
    if not outcome.ready and not outcome.results and not empty:
        found = ", ".join(rel) if rel else "nothing"
        wanted = {
            "auto": "DICOM objects or a label map (.npy, .nii, .nii.gz) with a metainfo.json",
            "dicom": "DICOM objects",
            "labelmap": "a label map (.npy, .nii, .nii.gz)",
        }[cmd.output]
        raise PluginError(
            f"command plugin {name} wrote no result into its output folder (found: {found}); it should write {wanted}"
        )
    return outcome


def _metainfo(name: str, cmd: CommandPlugin, output_dir: Path, found: list[Path]) -> tuple[Any, str]:
    """The label map's segment template: a metainfo.json the command wrote, else the configured one."""
    from node.derive.template import TemplateError, load_template

    # metainfo.json by name first; another .json counts if it is a template (has segmentAttributes).
    for p in sorted(found, key=lambda p: (p.name != "metainfo.json", str(p))):
        try:
            if p.name != "metainfo.json" and "segmentAttributes" not in json.loads(p.read_text()):
                continue
            return load_template(p), str(p)
        except (OSError, ValueError) as e:  # TemplateError is a ValueError
            if isinstance(e, TemplateError) or p.name == "metainfo.json":
                raise PluginError(f"command plugin {name}: {e}") from None
    if cmd.metainfo is not None:
        return load_template(cmd.metainfo), str(cmd.metainfo)
    raise PluginError(
        f"command plugin {name} wrote a label map but no metainfo.json saying what its values "
        f"are; write one into {CONTAINER_OUTPUT if cmd.container else '{output}'} or set metainfo = "
        f'"/path/to/metainfo.json" in [plugins.commands.{name}]'
    )


# -- label maps --------------------------------------------------------------


def _as_labels(a: np.ndarray, where: str) -> np.ndarray:
    """Integer label values 0..65535 (what a SEG can hold), from any numeric array that holds them."""
    if a.dtype == bool:
        return a.astype(np.uint8)
    if np.issubdtype(a.dtype, np.floating):
        if not np.all(np.isfinite(a)) or not np.array_equal(a, np.round(a)):
            raise PluginError(f"{where}: the label map holds non-integer values; write label values 0, 1, 2, ...")
    elif not np.issubdtype(a.dtype, np.integer):
        raise PluginError(f"{where}: the label map is of type {a.dtype}; write integer label values")
    if a.size and (a.min() < 0 or a.max() > 65535):
        raise PluginError(f"{where}: label values range {a.min()}..{a.max()}; a label map holds 0..65535")
    return a.astype(np.uint8 if a.size == 0 or a.max() < 256 else np.uint16)


def read_labelmap(path: Path, series: SeriesInput, where: str) -> np.ndarray:
    """A label map file as (slices, rows, cols) in the series' order."""
    shape = (len(series), int(series.first.Rows), int(series.first.Columns))
    if path.suffix == ".npy":
        try:
            a = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise PluginError(f"{where}: not a readable .npy array: {e}") from None
        if a.shape != shape:
            raise PluginError(
                f"{where}: shape {a.shape}, but the input series is {shape} (slices, rows, columns) "
                "in the order of the input files' names"
            )
        return _as_labels(a, where)
    return _as_labels(nifti_on_grid(path, series, where), where)


def nifti_on_grid(path: Path, series: SeriesInput, where: str) -> np.ndarray:
    """A NIfTI volume on the series' grid, as (slices, rows, cols).

    NIfTI's affine maps voxel indices to RAS; the series' (:attr:`SeriesInput.affine`) maps (slice, row,
    column) to LPS. A tool may store the same grid with its axes in another order or reversed (dcm2niix
    and nibabel's canonical orientation do); anything else (resampled, cropped, shifted) is not the input
    grid and fails: it would be a different image.
    """
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    try:
        img = nib.load(str(path))
    except Exception as e:  # noqa: BLE001 (nibabel raises many kinds for a bad file)
        raise PluginError(f"{where}: not a readable NIfTI file: {e}") from None
    if not isinstance(img, SpatialImage) or img.affine is None:
        raise PluginError(f"{where}: a {type(img).__name__} without voxels on an affine; write a NIfTI label map")
    try:
        data = np.asanyarray(img.dataobj)
    except Exception as e:  # noqa: BLE001
        raise PluginError(f"{where}: not a readable NIfTI file: {e}") from None
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise PluginError(f"{where}: a {data.ndim}-D image with shape {data.shape}; a label map is 3-D")
    grid = series.affine
    if grid is None:
        raise PluginError(
            f"{where}: the input series has no patient geometry to place a NIfTI image on; "
            "write the label map as .npy in the order of the input files"
        )
    shape = (len(series), int(series.first.Rows), int(series.first.Columns))
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ img.affine
    # m maps a series index (slice, row, column) to a NIfTI index: a signed permutation plus an offset.
    out = _reoriented(data, np.linalg.solve(lps, grid), shape)
    if out is None:
        raise PluginError(
            f"{where}: the label map is not on the input grid (shape {data.shape}, affine "
            f"{np.round(img.affine, 3).tolist()} vs the series' {shape} voxels); write it on the "
            "input's voxels (axes may be reordered or flipped, not resampled, cropped or shifted)"
        )
    return np.ascontiguousarray(out)


def _reoriented(data: np.ndarray, m: np.ndarray, shape: tuple[int, int, int]) -> np.ndarray | None:
    """``data`` in the series' (slice, row, column) order; None if ``m`` does not map the same voxels.

    ``m`` maps a series index to a NIfTI index; the voxels are the same when it is a signed permutation of
    the axes with an offset that puts each reversed axis' first voxel at the series' last.
    """
    rot, offset = m[:3, :3], m[:3, 3]
    perm = np.round(rot)
    if not (
        np.allclose(rot, perm, atol=1e-3)
        and all(np.count_nonzero(perm[:, a]) == 1 for a in range(3))
        and all(np.count_nonzero(perm[i]) == 1 for i in range(3))
        and np.allclose(offset, np.round(offset), atol=1e-2)
    ):
        return None
    axes = [int(np.nonzero(perm[:, a])[0][0]) for a in range(3)]
    signs = [int(perm[axes[a], a]) for a in range(3)]
    out = np.transpose(data, axes)
    for a in range(3):
        start = int(round(offset[axes[a]]))
        expected = 0 if signs[a] > 0 else shape[a] - 1
        if out.shape[a] != shape[a] or start != expected:
            return None
        if signs[a] < 0:
            out = np.flip(out, axis=a)
    return out


# -- references of ready DICOM objects ---------------------------------------


def _series_refs(items: Any) -> set[str]:
    return {str(i.get("SeriesInstanceUID", "")) for i in items or []}


def _instance_refs(items: Any) -> set[str]:
    return {str(i.get("ReferencedSOPInstanceUID", "")) for i in items or []}


def _derivation_refs(ds: Dataset) -> set[str]:
    """Source instances named in an enhanced object's functional groups (Derivation Image Sequence)."""
    out: set[str] = set()
    groups = list(ds.get("SharedFunctionalGroupsSequence") or []) + list(
        ds.get("PerFrameFunctionalGroupsSequence") or []
    )
    for g in groups:
        for d in g.get("DerivationImageSequence") or []:
            out |= _instance_refs(d.get("SourceImageSequence"))
    return out


def check_references(ds: Dataset, series: SeriesInput, where: str) -> None:
    """A DICOM object a command wrote must be a new object of the input's patient and study that references it.

    Otherwise it would be filed with another patient or study, or overwrite an input instance at a PACS
    (which keeps one copy per SOP Instance UID).
    """
    src = series.first
    uid = str(src.get("SeriesInstanceUID", ""))
    inputs = {str(d.get("SOPInstanceUID", "")) for d in series.datasets}
    for key in ("StudyInstanceUID", "PatientID"):
        mine, theirs = str(ds.get(key, "") or ""), str(src.get(key, "") or "")
        if mine != theirs:
            raise PluginError(
                f"{where}: {key} is {mine!r}, the input's is {theirs!r}; a result must belong to "
                "the input's patient and study (copy both from the input files)"
            )
    if str(ds.get("SOPInstanceUID", "")) in inputs:
        raise PluginError(
            f"{where}: it has the SOP Instance UID of an input instance; a result needs a new "
            "SOP Instance UID (and a new Series Instance UID)"
        )
    if str(ds.get("SeriesInstanceUID", "")) == uid:
        raise PluginError(f"{where}: it is in the input series ({uid}); a result needs a new Series Instance UID")
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class in _SEG:
        if uid in _series_refs(ds.get("ReferencedSeriesSequence")):
            return
        what = "a SEG's Referenced Series Sequence must name the input series"
    elif str(ds.get("Modality", "")) == "SR" or sop_class.startswith("1.2.840.10008.5.1.4.1.1.88."):
        evidence: set[str] = set()
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence") or []:
            evidence |= _series_refs(study.get("ReferencedSeriesSequence"))
        if uid in evidence:
            return
        what = "an SR's Current Requested Procedure Evidence Sequence must name the input series"
    else:
        named = (
            _instance_refs(ds.get("SourceImageSequence"))
            | _instance_refs(ds.get("ReferencedImageSequence"))
            | _derivation_refs(ds)
        )
        if named & inputs or uid in _series_refs(ds.get("ReferencedSeriesSequence")):
            return
        what = (
            "an image must name input instances in Source Image Sequence or Referenced Image Sequence "
            "(or the input series in Referenced Series Sequence)"
        )
    raise PluginError(f"{where}: it does not reference the input series {uid}: {what}")
