"""``dicom-node plugins run``: a plugin (or a chain) on files, exactly as a node job would run it, with no node.

A plugin author's loop is "change the code, run it on a real series, look at the DICOM". This module
gives that loop the node's own runtime rather than a look-alike: each series goes through
:func:`node.plugins.runtime.run_in_process` with a :class:`~node.plugins.worker.WorkSpec`, as
``node.jobs.actions.plugin`` builds one: a fresh process from the fork server, the plugin's timeout and
memory limit, warm workers for plugins in an environment of their own, and every output repaired and
validated against its IOD before it is written. What the node would refuse is refused here, with the
same message. Nothing touches an index, a network or a running node: the outputs go to a folder.

Each run makes new UIDs (a run id takes the place of a job's key), so outputs of two runs with other
parameters never share a SOP Instance UID when both are sent to a PACS.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from node.config import Config, error_text, loc_to_key
from node.dicom.files import Rejected, is_dicomdir, iter_files, read_file_header
from node.plugins.inputs import input_keys

if TYPE_CHECKING:
    from node.plugins.pool import WorkerPool
    from node.plugins.worker import StepSpec, WorkResult

#: Written into each series folder this command fills, so a later run may replace that folder (and no other).
MARKER = ".dicom-node-plugins-run"


class OfflineError(Exception):
    """The run cannot start (an unknown plugin, invalid parameters, no series): the message says what to change."""


@dataclass(frozen=True)
class SourceSeries:
    """The files of one series among the paths given, with what a person recognises it by."""

    uid: str
    files: list[Path]
    modality: str
    number: str
    description: str
    study_uid: str = ""
    study_date: str = ""
    patient_id: str = ""

    def label(self) -> str:
        """``CT series 2 "STD BRAIN 5MM" (28 files)``."""
        what = f"{self.modality or '?'} series {self.number or '?'}"
        if self.description:
            what += f' "{self.description}"'
        return f"{what} ({len(self.files)} file{'s' if len(self.files) != 1 else ''})"

    def series_number(self) -> int | None:
        try:
            return int(self.number)
        except ValueError:
            return None


@dataclass(frozen=True)
class RunInput:
    """What one run takes: a series, or (``--study``) a study's series by input name around its primary."""

    primary: SourceSeries
    #: A study run's series by input name (empty for a series run), and the primary's name among them.
    inputs: dict[str, SourceSeries] = field(default_factory=dict)
    primary_name: str = ""

    def label(self) -> str:
        if not self.inputs:
            return self.primary.label()
        names = ", ".join(f"{k} ({len(v.files)} files)" for k, v in self.inputs.items())
        return f"study {self.primary.study_uid}: {names}; primary {self.primary_name}"


def group_series(
    paths: Iterable[Path], outputs: Path | None = None
) -> tuple[list[SourceSeries], list[tuple[Path, str]]]:
    """The DICOM series among ``paths`` (files or folders), and each file left out with the reason.

    Files are checked as the node checks what it receives (node.dicom.files: whole, readable), so a
    truncated file is named here rather than failing the plugin's load; a DICOMDIR (a CD's index) and
    files that are not DICOM are left out, and so is what lies in ``outputs`` (``--out`` inside an
    input folder: an earlier run's SEG is not a series to run on).
    """
    groups: dict[str, list[tuple[Path, Any]]] = {}
    skipped: list[tuple[Path, str]] = []
    out = outputs.resolve() if outputs is not None else None
    for path in iter_files(paths):
        if out is not None and path.resolve().is_relative_to(out):
            skipped.append((path, "in the --out folder (outputs of a run, not a source)"))
            continue
        try:
            header, _size, meta = read_file_header(path)
        except Rejected as e:
            skipped.append((path, f"not a DICOM file the node would store: {e.reason}"))
            continue
        except OSError as e:
            skipped.append((path, f"cannot be read: {e.strerror or e}"))
            continue
        if is_dicomdir(str(meta.get("MediaStorageSOPClassUID", ""))):
            skipped.append((path, "a DICOMDIR (an index of the files, not an instance)"))
            continue
        uid = header.text("SeriesInstanceUID")
        if not uid:
            skipped.append((path, "no Series Instance UID"))
            continue
        groups.setdefault(uid, []).append((path, header))
    found = []
    for uid, items in groups.items():
        first = items[0][1]
        found.append(
            SourceSeries(
                uid,
                [p for p, _ in items],
                first.text("Modality"),
                first.text("SeriesNumber"),
                first.text("SeriesDescription", 64),
                first.text("StudyInstanceUID"),
                first.text("StudyDate"),
                first.text("PatientID"),
            )
        )
    return found, skipped


def _by_study(series: Iterable[SourceSeries]) -> dict[str, list[SourceSeries]]:
    studies: dict[str, list[SourceSeries]] = {}
    for s in series:
        studies.setdefault(s.study_uid, []).append(s)
    return studies


def runs(series: list[SourceSeries], *, study: bool = False, primary: str | None = None) -> list[RunInput]:
    """One run per series; with ``study``, one per study, its series as named inputs (``primary``: which one)."""
    if not study:
        return [RunInput(s) for s in series]
    out = []
    for uid, group in _by_study(series).items():
        keys = input_keys(group, SourceSeries.series_number, lambda s: s.uid)
        name = primary or next(iter(keys))
        if name not in keys:
            raise OfflineError(f"--primary {name}: study {uid} has no such series; its series are {', '.join(keys)}")
        out.append(RunInput(keys[name], keys, name))
    return out


def prior_studies(series: list[SourceSeries]) -> list[dict[str, Any]]:
    """``--prior`` files as a job's WorkSpec.priors: one entry per study, newest first, each series' files."""
    studies = [
        {
            "study_uid": uid,
            "study_date": group[0].study_date,
            "series": [[str(f.resolve()) for f in s.files] for s in group],
        }
        for uid, group in _by_study(series).items()
    ]
    return sorted(studies, key=lambda p: str(p["study_date"]), reverse=True)


def parse_params(text: str | None, chain: list[str]) -> list[dict[str, Any]]:
    """``--params``: one JSON object for one plugin, or a list of objects, one per plugin of a chain."""
    if not text:
        return [{} for _ in chain]
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise OfflineError(f"--params is not JSON: {e.msg} at character {e.pos + 1}") from None
    if isinstance(value, dict):
        if len(chain) > 1:
            raise OfflineError(
                f"--params for a chain of {len(chain)} plugins is a JSON list of {len(chain)} objects, "
                'one per plugin in order, e.g. [{"lower": 200}, {}]'
            )
        return [value]
    if isinstance(value, list) and all(isinstance(v, dict) for v in value):
        if len(value) != len(chain):
            raise OfflineError(
                f"--params has {len(value)} object(s) for {len(chain)} plugin(s) ({', '.join(chain)}): give one per plugin"
            )
        return list(value)
    raise OfflineError('--params must be a JSON object (e.g. {"lower": 200}), or a list of them for a chain')


def plan_steps(cfg: Config, chain: list[str], params: list[dict[str, Any]]) -> list[StepSpec]:
    """The chain as the job's process takes it, each plugin found and its parameters checked first.

    Parameters are checked here as ``rules check`` checks a rule's, so a misspelt key is named before
    any series is loaded.
    """
    from dicom_node_sdk.params import ParamsError

    from node.plugins.registry import PluginLoadError, check_params, describe, discover
    from node.plugins.worker import StepSpec

    try:
        installed = discover(cfg.plugins)
    except PluginLoadError as e:
        raise OfflineError(str(e)) from None
    steps = []
    problems = []
    for name, p in zip(chain, params, strict=True):
        ref = installed.get(name)
        if ref is None:
            known = ", ".join(sorted(installed)) or "none"
            raise OfflineError(
                f"no plugin {name!r} is installed (installed: {known}); install its package "
                "(pip install -e DIR) or add it to [plugins] local in the config given with --config"
            )
        try:
            described = describe(ref, cfg.plugins)
            found = check_params(described, p)
        except PluginLoadError as e:
            raise OfflineError(str(e)) from None
        except ParamsError as e:
            found = [(loc_to_key(tuple(err["loc"])), error_text(err)) for err in e.errors()]
        problems += [f"{name} params{'.' + key if key else ''}: {message}" for key, message in found]
        command = (
            cfg.plugins.commands[name].model_dump(mode="json", exclude_unset=True) if ref.kind == "command" else None
        )
        steps.append(
            StepSpec(
                name,
                ref.target,
                p,
                kind=ref.kind,
                environment=ref.environment or "",
                remote=dict(ref.remote) if ref.remote else None,
                command=command,
            )
        )
    if problems:
        raise OfflineError("invalid parameters:\n  " + "\n  ".join(problems))
    return steps


@dataclass
class WrittenOutput:
    kind: str
    file: Path
    sop_class: str


@dataclass
class SeriesRun:
    """One series' run: what was written where, the job's result (timings, notes, error) and its wall time."""

    unit: RunInput
    folder: Path
    outputs: list[WrittenOutput] = field(default_factory=list)
    #: What each command plugin printed, kept beside its outputs.
    logs: list[Path] = field(default_factory=list)
    result: WorkResult | None = None
    error: str = ""
    seconds: float = 0.0
    #: Of ``seconds``: starting the warm workers of environment plugins (their setup loads the model).
    worker_start: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.error

    @property
    def series(self) -> SourceSeries:
        """The series the outputs are built on (a study run's primary)."""
        return self.unit.primary


def _series_folder(out: Path, uid: str) -> Path:
    """``out/<Series Instance UID>``, emptied when an earlier run of this command made it; refused otherwise."""
    folder = out / uid
    if folder.exists() and any(folder.iterdir()):
        if not (folder / MARKER).exists():
            raise OfflineError(f"{folder} holds files this command did not write; give another --out or move them away")
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text("outputs of dicom-node plugins run; a next run replaces this folder\n")
    return folder


def _lease_workers(cfg: Config, steps: list[StepSpec], workers: WorkerPool) -> list[Any]:
    """A warm worker for each step whose plugin lives in an environment (as a node job leases one)."""
    from node.plugins.pool import WorkerKey, WorkerSpec, WorkerStartError

    leased = []
    for st in steps:
        if st.kind != "environment":
            continue
        env = cfg.plugins.environments[st.environment]
        try:
            w = workers.lease(
                WorkerKey(st.environment, st.name, st.target), WorkerSpec(env.python, dict(env.env), env.warm(st.name))
            )
        except WorkerStartError as e:
            raise OfflineError(str(e)) from None
        leased.append(w)
        st.socket = w.socket
    return leased


def run_series(
    cfg: Config,
    unit: RunInput,
    steps: list[StepSpec],
    out: Path,
    *,
    timeout: float,
    run_id: str,
    workers: WorkerPool,
    priors: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> SeriesRun:
    """Run the chain on one series (or study) in a plugin process; its outputs end up in ``out/<series UID>``."""
    from node.plugins.runtime import PluginRunError, run_in_process
    from node.plugins.worker import WorkSpec

    series = unit.primary
    folder = _series_folder(out, series.uid)
    done = SeriesRun(unit, folder)
    # Absolute: a plugin's worker (another interpreter) runs in a folder of its own.
    work = Path(tempfile.mkdtemp(prefix=".work-", dir=out)).resolve()
    spec = WorkSpec(
        files=[str(f.resolve()) for f in series.files],
        steps=steps,
        out_dir=str(work),
        job_key=(series.uid, 1, f"plugins run {run_id}", 0),
        memory_limit_mb=cfg.plugins.memory_limit_mb,
        station_name=cfg.node.ae_title,
        inputs={name: [str(f.resolve()) for f in s.files] for name, s in unit.inputs.items()},
        primary=unit.primary_name,
        study=(
            {"study_uid": series.study_uid, "study_date": series.study_date, "patient_id": series.patient_id}
            if unit.inputs
            else {}
        ),
        # As a node fetches them: other studies than the one the run is on.
        priors=[p for p in priors if p["study_uid"] != series.study_uid],
    )
    t = time.monotonic()
    leased: list[Any] = []
    try:
        leased = _lease_workers(cfg, steps, workers)
        done.worker_start = time.monotonic() - t
        done.result = result = run_in_process(spec, timeout=timeout, workers=1)
        done.error = result.error if not result.ok else ""
        for o in result.outputs:
            src = Path(o.file)
            target = folder / f"{o.kind.replace(' ', '-').lower()}-{src.name}"
            shutil.move(src, target)
            done.outputs.append(WrittenOutput(o.kind, target, _sop_class(target)))
        for k, st in enumerate(steps):  # a command plugin's own output, kept beside what it made
            log = work / f"command-{k}" / "command.log"
            if st.kind == "command" and log.exists():
                done.logs.append(Path(shutil.move(log, folder / f"{st.name}.log")))
    except PluginRunError as e:  # stopped or crashed: the state of its workers is unknown (as in a node job)
        done.error = str(e)
        for w in leased:
            w.throw_away(f"plugins run failed while it used it: {e}")
        leased = []
    except OfflineError as e:
        done.error = str(e)
    finally:
        for w in leased:
            w.give_back(healthy=w.alive())
        shutil.rmtree(work, ignore_errors=True)
        done.seconds = time.monotonic() - t
    return done


def _sop_class(path: Path) -> str:
    """The SOP Class of a written output by name ("Segmentation Storage"), else its UID."""
    from pydicom.filereader import read_file_meta_info
    from pydicom.uid import UID

    uid = UID(str(read_file_meta_info(path).get("MediaStorageSOPClassUID", "")))
    return str(uid.name or uid)


def run(
    cfg: Config,
    chain: list[str],
    units: list[RunInput],
    params: list[dict[str, Any]],
    out: Path,
    *,
    timeout: float | None = None,
    priors: list[dict[str, Any]] = (),  # type: ignore[assignment]
) -> Iterator[SeriesRun]:
    """Run the chain on each series (or study) in turn, yielding each run as it ends (the command prints as it goes).

    Raises OfflineError before anything runs when a plugin or its parameters are wrong.
    """
    from node.plugins.pool import WorkerPool

    if not units:
        raise OfflineError("no DICOM series in the given paths")
    steps = plan_steps(cfg, chain, params)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file of that name, no permission: before any plugin runs
        raise OfflineError(f"--out {out}: cannot make that folder: {e.strerror or e}") from None
    run_id = uuid.uuid4().hex
    with tempfile.TemporaryDirectory(prefix="dicom-node-worker-logs-") as logs:
        workers = WorkerPool(Path(logs))
        try:
            for unit in units:
                yield run_series(
                    cfg,
                    unit,
                    steps,
                    out,
                    timeout=timeout or cfg.plugins.timeout,
                    run_id=run_id,
                    workers=workers,
                    priors=list(priors),
                )
        finally:
            workers.close()


def timing_line(done: SeriesRun) -> str:
    """``load 0.70 s, plugin 0.01 s, build 0.12 s, write 0.02 s; peak memory 480 MiB (...)``: where the time went."""
    r = done.result
    if r is None:
        return f"{done.seconds:.2f} s"
    t = r.timings
    parts = [f"load {t.get('load', 0):.2f} s", f"plugin {t.get('plugin', 0):.2f} s"]
    if "transfer" in t:
        parts.append(f"worker transfer {t['transfer'] * 1000:.0f} ms")
    parts += [f"build {t.get('build', 0):.2f} s", f"write {t.get('write', 0):.2f} s"]
    spent = done.worker_start + sum(t.get(k, 0.0) for k in ("load", "plugin", "transfer", "build", "write"))
    start = f"worker start and setup {done.worker_start:.2f} s; " if done.worker_start >= 0.005 else ""
    return (
        ", ".join(parts)
        + f"; {start}process start and hand-over {max(0.0, done.seconds - spent):.2f} s; total {done.seconds:.2f} s"
        + f"; peak memory {r.peak_mb:.0f} MiB, {r.peak_added_mb:.0f} MiB for the run"
    )
