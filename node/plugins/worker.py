"""The child process of a plugin job: load the series, run the plugin(s), build and write the DICOM outputs.

It runs under a memory limit (RLIMIT_AS) set before anything is loaded, and
reports back through a pipe: either the written outputs with timings, or an
error with a reason a person can act on. A crash or a hang never reaches the
node: the parent sees the process end (or kills it) and fails the job.
"""

from __future__ import annotations

import errno
import resource
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicom_node_sdk._info import as_results

from node.plugins.api import (
    GeometryError,
    Measurements,
    PluginError,
    ResultError,
    Segmentation,
    SeriesInput,
    Volume,
)


@dataclass
class StepSpec:
    name: str
    target: str
    params: dict[str, Any]
    #: "local" (imported here), "environment" (a warm worker, at ``socket``) or "command".
    kind: str = "local"
    #: For an environment plugin: the Unix socket of the worker leased for this job, and the plugin as its
    #: environment describes it (family, segment_template, max_attempts).
    socket: str = ""
    environment: str = ""
    remote: dict[str, Any] | None = None
    #: For a command plugin: its [plugins.commands.NAME] table.
    command: dict[str, Any] | None = None


@dataclass
class WorkSpec:
    files: list[str]
    steps: list[StepSpec]
    out_dir: str
    job_key: tuple[str, int, str, int]
    memory_limit_mb: int = 0
    transfer_syntax: str = "1.2.840.10008.1.2.1"
    keep_empty_frames: bool = False
    series_number: int = 9000
    series_description: str = ""
    station_name: str = ""
    #: This run's attempt number (1 for the first), for the plugin's retry policy.
    attempt: int = 1
    #: A dcmqi metainfo.json describing the segments of every Segmentation result, and what to do with a
    #: label it does not list ("error" or "skip").
    segment_template: str | None = None
    unknown_labels: str = "error"
    #: Also write each label map SEG as a BINARY SEG, for destinations that do not accept Label Map SEG.
    labelmap_as_binary: bool = False
    #: The GPU this job was given, None for the CPU.
    device: str | None = None
    #: Environment variables of the job's process (CUDA_VISIBLE_DEVICES when the node schedules GPUs).
    environ: dict[str, str] = field(default_factory=dict)
    #: A Key Object Selection listing the outputs, written after them: its title code (value, scheme,
    #: meaning) and description; None: none.
    key_objects: dict[str, str] | None = None
    #: A study rule's job: every named input's files (name -> file paths; ``files`` are the primary's), the
    #: primary's name and the study ({"study_uid", "study_date", "patient_id"}). Empty for a series rule.
    inputs: dict[str, list[str]] = field(default_factory=dict)
    primary: str = ""
    study: dict[str, str] = field(default_factory=dict)
    #: Prior studies of the patient (node.qr.priors), newest first: {"study_uid", "study_date", "series":
    #: [[file path, ...], ...]}; loaded as StudyInputs on the input's ``priors``.
    priors: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Output:
    file: str
    kind: str  # "SEG", "SC", "image", "parametric map", "SR" or "KOS"
    sop_instance_uid: str
    series_instance_uid: str
    #: For a BINARY SEG made for destinations that refuse Label Map SEG: the label map's SOP Instance UID.
    twin_of: str = ""


@dataclass
class WorkResult:
    ok: bool
    outputs: list[Output] = field(default_factory=list)
    error: str = ""
    retryable: bool = False
    #: Seconds spent loading the series, in the plugin(s), building the objects and writing them.
    timings: dict[str, float] = field(default_factory=dict)
    #: "name version" of each plugin that ran.
    plugins: list[str] = field(default_factory=list)
    #: Peak resident memory of the process (MiB), and how much of it came after the start (the job's own).
    peak_mb: float = 0.0
    peak_added_mb: float = 0.0
    #: What the job's summary should also say (e.g. the precision a derived image series keeps).
    notes: list[str] = field(default_factory=list)


def _statm_mb(field: int) -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[field]) * resource.getpagesize() / 2**20


def _rss_mb() -> float:
    return _statm_mb(1)


def address_space_mb() -> float:
    """What RLIMIT_AS counts: the process's whole address space (VmSize), in MiB."""
    return _statm_mb(0)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _limit_memory(mb: int) -> None:
    """Cap the address space at ``mb`` (0: no cap, back to the hard limit).

    Only the soft limit: the process can lift it again to report an allocation that failed.
    """
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    soft = mb * 2**20 if mb > 0 else hard
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def out_of_memory(limit_mb: int, baseline_mb: float, where: str = "") -> str:
    """What a plugin process that ran out of memory outside the plugin's run says, and what to change."""
    if not limit_mb:
        return f"ran out of memory{where} (no limit set: the machine itself is out of memory)"
    return (
        f"ran out of memory (limit {limit_mb} MB){where}: a plugin process takes about {baseline_mb:.0f} MB of "
        "address space after its imports, before it loads the series; raise memory_limit_mb for this rule "
        "(or [plugins] memory_limit_mb) well above that"
    )


def _timed(series: Any, timings: dict[str, float], total: list[float] | None = None) -> list[float]:
    """Wrap the series' pixel loader so its time goes to timings["load"]; returns the running total
    (``total``: one shared with other series, e.g. a study's inputs)."""
    total = [0.0] if total is None else total
    loader = series._loader

    def load(*args: Any) -> Any:
        t = time.perf_counter()
        try:
            return loader(*args)
        finally:
            spent = time.perf_counter() - t
            total[0] += spent
            timings["load"] += spent

    series._loader = load
    return total


def _study_input(spec: WorkSpec, primary: SeriesInput, timings: dict[str, float], pixel_read: list[float]) -> Any:
    """A study rule's inputs as a StudyInput around the loaded primary (None for a series rule's job).

    Every input gets ``.study`` and the priors the primary has; the other inputs' pixel reading counts
    as loading, like the primary's.
    """
    if not spec.inputs:
        return None
    from node.plugins.api import StudyInput
    from node.plugins.series import load_series

    t = time.perf_counter()
    inputs: dict[str, SeriesInput] = {}
    for name, files in spec.inputs.items():
        if name == spec.primary:
            inputs[name] = primary
            continue
        try:
            inputs[name] = load_series([Path(f) for f in files])
        except GeometryError as e:
            raise GeometryError(f"input {name}: {e}") from None
        _timed(inputs[name], timings, pixel_read)
    study = StudyInput(
        inputs,
        study_uid=spec.study.get("study_uid", ""),
        study_date=spec.study.get("study_date", ""),
        patient_id=spec.study.get("patient_id", ""),
        priors=primary.priors,
        primary_name=spec.primary,
    )
    for s in inputs.values():
        s.study, s.priors = study, primary.priors
    timings["load"] += time.perf_counter() - t
    return study


def _argument(info: Any, series: SeriesInput, study: Any) -> Any:
    """What a plugin's run gets: the StudyInput for a ``takes="study"`` plugin, else the (primary) series."""
    if getattr(info, "takes", "series") != "study":
        return series
    if study is None:
        raise PluginError(
            f'plugin {info.name} takes a study (takes = "study"): run it from a study rule (scope = "study")'
        )
    return study


def _failure(e: BaseException, step: str, spec: WorkSpec, info: Any) -> tuple[str, bool]:
    """What a failed step says, and whether another attempt may help."""
    from node.derive.errors import OutputError
    from node.derive.template import TemplateError

    if isinstance(e, MemoryError):
        if not spec.memory_limit_mb:
            return f"{step}: ran out of memory (no limit set: the machine itself is out of memory)", False
        return (
            f"{step}: ran out of memory (limit {spec.memory_limit_mb} MB); raise memory_limit_mb for this rule "
            "(or [plugins] memory_limit_mb) if the series needs it"
        ), False
    if isinstance(e, PluginError):
        # The plugin's own policy caps retries (the rule's max_attempts caps them too).
        limit = info.max_attempts if info is not None else None
        retryable = e.retryable and (limit is None or spec.attempt < limit)
        why = "" if retryable or not e.retryable else f" (no more retries: the plugin allows {limit} attempt(s))"
        return f"{step}: {e}{why}", retryable
    if isinstance(e, (GeometryError, ResultError, OutputError, TemplateError)):
        return f"{step}: {e}", False
    from dicom_node_sdk.protocol import RemoteError, WorkerGone

    if isinstance(e, RemoteError):
        if e.kind == "PluginError":
            limit = info.max_attempts if info is not None else None
            retryable = e.retryable and (limit is None or spec.attempt < limit)
            why = "" if retryable or not e.retryable else f" (no more retries: the plugin allows {limit} attempt(s))"
            return f"{step}: {e}{why}", retryable
        return f"{step}: {e}", False
    if isinstance(e, WorkerGone):  # killed, crashed, or the node stopped: another attempt gets a new worker
        return f"{step}: the plugin's worker ended during the job ({e})", True
    tb = traceback.extract_tb(e.__traceback__)
    where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return f"{step}: {type(e).__name__}: {e}{where}", False


def run(spec: WorkSpec) -> WorkResult:
    """Everything a plugin job does in its process; never raises.

    A step that fails ends the chain, but what the steps before it returned is still built and
    written: the result then has outputs *and* an error (``ok`` False), and the job keeps and sends
    what was made. Likewise one output that cannot be built or fails validation does not stop the
    others.
    """
    from node.derive.common import Provenance
    from node.plugins.registry import load
    from node.plugins.series import load_priors, load_series

    timings = {"load": 0.0, "plugin": 0.0, "build": 0.0, "write": 0.0}
    names: list[str] = []
    info: Any = None
    step = "loading the series"
    results: list[Any] = []
    #: For each result, the step (plugin and parameters) that produced it.
    made_by: list[Provenance] = []
    errors: list[str] = []
    retryable = False
    #: Ready DICOM objects a command plugin wrote (validated and written like the node's own outputs).
    ready: list[tuple[Any, Provenance]] = []
    #: What the job's summary should also say.
    notes: list[str] = []
    #: A study rule's inputs (None for a series rule's job, or before they are loaded).
    study: Any = None
    t = time.perf_counter()
    try:
        series = load_series([Path(f) for f in spec.files])
        if spec.priors:
            step = "loading the prior studies"
            series.priors = load_priors(spec.priors)
    except Exception as e:  # noqa: BLE001 (MemoryError included: it is an Exception)
        error, retryable = _failure(e, step, spec, info)
        return WorkResult(False, error=error, retryable=retryable, timings=timings, plugins=names, notes=notes)
    timings["load"] += time.perf_counter() - t
    try:
        # Pixels are read when a plugin first asks: count that reading as "load", not as the plugin's time.
        pixel_read = _timed(series, timings)
        step = "loading the study's inputs"
        study = _study_input(spec, series, timings, pixel_read)
        for k, s in enumerate(spec.steps):
            series.previous = list(results)
            if s.kind == "environment":
                step = f"running plugin {s.name} (environment {s.environment})"
                info = _RemoteInfo(s.remote or {})
                if (s.remote or {}).get("takes") == "study":
                    raise PluginError(
                        f'plugin {s.name} takes a study (takes = "study") and runs in environment {s.environment}: '
                        "the worker protocol passes one series; install it in the node's own environment"
                    )
                out, prov = _remote_step(s, k, series, spec, timings, pixel_read)
                names.append(prov.algorithm + " " + prov.algorithm_version)
            elif s.kind == "command":
                step = f"running command plugin {s.name}"
                info = None
                out, prov = _command_step(s, k, series, spec, timings, ready, notes)
                names.append(f"{s.name} {prov.algorithm_version}".strip())
            else:
                step = f"loading plugin {s.name}"
                info = load(s.name, s.target)
                names.append(f"{info.name} {info.version}")
                params = info.validate_params(s.params)
                # Algorithm Parameters: every parameter the plugin ran with, defaults included.
                prov = _provenance(spec, info.name, info.version, info.dump_params(params), info.family)
                step = f"running plugin {s.name}"
                t, before = time.perf_counter(), pixel_read[0]
                out = info.run(_argument(info, series, study), params)
                timings["plugin"] += time.perf_counter() - t - (pixel_read[0] - before)
            out = as_results(s.name, out)
            # The rule's template, else the plugin's own, describes its segments.
            template_path = spec.segment_template or (info.segment_template if info is not None else None)
            if template_path:
                from node.derive.template import apply_template, load_template

                template = load_template(template_path)
                out = [
                    apply_template(r, template, spec.unknown_labels, template_path)
                    if isinstance(r, Segmentation)
                    else r
                    for r in out
                ]
            results.extend(out)
            made_by.extend([prov] * len(out))
    except Exception as e:  # noqa: BLE001 (MemoryError included: it is an Exception)
        error, retryable = _failure(e, step, spec, info)
        errors.append(error)
        if not results and not ready:
            return WorkResult(False, error=error, retryable=retryable, timings=timings, plugins=names, notes=notes)
    # The voxels are the largest thing here; the builders need only metadata and the results.
    t = time.perf_counter()
    series.__dict__.pop("_voxels", None)
    series.__dict__.pop("_rescaled", None)
    timings["load"] += time.perf_counter() - t
    #: Each Segmentation result's SEG by the result's index (what an SR's measurement groups reference), and
    #: the BINARY copy of each label map SEG (what the SR's twin for the destinations of those copies references).
    segs = _Segs()
    built: dict[int, list[Output]] = {}
    # SEGs first (an SR names the SEG it measures by the SEG's UIDs); the outputs keep the results' order.
    for i in sorted(range(len(results)), key=lambda k: not isinstance(results[k], Segmentation)):
        step = f"building output {i + 1} of {len(results)} ({made_by[i].algorithm})"
        try:
            built[i] = _build_and_write(series, results[i], made_by[i], i, spec, timings, notes, segs, study)
        except Exception as e:  # noqa: BLE001
            errors.append(_failure(e, step, spec, None)[0])
    outputs: list[Output] = [o for i in sorted(built) for o in built[i]]
    for n, (ds, prov) in enumerate(ready):
        step = f"checking DICOM object {n + 1} of {len(ready)} written by {prov.algorithm}"
        try:
            outputs.append(_check_and_write_ready(series, ds, n, spec, timings, notes))
        except Exception as e:  # noqa: BLE001
            errors.append(_failure(e, step, spec, None)[0])
    if spec.key_objects is not None and outputs and errors and retryable:
        # A retry may make the outputs that failed: its KOS would list other objects, a second selection.
        notes.append("no Key Object Selection: some outputs failed and a retry may make them (the retry writes it)")
    elif spec.key_objects is not None and outputs:
        try:
            # The observer: the plugin of the last step (the one whose results the selection is about).
            outputs.extend(_write_key_objects(outputs, made_by[-1] if made_by else None, spec, timings, len(results)))
        except Exception as e:  # noqa: BLE001
            errors.append(_failure(e, "building the Key Object Selection of the outputs", spec, None)[0])
    if errors and outputs:
        notes.append(f"kept {len(outputs)} output(s) that were built before or beside the failure")
    # A retry may help even with outputs kept: they have the job's own UIDs, so a re-run stores and
    # sends nothing twice (the index keeps the first copy, the queue already has it).
    return WorkResult(
        not errors, outputs, error="; ".join(errors), retryable=retryable, timings=timings, plugins=names, notes=notes
    )


@dataclass
class _Segs:
    """The job's SEGs by result index, and the BINARY copies of its label map SEGs by the same index."""

    built: dict[int, Any] = field(default_factory=dict)
    binary: dict[int, Any] = field(default_factory=dict)


class _RemoteInfo:
    """What _failure and the template lookup need of a plugin that lives in another environment."""

    def __init__(self, remote: dict[str, Any]) -> None:
        self.max_attempts = remote.get("max_attempts")
        self.segment_template = remote.get("segment_template")


def _code(value: Any) -> Any:
    from pydicom.sr.coding import Code

    return Code(*value) if value else None


def _provenance(spec: WorkSpec, name: str, version: str, parameters: dict[str, Any], family: Any) -> Any:
    from node.derive.common import Provenance

    return Provenance(
        job_key=spec.job_key,
        algorithm=name,
        algorithm_version=version,
        parameters={k: str(v) for k, v in parameters.items()},
        station_name=spec.station_name,
        series_number=spec.series_number,
        series_description=spec.series_description,
        **({"family": family} if family is not None else {}),
    )


def _transfer_dir(spec: WorkSpec) -> Path:
    """Where arrays for a worker go: a folder in the job's own, in the page cache of the data directory.

    Not /dev/shm: tmpfs maps 4 KiB pages (a 150 MB volume takes ~38,000 page faults to map, 20 ms),
    while ext4 and XFS on current kernels map the page cache in large folios (~1 ms); a container's
    /dev/shm is often 64 MB; and the job's folder goes with the job, however its process ends.
    """
    import tempfile

    return Path(tempfile.mkdtemp(prefix="transfer-", dir=spec.out_dir))


def share_voxels(series: Any, folder: Path) -> Path:
    """Where the series' voxels go for a worker (a .npy file it maps); decoded straight into it when not read yet.

    Voxels already in memory (an earlier step read them) are written there by encode_series.
    """
    import numpy as np

    path = folder / "voxels.npy"
    if "_voxels" not in series.__dict__:

        def into(shape: tuple[int, ...], dtype: Any) -> Any:
            mapped = np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=shape)
            _reserve(path, mapped)
            _huge_pages(mapped)
            return mapped

        series.__dict__["_voxels"] = series._loader(into)  # later steps here read the same mapped pixels
    return path


def _reserve(path: Path, mapped: Any) -> None:
    """Allocate the file's blocks now: a full disk is then an error that says so, not a SIGBUS mid-decode."""
    import os

    size = int(mapped.offset) + int(mapped.nbytes)
    try:
        with open(path, "r+b") as f:
            os.posix_fallocate(f.fileno(), 0, size)
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise OSError(
                e.errno,
                f"no room in the job's folder {path.parent} for the {size / 2**20:.0f} MiB of "
                "voxels handed to the plugin's worker (free space on the data directory's disk)",
            ) from None
        # EOPNOTSUPP and the like: a filesystem without fallocate; the writes allocate as they go


def _huge_pages(mapped: Any) -> None:
    """Ask for the file's page cache in huge folios: written through a map in 4 KiB pages it costs ~4x more to
    write here and ~15x more for the worker to map (one fault per page); a hint, ignored where unsupported."""
    import mmap

    try:
        mapped._mmap.madvise(mmap.MADV_HUGEPAGE)
    except (AttributeError, OSError, ValueError):
        pass


def _remote_step(
    s: StepSpec, k: int, series: Any, spec: WorkSpec, timings: dict[str, float], pixel_read: list[float]
) -> tuple[list[Any], Any]:
    """Run one step in its warm worker: voxels through a mapped file, results back as mapped arrays."""
    import shutil

    from dicom_node_sdk.protocol import WorkerClient, encode_series

    folder = _transfer_dir(spec)
    try:
        t = time.perf_counter()
        before = pixel_read[0]
        voxels = share_voxels(series, folder)
        message = encode_series(series, voxels)
        out_dir = folder / f"results-{k}"
        out_dir.mkdir()
        with WorkerClient(s.socket) as client:
            t_call = time.perf_counter()
            reply = client.run(message, s.params, attempt=spec.attempt, out_dir=out_dir, previous=list(series.previous))
            call = time.perf_counter() - t_call
        # Results are mapped from files in ``folder``; the mappings outlive the files (removed below).
        results = list(reply.results)
        spent = time.perf_counter() - t
        timings["plugin"] += reply.seconds
        # The rest of the step (sharing the voxels beyond decoding them, the round trip, reading results).
        timings["transfer"] = timings.get("transfer", 0.0) + max(0.0, spent - reply.seconds - (pixel_read[0] - before))
        timings["call"] = timings.get("call", 0.0) + max(0.0, call - reply.seconds)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    name, _, version = reply.plugin.partition(" ")
    remote = s.remote or {}
    prov = _provenance(
        spec,
        name or s.name,
        version or str(remote.get("version", "")),
        dict(reply.parameters),
        _code(remote.get("family")),
    )
    return results, prov


def _command_step(
    s: StepSpec,
    k: int,
    series: Any,
    spec: WorkSpec,
    timings: dict[str, float],
    ready: list[tuple[Any, Any]],
    notes: list[str] | None = None,
) -> tuple[list[Any], Any]:
    """Run a command plugin on the series; its label maps become results, its ready DICOM objects outputs.

    ``notes`` gets what the job's summary should say about its output (an empty label map, files ignored).
    """
    from node.config import CommandPlugin
    from node.plugins.commands import run_command

    cmd = CommandPlugin.model_validate(s.command or {})  # the table as configured (the job sends only set keys)
    work = Path(spec.out_dir) / f"command-{k}"
    work.mkdir(parents=True, exist_ok=True)
    outcome = run_command(s.name, cmd, series, work, device=spec.device)
    timings["plugin"] += outcome.seconds
    prov = _provenance(spec, s.name, cmd.version, {}, None)
    ready.extend((ds, prov) for ds in outcome.ready)
    if notes is not None:
        notes.extend(n for n in outcome.notes if n not in notes)
    return list(outcome.results), prov


_KINDS = {
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.66.7": "SEG",
    "1.2.840.10008.5.1.4.1.1.30": "parametric map",
    "1.2.840.10008.5.1.4.1.1.88.59": "KOS",
}


def _ready_kind(ds: Any) -> str:
    """The output kind of a ready DICOM object, by SOP class (as the job summary and metrics count them)."""
    from pydicom.uid import UID

    uid = str(ds.get("SOPClassUID", ""))
    if uid in _KINDS:
        return _KINDS[uid]
    name = UID(uid).name if uid else ""
    if "Secondary Capture" in name:
        return "SC"
    if "SR" in name.split() or "Structured" in name or "Report" in name:
        return "SR"
    return "image"


def _check_and_write_ready(
    series: Any, ds: Any, n: int, spec: WorkSpec, timings: dict[str, float], notes: list[str]
) -> Output:
    """A DICOM object a command wrote: repaired where the standard allows, validated, written as an output."""
    t = time.perf_counter()
    kind = _ready_kind(ds)
    _check(ds, series.first, kind, notes)
    timings["build"] += time.perf_counter() - t
    t = time.perf_counter()
    path = Path(spec.out_dir) / f"ready-{n:05d}.dcm"
    ds.save_as(path, enforce_file_format=True)
    timings["write"] += time.perf_counter() - t
    return Output(str(path), kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


def _check(ds: Any, source: Any, kind: str, notes: list[str]) -> None:
    """Repair what the standard allows, then validate against the IOD: an invalid object is never written."""
    from node.derive.errors import OutputError
    from node.derive.validate import as_in_source, repair, validate

    def note(text: str) -> None:
        if text not in notes:  # once per kind of output, not once per slice
            notes.append(text)

    for change in repair(ds, source):
        # One note per attribute and action, not one per slice with its value: "LABEL: WHAT -> ACTION".
        label, _, action = change.partition(": ")
        note(f"{kind}: {label} -> {action.rpartition(' -> ')[2] or action}")
    problems, inherited = as_in_source(validate(ds), ds, source)
    for p in inherited:
        note(f"{kind}: {p.keyword} kept as the source has it ({p.what}), so the result is filed with its source")
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise OutputError(
            f"the {kind} is not valid DICOM, so it was not stored or sent: " + "; ".join(map(str, problems[:5])) + more
        )


def _build_and_write(
    series: Any,
    r: Any,
    prov: Any,
    i: int,
    spec: WorkSpec,
    timings: dict[str, float],
    notes: list[str],
    segs: _Segs | None = None,
    study: Any = None,
) -> list[Output]:
    """One result as DICOM objects, written to the job's folder (nothing written if any of them fails).

    ``segs``: the SEGs written so far by result index; a Segmentation's SEG (and its BINARY copy) is
    added once written, a Measurements' SR references them. An SR referencing a label map SEG that
    has a BINARY copy gets a twin referencing the copy, for the destinations that get the copy.
    ``study``: a study rule's inputs, where an SR's ``evidence_series`` may point.
    """
    from pydicom.uid import UID

    from node.derive.image import build_image_series, build_parametric_map
    from node.derive.sc import build_sc
    from node.derive.seg import build_seg
    from node.derive.sr import build_sr

    t = time.perf_counter()
    ts = UID(spec.transfer_syntax)
    twins: list[Any] = []
    #: How exactly an image result's values were stored (said in the job's summary).
    stored = ""
    if isinstance(r, Segmentation):
        datasets = [build_seg(series, r, prov, index=i, transfer_syntax=ts, keep_empty_frames=spec.keep_empty_frames)]
        kind = "SEG"
        if r.kind == "labelmap" and spec.labelmap_as_binary:
            # For destinations that do not take Label Map Segmentation Storage: the same segments, BINARY.
            twins = [
                build_seg(
                    series,
                    r,
                    prov,
                    index=i,
                    transfer_syntax=ts,
                    keep_empty_frames=spec.keep_empty_frames,
                    as_binary=True,
                )
            ]
    elif isinstance(r, Volume) and r.kind == "parametric-map":
        datasets = [build_parametric_map(series, r, prov, index=i)]
        kind = "parametric map"
    elif isinstance(r, Volume):
        datasets, error = build_image_series(series, r, prov, index=i, transfer_syntax=ts)
        kind = "image"
        stored = f"{r.name or 'volume'} stored " + ("exactly" if error == 0 else f"within {error:.3g}")
    elif isinstance(r, Measurements):
        segs = segs if segs is not None else _Segs()
        datasets = [build_sr(series, r, prov, index=i, segs=segs.built, study=study)]
        kind = "SR"
        label_maps = {str(segs.built[k].SOPInstanceUID) for k in segs.binary}
        if label_maps & _evidence_uids(datasets[0]):
            twins = [build_sr(series, r, prov, index=i, segs={**segs.built, **segs.binary}, study=study, binary=True)]
    else:
        datasets = build_sc(series, r, prov, index=i, transfer_syntax=ts)
        kind = "SC"
    for ds in [*datasets, *twins]:
        _check(ds, series.first, kind, notes)
    if stored:
        notes.append(stored)
    if isinstance(r, (Segmentation, Measurements)) or (isinstance(r, Volume) and r.kind == "parametric-map"):
        from node.derive.sources import prepare

        for repair in prepare(series).repairs:  # what the sources lacked (made once per series, see prepare)
            if f"sources: {repair}" not in notes:
                notes.append(f"sources: {repair}")
    timings["build"] += time.perf_counter() - t
    t = time.perf_counter()
    out_dir = Path(spec.out_dir)
    written: list[Output] = []
    try:
        for n, ds in enumerate(datasets):
            path = out_dir / f"{i:03d}-{n:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(Output(str(path), kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
        for ds in twins:
            path = out_dir / f"{i:03d}-binary.dcm"
            ds.save_as(path, enforce_file_format=True)
            written.append(
                Output(
                    str(path),
                    kind,
                    str(ds.SOPInstanceUID),
                    str(ds.SeriesInstanceUID),
                    twin_of=str(datasets[0].SOPInstanceUID),
                )
            )
    except BaseException:
        for o in written:
            Path(o.file).unlink(missing_ok=True)
        raise
    timings["write"] += time.perf_counter() - t
    if segs is not None and kind == "SEG":
        segs.built[i] = datasets[0]
        if twins:
            segs.binary[i] = twins[0]
    return written


def _evidence_uids(ds: Any) -> set[str]:
    """The SOP Instance UIDs an SR lists as evidence of the current procedure."""
    return {
        str(sop.ReferencedSOPInstanceUID)
        for study in ds.get("CurrentRequestedProcedureEvidenceSequence", [])
        for series in study.ReferencedSeriesSequence
        for sop in series.ReferencedSOPSequence
    }


def _write_key_objects(
    outputs: list[Output], prov: Any, spec: WorkSpec, timings: dict[str, float], results: int
) -> list[Output]:
    """The Key Object Selection listing the job's outputs (not the BINARY copies of label maps), written last.

    When some outputs have BINARY twins (label map SEGs and the SRs on them), a twin KOS lists the twins
    in their place, for the destinations that get the twins: each destination gets a selection of what
    it received.
    """
    import pydicom
    from pydicom.sr.coding import Code

    from node.derive.kos import build_kos

    t = time.perf_counter()
    ko = spec.key_objects or {}
    if prov is None:  # only ready objects of a command plugin: the job itself
        prov = _provenance(spec, spec.steps[0].name if spec.steps else "dicom-node", "", {}, None)
    twin = {o.twin_of: o for o in outputs if o.twin_of}
    originals = [o for o in outputs if not o.twin_of]
    selections = [("key-objects", originals)]
    if twin:
        selections.append(("key-objects-binary", [twin.get(o.sop_instance_uid, o) for o in originals]))
    written: list[Output] = []
    for name, listed_outputs in selections:
        listed = [pydicom.dcmread(o.file, stop_before_pixels=True) for o in listed_outputs]
        ds = build_kos(
            listed,
            prov,
            title=Code(ko["value"], ko["scheme"], ko["meaning"]),
            description=ko.get("description", ""),
            series_number=spec.series_number + results,
        )
        _check(ds, listed[0], "KOS", [])
        path = Path(spec.out_dir) / f"{name}.dcm"
        ds.save_as(path, enforce_file_format=True)
        twin_of = written[0].sop_instance_uid if written else ""
        written.append(Output(str(path), "KOS", str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID), twin_of=twin_of))
    timings["build"] += time.perf_counter() - t
    return written


def main(spec: WorkSpec, conn: Any) -> None:
    """Process entry point: contain, limit memory, run, send the result back.

    A limit below what the process takes already (its baseline: the fork server's imports) fails at
    once and says so. An allocation that fails outside ``run`` (in sending the result, say) is
    reported as running out of memory too, not as a process that ended without a result.
    """
    import psutil

    from node.plugins._forkserver import contain
    from node.plugins.runtime import kill_descendants

    contain()  # its own process group and subreaper; it dies with the fork server, which dies with the node
    import os

    os.environ.update(spec.environ)
    # Source data sets often carry one-component names ("HEAD"); highdicom warns on each copy.
    warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
    baseline = address_space_mb()
    limit = spec.memory_limit_mb
    try:
        if 0 < limit <= baseline:
            result = WorkResult(False, error=out_of_memory(limit, baseline))
        else:
            _limit_memory(limit)
            start = _rss_mb()
            result = run(spec)
            result.peak_mb = _peak_mb()
            result.peak_added_mb = max(0.0, result.peak_mb - start)
        conn.send(result)
    except MemoryError:
        _limit_memory(0)
        conn.send(WorkResult(False, error=out_of_memory(limit, baseline, " outside the plugin's run")))
    finally:
        conn.close()
        kill_descendants(psutil.Process())  # what the plugin started and left running ends with the job
