"""The child process of a plugin job: load the series, run the plugin(s), build and write the DICOM outputs.

It runs under a memory limit (RLIMIT_AS) set before anything is loaded, and
reports back through a pipe: either the written outputs with timings, or an
error with a reason a person can act on. A crash or a hang never reaches the
node: the parent sees the process end (or kills it) and fails the job.
"""

from __future__ import annotations

import resource
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from node.plugins.api import GeometryError, Images, PluginError, Segmentation, Volume


@dataclass
class StepSpec:
    name: str
    target: str
    params: dict[str, Any]


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


@dataclass
class Output:
    file: str
    kind: str  # "SEG", "SC" or "image"
    sop_instance_uid: str
    series_instance_uid: str


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


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _limit_memory(mb: int) -> None:
    if mb > 0:
        limit = mb * 2**20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def _timed(series: Any, timings: dict[str, float]) -> list[float]:
    """Wrap the series' pixel loader so its time goes to timings["load"]; returns the running total."""
    total = [0.0]
    loader = series._loader

    def load() -> Any:
        t = time.perf_counter()
        try:
            return loader()
        finally:
            spent = time.perf_counter() - t
            total[0] += spent
            timings["load"] += spent

    series._loader = load
    return total


def run(spec: WorkSpec) -> WorkResult:
    """Everything a plugin job does in its process; never raises."""
    from pydicom.uid import UID

    from node.derive.common import Provenance
    from node.derive.image import build_image_series, build_parametric_map
    from node.derive.sc import build_sc
    from node.derive.errors import OutputError
    from node.derive.seg import build_seg
    from node.derive.template import TemplateError
    from node.plugins.registry import load
    from node.plugins.series import load_series

    timings = {"load": 0.0, "plugin": 0.0, "build": 0.0, "write": 0.0}
    names: list[str] = []
    info = None
    step = "loading the series"
    try:
        t = time.perf_counter()
        series = load_series([Path(f) for f in spec.files])
        timings["load"] += time.perf_counter() - t
        # Pixels are read when a plugin first asks: count that reading as "load", not as the plugin's time.
        pixel_read = _timed(series, timings)
        results: list[Any] = []
        #: For each result, the step (plugin and parameters) that produced it.
        made_by: list[Provenance] = []
        for s in spec.steps:
            step = f"loading plugin {s.name}"
            info = load(s.name, s.target)
            names.append(f"{info.name} {info.version}")
            params = info.validate_params(s.params)
            # Algorithm Parameters: every parameter the plugin ran with, defaults included.
            prov = Provenance(
                job_key=spec.job_key, algorithm=info.name, algorithm_version=info.version,
                parameters={k: str(v) for k, v in params.model_dump(mode="json").items()},
                station_name=spec.station_name,
                series_number=spec.series_number, series_description=spec.series_description, family=info.family,
            )  # fmt: skip
            step = f"running plugin {s.name}"
            series.previous = list(results)
            t, before = time.perf_counter(), pixel_read[0]
            out = info.run(series, params)
            timings["plugin"] += time.perf_counter() - t - (pixel_read[0] - before)
            if out is None:
                out = []
            if not isinstance(out, (list, tuple)):
                out = [out]
            for r in out:
                if not isinstance(r, (Segmentation, Images, Volume)):
                    raise PluginError(f"plugin {s.name} returned a {type(r).__name__}; results are Segmentation, "
                                      "Images or Volume")  # fmt: skip
            # The rule's template, else the plugin's own, describes its segments.
            template_path = spec.segment_template or info.segment_template
            if template_path:
                from node.derive.template import apply_template, load_template

                template = load_template(template_path)
                out = [apply_template(r, template, spec.unknown_labels, template_path)
                       if isinstance(r, Segmentation) else r for r in out]  # fmt: skip
            results.extend(out)
            made_by.extend([prov] * len(out))
        # The voxels are the largest thing here; the builders need only metadata and the results.
        t = time.perf_counter()
        series.__dict__.pop("_voxels", None)
        series.__dict__.pop("_rescaled", None)
        timings["load"] += time.perf_counter() - t
        outputs: list[Output] = []
        notes: list[str] = []
        out_dir = Path(spec.out_dir)
        ts = UID(spec.transfer_syntax)
        for i, (r, prov) in enumerate(zip(results, made_by, strict=True)):
            step = f"building output {i + 1} of {len(results)}"
            t = time.perf_counter()
            if isinstance(r, Segmentation):
                datasets = [build_seg(series, r, prov, index=i, transfer_syntax=ts,
                                      keep_empty_frames=spec.keep_empty_frames)]  # fmt: skip
                kind = "SEG"
            elif isinstance(r, Volume) and r.kind == "parametric-map":
                datasets = [build_parametric_map(series, r, prov, index=i)]
                kind = "parametric map"
            elif isinstance(r, Volume):
                datasets, error = build_image_series(series, r, prov, index=i, transfer_syntax=ts)
                kind = "image"
                notes.append(f"{r.name or 'volume'} stored " + ("exactly" if error == 0 else f"within {error:.3g}"))
            else:
                datasets = build_sc(series, r, prov, index=i, transfer_syntax=ts)
                kind = "SC"
            timings["build"] += time.perf_counter() - t
            t = time.perf_counter()
            for n, ds in enumerate(datasets):
                path = out_dir / f"{i:03d}-{n:05d}.dcm"
                ds.save_as(path, enforce_file_format=True)
                outputs.append(Output(str(path), kind, str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID)))
            timings["write"] += time.perf_counter() - t
        return WorkResult(True, outputs, timings=timings, plugins=names, notes=notes)
    except MemoryError:
        limit = (f"limit {spec.memory_limit_mb} MB; raise memory_limit_mb for this plugin if the series needs it"
                 if spec.memory_limit_mb else "no limit set: the machine itself is out of memory")  # fmt: skip
        return WorkResult(False, error=f"{step}: ran out of memory ({limit})", timings=timings, plugins=names)
    except PluginError as e:
        # The plugin's own policy caps retries (the rule's max_attempts caps them too).
        limit = info.max_attempts if info is not None else None
        retryable = e.retryable and (limit is None or spec.attempt < limit)
        why = "" if retryable or not e.retryable else f" (no more retries: the plugin allows {limit} attempt(s))"
        return WorkResult(False, error=f"{step}: {e}{why}", retryable=retryable, timings=timings, plugins=names)
    except (GeometryError, OutputError, TemplateError) as e:
        return WorkResult(False, error=f"{step}: {e}", timings=timings, plugins=names)
    except Exception as e:
        tb = traceback.extract_tb(e.__traceback__)
        where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        return WorkResult(False, error=f"{step}: {type(e).__name__}: {e}{where}", timings=timings, plugins=names)


def main(spec: WorkSpec, conn: Any) -> None:
    """Process entry point: limit memory, run, send the result back."""
    from node.plugins._forkserver import die_with_parent

    die_with_parent()  # the fork server; which itself dies with the node
    # Source data sets often carry one-component names ("HEAD"); highdicom warns on each copy.
    warnings.filterwarnings("ignore", message=".*unlikely to represent the intended person name")
    _limit_memory(spec.memory_limit_mb)
    start = _rss_mb()
    result = run(spec)
    result.peak_mb = _peak_mb()
    result.peak_added_mb = max(0.0, result.peak_mb - start)
    conn.send(result)
    conn.close()
