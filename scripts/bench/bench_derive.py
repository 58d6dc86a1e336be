#!/usr/bin/env python3
"""Derived SEG: the node's plugin job vs the same SEG made by a bare highdicom script (issue 4).

Target (issue 4): "for a 200-slice 512x512 CT, time and peak memory from job
start to stored SEG, split into load, plugin, build, encode; and the same mask
built by bare highdicom in a script beside it.  The node's load + build +
encode at most 1.2x bare highdicom; peak memory at most 2x the voxel array."

One repetition = a freshly generated synthetic CT series (new UIDs; bone,
i.e. stored value - 1024 > 300 HU, is an ellipse in every slice), measured
three ways, in an order that rotates between repetitions:

* **node, end to end**: the series is sent with DCMTK ``storescu`` (loopback,
  ``TCP_NODELAY=1``; the send is not timed) to a running node whose only rule
  runs the built-in ``threshold-seg`` plugin on CT series (``[tracker]
  stable_after = 1``, ``use_expected_counts = false``).  From the node's index:
  ``job.started_at`` (worker's claim), the stored SEG's ``instance.received_at``
  (its index record, made just before fsync + rename + commit) and
  ``job.finished_at``; and the job's ``result`` text, where the plugin process
  reports its own split (0.1 s resolution) and peak memory.
* **node, in-process worker**: the same pipeline, ``node.plugins.worker.run``,
  called in a fresh Python process that first imports what the node's fork
  server preloads.  Precise timings, plus instrumentation added from outside
  (wrappers, nothing in node/ changed): the header read, the pixel read (lazy,
  so the node's own ``load`` does not contain it: it happens inside the
  plugin's first ``series.voxels()`` and is counted as ``plugin``), the
  plugin's import, the mask check/conversion in ``build_seg``, and the peak
  RSS at the end of each phase.
* **bare highdicom**: a fresh Python process that reads the files with
  ``pydicom.dcmread``, sorts them by ImagePositionPatient z, stacks the pixel
  arrays, computes the mask (rescaled value > 300, on stored values), builds a
  BINARY ``highdicom.seg.Segmentation`` with the same segment codes and
  ``omit_empty_frames=True`` and saves it with ``save_as(path,
  enforce_file_format=True)``.

The three SEGs are checked to hold the same mask (number of set voxels, frame
count, identical Pixel Data).  Peak memory is ``ru_maxrss`` of the process that
did the work minus its RSS before loading (the node reports it the same way for
its plugin process); for the script's own child processes VmHWM is recorded too
as a cross-check.  The voxel array is slices x rows x cols x 2 bytes (the
stored 16-bit values: 100 MiB for 200 x 512 x 512); ratios to the float32
array (200 MiB) are printed too.

Usage::

    python scripts/bench/bench_derive.py --repeat 5
    python scripts/bench/bench_derive.py --quick        # 2 repetitions of 40 slices
    python scripts/bench/bench_derive.py --repeat 5 --what-if   # + runs with the causes of the peak removed
    python scripts/bench/bench_derive.py --repeat 5 --profile   # + a cProfile of one in-process run

``--what-if`` runs the in-process worker a few more times with one cause of the
node's time and peak memory removed at a time, by patching inside the child
process (nothing in node/ is changed): highdicom's standard tables loaded
before the job, the plugin's module imported before the job, and threshold-seg
writing its comparison straight into the result mask.

Everything runs on loopback; every child process is stopped on exit, error
or Ctrl-C, and every wait is bounded.  Exit status 1 if a repetition failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    ECHOSCU,
    LOOPBACK,
    REPO_ROOT,
    STORESCU,
    NodeReceiver,
    ProcessGroup,
    ReceiverUnavailable,
    SeriesSpec,
    dcmtk_env,
    generate_series,
    install_sigterm_handler,
    log,
    machine_info,
    make_workdir,
    missing_binaries,
    rmtree_quiet,
    tail,
    tool_versions,
    wait_until,
)
from report import cell, median, ratio, spread, table  # noqa: E402

RULE = "ct-bone"
PLUGIN = "threshold-seg"
PLUGIN_TARGET = "node.plugins.builtin.threshold:threshold_seg"
LOWER_HU = 300
PARAMS = {"segments": [{"label": "Bone", "lower": LOWER_HU, "type": "Bone"}]}
#: The node's default [plugins] memory_limit_mb, applied to the in-process worker as the node does.
MEMORY_LIMIT_MB = 8192
WARNING_FILTER = ".*unlikely to represent the intended person name"
#: --what-if: in-process worker runs with one cause of time / memory removed at a time (cumulative).
WHAT_IF = [
    ((), "the node as it is"),
    (("warm-highdicom",), "+ highdicom's standard tables loaded before the job (as a fork server preload could)"),
    (("warm-highdicom", "preload-plugin"), "+ the plugin module (scipy.ndimage) imported before the job"),
    (
        ("warm-highdicom", "preload-plugin", "lean-threshold"),
        "+ threshold written into the result mask (np.greater_equal(..., out=)), no ones() / comparison temporaries",
    ),
]
RESULT_RE = re.compile(
    r"load ([\d.]+) s, plugin ([\d.]+) s, build ([\d.]+) s, write ([\d.]+) s; "
    r"peak memory (\d+) MiB, (\d+) MiB for the job"
)


# --------------------------------------------------------------------------
# Child processes (run as: bench_derive.py --child worker|bare IN.json OUT.json)
# --------------------------------------------------------------------------


def _rss_mib() -> float:
    import resource

    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _vmhwm_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _lean_threshold(wrapped: Any) -> Any:
    """--what-if only: threshold-seg's masks written straight into the result (lower bounds only, uniform
    rescale), instead of a full-size ones() mask and a full-size comparison temporary per segment."""

    def run(series: Any, params: Any) -> Any:
        import numpy as np

        from node.plugins.api import Segment, Segmentation
        from node.plugins.builtin.codes import sct

        stored = series.voxels()
        slope, intercept = series.uniform_rescale()
        if slope is None or slope <= 0 or any(r.upper is not None or r.lower is None for r in params.segments):
            return wrapped(series, params)
        masks = np.zeros((*stored.shape, len(params.segments)), dtype=bool)
        for i, r in enumerate(params.segments):
            np.greater_equal(stored, (r.lower - intercept) / slope, out=masks[..., i])
        segments = [Segment(r.label, sct(r.category), sct(r.type)) for r in params.segments]
        out = [Segmentation(masks, segments, description="threshold-seg")]
        return out

    return run


def child_worker(cfg: dict[str, Any]) -> dict[str, Any]:
    """node.plugins.worker.run on the files, with phase timers and peaks added from outside."""
    import dataclasses
    import importlib
    import warnings

    warnings.filterwarnings("ignore", message=WARNING_FILTER)  # as worker.main does
    from node.plugins.runtime import _PRELOAD  # what the node's plugin fork server imports before forking

    for mod in _PRELOAD:
        importlib.import_module(mod)
    from node.derive import seg as seg_mod
    from node.plugins import registry, worker
    from node.plugins import series as series_mod

    variant = set(cfg.get("variant", []))
    extra = {"headers": 0.0, "pixels": 0.0, "plugin_import": 0.0, "masks_check": 0.0, "build_seg": 0.0}
    peaks: dict[str, float] = {}
    load_series, reg_load, masks, build_seg = (series_mod.load_series, registry.load, seg_mod._masks, seg_mod.build_seg)

    def timed_load_series(files: list[Path]) -> Any:
        t = time.perf_counter()
        s = load_series(files)
        extra["headers"] += time.perf_counter() - t
        peaks["headers"] = _maxrss_mib()
        loader = s._loader

        def timed_loader() -> Any:
            t = time.perf_counter()
            a = loader()
            extra["pixels"] += time.perf_counter() - t
            peaks["pixels"] = _maxrss_mib()
            return a

        s._loader = timed_loader
        return s

    def timed_reg_load(name: str, target: str) -> Any:
        t = time.perf_counter()
        info = reg_load(name, target)
        extra["plugin_import"] += time.perf_counter() - t
        run = _lean_threshold(info.run) if "lean-threshold" in variant else info.run

        def peak_run(series: Any, params: Any) -> Any:
            out = run(series, params)
            peaks["plugin"] = _maxrss_mib()
            return out

        return dataclasses.replace(info, run=peak_run)

    def timed_masks(series: Any, result: Any) -> Any:
        t = time.perf_counter()
        m = masks(series, result)
        extra["masks_check"] += time.perf_counter() - t
        return m

    def timed_build_seg(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        ds = build_seg(*a, **k)
        extra["build_seg"] += time.perf_counter() - t
        peaks["build"] = _maxrss_mib()
        return ds

    series_mod.load_series = timed_load_series
    registry.load = timed_reg_load
    if "warm-highdicom" in variant:  # what a fork server could do once: highdicom's standard tables, loaded lazily
        from highdicom import _standard_utils as su

        for fn in (
            "get_sop_class_iod_map",
            "get_iod_module_map",
            "get_module_attribute_map",
            "get_anatomic_region_map",
        ):
            getattr(su, fn)()
    if "preload-plugin" in variant:  # ... and the plugin's module (threshold.py imports scipy.ndimage)
        importlib.import_module(PLUGIN_TARGET.partition(":")[0])
    seg_mod._masks = timed_masks
    seg_mod.build_seg = timed_build_seg

    spec = worker.WorkSpec(
        files=cfg["files"],
        steps=[worker.StepSpec(PLUGIN, PLUGIN_TARGET, PARAMS)],
        out_dir=cfg["out_dir"],
        job_key=tuple(cfg["job_key"]),
        memory_limit_mb=MEMORY_LIMIT_MB,  # type: ignore[arg-type]
    )
    worker._limit_memory(spec.memory_limit_mb)  # as worker.main does, then the same start measurement
    start = worker._rss_mb()
    profile = None
    if cfg.get("profile"):
        import cProfile

        profile = cProfile.Profile()
        profile.enable()
    t = time.perf_counter()
    result = worker.run(spec)
    total = time.perf_counter() - t
    if profile is not None:
        import io
        import pstats

        profile.disable()
        buf = io.StringIO()
        st = pstats.Stats(profile, stream=buf)
        st.sort_stats("cumulative").print_stats(35)
        st.sort_stats("tottime").print_stats(20)
        Path(cfg["profile"]).write_text(buf.getvalue())
    peak = worker._peak_mb()
    return {
        "ok": result.ok,
        "error": result.error,
        "timings": result.timings,
        "extra": extra,
        "total": total,
        "start_mib": start,
        "peak_mib": peak,
        "vmhwm_mib": _vmhwm_mib(),
        "phase_peaks_mib": peaks,
        "outputs": [o.file for o in result.outputs],
        "plugins": result.plugins,
    }


def child_bare(cfg: dict[str, Any]) -> dict[str, Any]:
    """The same SEG with pydicom + numpy + highdicom only, as a script would make it."""
    import warnings

    warnings.filterwarnings("ignore", message=WARNING_FILTER)  # same filter as the node's plugin process
    import highdicom as hd
    import numpy as np
    from pydicom import dcmread
    from pydicom.sr.codedict import codes
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    start = _rss_mib()
    peaks: dict[str, float] = {}
    t0 = time.perf_counter()
    datasets = [dcmread(f) for f in cfg["files"]]
    datasets.sort(key=lambda d: float(d.ImagePositionPatient[2]))
    volume = np.stack([d.pixel_array for d in datasets])
    t1 = time.perf_counter()
    peaks["load"] = _maxrss_mib()
    slopes = {float(d.get("RescaleSlope", 1)) for d in datasets}
    intercepts = {float(d.get("RescaleIntercept", 0)) for d in datasets}
    if len(slopes) == 1 and len(intercepts) == 1 and next(iter(slopes)) > 0:  # compare stored values
        bound = (LOWER_HU - next(iter(intercepts))) / next(iter(slopes))
        mask = volume > bound
        mask_ge = int(np.count_nonzero(volume >= bound))
    else:
        slope = np.array([float(d.get("RescaleSlope", 1)) for d in datasets], np.float32)[:, None, None]
        icpt = np.array([float(d.get("RescaleIntercept", 0)) for d in datasets], np.float32)[:, None, None]
        hu = volume * slope + icpt
        mask = hu > LOWER_HU
        mask_ge = int(np.count_nonzero(hu >= LOWER_HU))
    t2 = time.perf_counter()
    peaks["mask"] = _maxrss_mib()
    algorithm = hd.AlgorithmIdentificationSequence(
        name=PLUGIN, family=codes.cid7162.ArtificialIntelligence, version="1.0"
    )
    description = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Bone",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Bone,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
    )
    seg = hd.seg.Segmentation(
        source_images=datasets,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=generate_uid(),
        series_number=9000,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="bench",
        manufacturer_model_name="bench",
        software_versions="1.0",
        device_serial_number="1",
        content_description="threshold",
        content_label="SEGMENTATION",
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=bool(mask.any()),
    )
    t3 = time.perf_counter()
    peaks["build"] = _maxrss_mib()
    seg.save_as(cfg["out"], enforce_file_format=True)
    t4 = time.perf_counter()
    return {
        "ok": True,
        "timings": {"load": t1 - t0, "mask": t2 - t1, "build": t3 - t2, "write": t4 - t3},
        "total": t4 - t0,
        "start_mib": start,
        "peak_mib": _maxrss_mib(),
        "vmhwm_mib": _vmhwm_mib(),
        "phase_peaks_mib": peaks,
        "mask_voxels": int(np.count_nonzero(mask)),
        "mask_voxels_ge": mask_ge,
        "voxel_bytes": int(volume.nbytes),
        "voxel_dtype": str(volume.dtype),
        "outputs": [cfg["out"]],
    }


def child_main(kind: str, in_path: str, out_path: str) -> int:
    cfg = json.loads(Path(in_path).read_text())
    try:
        out = child_worker(cfg) if kind == "worker" else child_bare(cfg)
    except Exception as e:  # reported to the parent, which fails the repetition
        import traceback

        out = {"ok": False, "error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}
    Path(out_path).write_text(json.dumps(out))
    return 0


def run_child(kind: str, cfg: dict[str, Any], work: Path, timeout: float) -> dict[str, Any]:
    """One child process (fresh interpreter, so its peak RSS is its own); bounded by ``timeout``."""
    work.mkdir(parents=True, exist_ok=True)
    cfg_path, out_path, log_path = work / f"{kind}-in.json", work / f"{kind}-out.json", work / f"{kind}.log"
    cfg_path.write_text(json.dumps(cfg))
    with open(log_path, "wb") as logf:
        try:
            rc = subprocess.run(
                [sys.executable, str(Path(__file__).resolve()), "--child", kind, str(cfg_path), str(out_path)],
                cwd=REPO_ROOT,
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                timeout=timeout,
                check=False,
            ).returncode
        except subprocess.TimeoutExpired:  # subprocess.run has killed it
            return {"ok": False, "error": f"{kind} child timed out after {timeout:.0f} s"}
    if rc != 0 or not out_path.exists():
        return {"ok": False, "error": f"{kind} child rc={rc}: {tail(log_path, 8)}"}
    return json.loads(out_path.read_text())


# --------------------------------------------------------------------------
# The node, end to end
# --------------------------------------------------------------------------


class DeriveNode(NodeReceiver):
    """The node with a 1 s quiet period and one rule: CT -> threshold-seg (bone > 300 HU)."""

    def __init__(self, pg: ProcessGroup, stable_after: float) -> None:
        super().__init__(pg)
        self.stable_after = stable_after

    def extra_config(self) -> str:
        return (
            "min_free_mb = 0\n"  # still in [node]: the benchmark is not about free space
            "\n[tracker]\n"
            f"stable_after = {self.stable_after}\n"
            "use_expected_counts = false\n"
            "\n[[rules]]\n"
            f'name = "{RULE}"\n'
            'match = { Modality = "CT" }\n'
            f'actions = [{{ type = "plugin", plugin = "{PLUGIN}", params = {{ segments = [{{ label = "Bone", '
            f'lower = {LOWER_HU}, type = "Bone" }}] }} }}]\n'
        )

    def describe(self) -> str:
        return (
            f"python -m node run ([tracker] stable_after = {self.stable_after:g}, use_expected_counts = false; "
            f"rule {RULE}: Modality = CT -> plugin {PLUGIN}, segments = [Bone, lower = {LOWER_HU}]; "
            "[plugins] defaults)"
        )

    def plugin_job(self, series_uid: str) -> dict[str, Any] | None:
        rows = self.query(
            "select j.id, j.state, j.attempts, j.result, j.last_error, j.created_at, j.started_at, j.finished_at "
            "from job j join series s on s.id = j.series_fk where s.series_instance_uid = ? and j.kind = 'plugin' "
            "order by j.id",
            series_uid,
        )
        if not rows:
            return None
        keys = ("id", "state", "attempts", "result", "last_error", "created_at", "started_at", "finished_at")
        out = dict(zip(keys, rows[-1], strict=True))
        out["jobs"] = len(rows)
        out["outputs"] = self.query(
            "select received_at, file_path, sop_class_uid from instance where job_fk = ? order by id", out["id"]
        )
        return out


def utc_ts(value: object) -> float:
    """The node's index time text ('YYYY-MM-DD HH:MM:SS.ffffff', UTC) as a POSIX timestamp."""
    parsed = dt.datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def send(pg: ProcessGroup, files: list[Path], port: int, ae: str, log_dir: Path, timeout: float) -> str:
    """One storescu association (not timed); returns an error or ''."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "storescu.log"
    cmd = [STORESCU, "-ll", "error", "-aec", ae, "-to", "30", "-ta", "60", LOOPBACK, str(port), *map(str, files)]
    proc = pg.start(cmd, log_path=log_path, env=dcmtk_env())
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        pg.stop(proc)
        return f"storescu timed out after {timeout:.0f} s"
    pg.stop(proc)  # exited: only forgets it
    return "" if rc == 0 else f"storescu rc={rc}: {tail(log_path, 5)}"


# --------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------


@dataclass
class Run:
    way: str  # "node-job", "node-worker", "bare"
    rep: int
    ok: bool = True
    error: str = ""
    #: Seconds: load, plugin (node) / mask (bare), build, write.
    load: float = 0.0
    plugin: float = 0.0
    build: float = 0.0
    write: float = 0.0
    #: node-worker: the same, with the pixel read moved from "plugin" to "load".
    load_px: float | None = None
    plugin_px: float | None = None
    #: node-job: job.started_at -> SEG instance.received_at / job.finished_at; others: the whole run.
    total: float = 0.0
    job_to_finished: float | None = None
    peak_mib: float = 0.0
    added_mib: float = 0.0
    mask_voxels: int | None = None
    seg_frames: int | None = None
    seg_pixel_digest: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def lbw(self) -> float:
        return self.load + self.build + self.write

    @property
    def lbw_px(self) -> float | None:
        return None if self.load_px is None else self.load_px + self.build + self.write

    @property
    def lpbw(self) -> float:
        return self.load + self.plugin + self.build + self.write


def seg_summary(path: Path) -> tuple[int, int, str]:
    """(set voxels, frames, digest of Pixel Data) of a BINARY SEG, without unpacking it."""
    import hashlib

    import numpy as np
    from pydicom import dcmread

    ds = dcmread(path)
    data = ds.PixelData
    ones = int(np.bitwise_count(np.frombuffer(data, np.uint8)).sum())  # 1 bit per voxel, padding is 0
    return ones, int(ds.NumberOfFrames), hashlib.sha256(data).hexdigest()[:16]


def check_peak(res: dict[str, Any], what: str) -> None:
    """ru_maxrss can carry a parent's peak over an exec (vfork); VmHWM cannot: they should agree."""
    if abs(res["peak_mib"] - res["vmhwm_mib"]) > 2:
        log(f"warning: {what}: ru_maxrss {res['peak_mib']:.0f} MiB but VmHWM {res['vmhwm_mib']:.0f} MiB")


def measure_job(
    node: DeriveNode, rep: int, files: list[Path], series_uid: str, log_dir: Path, args: argparse.Namespace
) -> Run:
    run = Run("node-job", rep)
    err = send(node.pg, files, node.port, node.ae_title, log_dir, args.send_timeout)
    if err:
        run.ok, run.error = False, err
        return run
    row: dict[str, Any] = {}

    def done() -> bool:
        got = node.plugin_job(series_uid)
        if got is None or got["state"] not in ("succeeded", "failed", "cancelled"):
            return False
        row.update(got)
        return True

    limit = args.stable_after + args.job_timeout
    # The times come from the node's index, so a slow poll loses no precision and disturbs the job less.
    if not wait_until(done, limit, interval=0.25):
        got = node.plugin_job(series_uid)
        run.ok, run.error = False, f"no finished plugin job within {limit:.0f} s (job: {got})"
        return run
    run.extra = {k: str(v) for k, v in row.items()}
    if row["state"] != "succeeded" or row["jobs"] != 1 or row["attempts"] != 1:
        run.ok = False
        run.error = f"job {row['state']} ({row['jobs']} job(s), attempt {row['attempts']}): {row['last_error']}"
        return run
    m = RESULT_RE.search(row["result"] or "")
    segs = [o for o in row["outputs"] if o[2] == "1.2.840.10008.5.1.4.1.1.66.4"]
    if not m or len(segs) != 1:
        run.ok, run.error = False, f"unexpected job result / outputs: {row['result']!r}, {row['outputs']}"
        return run
    run.load, run.plugin, run.build, run.write = (float(m.group(i)) for i in range(1, 5))
    run.peak_mib, run.added_mib = float(m.group(5)), float(m.group(6))
    start = utc_ts(row["started_at"])
    run.total = utc_ts(segs[0][0]) - start
    run.job_to_finished = utc_ts(row["finished_at"]) - start
    run.mask_voxels, run.seg_frames, run.seg_pixel_digest = seg_summary(node.data_dir / segs[0][1])
    return run


def measure_worker(
    rep: int,
    files: list[Path],
    series_uid: str,
    work: Path,
    timeout: float,
    profile: Path | None = None,
    variant: tuple[str, ...] = (),
) -> Run:
    run = Run("node-worker" + "".join(f"+{v}" for v in variant), rep)
    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {
        "files": [str(f) for f in files],
        "out_dir": str(out_dir),
        "job_key": [series_uid, 1, RULE, 0],
        "profile": str(profile) if profile else "",
        "variant": list(variant),
    }
    res = run_child("worker", cfg, work, timeout)
    if not res.get("ok"):
        run.ok, run.error = False, res.get("error", "?")
        return run
    check_peak(res, run.way)
    t, x = res["timings"], res["extra"]
    run.load, run.plugin, run.build, run.write = t["load"], t["plugin"], t["build"], t["write"]
    # The worker counts the (lazy) pixel read in "load" and leaves it out of "plugin" itself.
    run.load_px, run.plugin_px = t["load"], t["plugin"]
    run.total = res["total"]
    run.peak_mib, run.added_mib = res["peak_mib"], max(0.0, res["peak_mib"] - res["start_mib"])
    run.extra = {
        "extra": x,
        "start_mib": res["start_mib"],
        "vmhwm_mib": res["vmhwm_mib"],
        "phase_peaks_mib": res["phase_peaks_mib"],
    }
    if len(res["outputs"]) != 1:
        run.ok, run.error = False, f"expected one SEG, got {res['outputs']}"
        return run
    run.mask_voxels, run.seg_frames, run.seg_pixel_digest = seg_summary(Path(res["outputs"][0]))
    return run


def measure_bare(rep: int, files: list[Path], work: Path, timeout: float) -> Run:
    run = Run("bare", rep)
    res = run_child("bare", {"files": [str(f) for f in files], "out": str(work / "bare-seg.dcm")}, work, timeout)
    if not res.get("ok"):
        run.ok, run.error = False, res.get("error", "?")
        return run
    check_peak(res, run.way)
    t = res["timings"]
    run.load, run.plugin, run.build, run.write = t["load"], t["mask"], t["build"], t["write"]
    run.total = res["total"]
    run.peak_mib, run.added_mib = res["peak_mib"], max(0.0, res["peak_mib"] - res["start_mib"])
    run.extra = {
        k: res[k]
        for k in (
            "start_mib",
            "vmhwm_mib",
            "phase_peaks_mib",
            "mask_voxels",
            "mask_voxels_ge",
            "voxel_bytes",
            "voxel_dtype",
        )
    }
    voxels, run.seg_frames, run.seg_pixel_digest = seg_summary(Path(res["outputs"][0]))
    run.mask_voxels = res["mask_voxels"]
    if voxels != res["mask_voxels"]:
        run.ok, run.error = False, f"bare SEG holds {voxels} set voxels, its mask {res['mask_voxels']}"
    return run


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def vals(runs: list[Run], attr: str) -> list[float]:
    out = []
    for r in runs:
        v = getattr(r, attr)
        if r.ok and v is not None:
            out.append(float(v))
    return out


def report(runs: list[Run], voxel_mib: float, markdown: bool) -> tuple[str, dict[str, Any]]:
    job = [r for r in runs if r.way == "node-job"]
    wrk = [r for r in runs if r.way == "node-worker"]
    bare = [r for r in runs if r.way == "bare"]
    out: list[str] = []
    summary: dict[str, Any] = {}
    header = [
        "s, median (min-max)",
        "load",
        "plugin / mask",
        "build",
        "write",
        "load+build+write",
        "total",
        "peak MiB",
        "peak added MiB",
        "added / int16 array",
        "added / float32 array",
    ]

    def mem(rs: list[Run]) -> list[str]:
        added = vals(rs, "added_mib")
        return [
            cell(vals(rs, "peak_mib"), "{:.0f}"),
            cell(added, "{:.0f}"),
            cell([a / voxel_mib for a in added]),
            cell([a / (2 * voxel_mib) for a in added]),
        ]

    rows = [
        [
            "node, job end to end (its result text: 0.1 s / 1 MiB steps; pixel read in load)",
            cell(vals(job, "load")),
            cell(vals(job, "plugin")),
            cell(vals(job, "build")),
            cell(vals(job, "write")),
            cell(vals(job, "lbw")),
            cell(vals(job, "total")),
            *mem(job),
        ],
        [
            "node, in-process worker as it reports (pixel read in load)",
            cell(vals(wrk, "load")),
            cell(vals(wrk, "plugin")),
            cell(vals(wrk, "build")),
            cell(vals(wrk, "write")),
            cell(vals(wrk, "lbw")),
            cell(vals(wrk, "total")),
            *mem(wrk),
        ],
        [
            "node, in-process worker, pixel read counted as load",
            cell(vals(wrk, "load_px")),
            cell(vals(wrk, "plugin_px")),
            cell(vals(wrk, "build")),
            cell(vals(wrk, "write")),
            cell(vals(wrk, "lbw_px")),
            cell(vals(wrk, "total")),
            *mem(wrk),
        ],
        [
            "bare highdicom (load = read + sort + stack pixels)",
            cell(vals(bare, "load")),
            cell(vals(bare, "plugin")),
            cell(vals(bare, "build")),
            cell(vals(bare, "write")),
            cell(vals(bare, "lbw")),
            cell(vals(bare, "total")),
            *mem(bare),
        ],
    ]
    out.append(table(rows, header, markdown))
    out.append("")
    out.append(
        "total: node job = job.started_at -> stored SEG's instance.received_at; in-process and bare = the "
        "whole pipeline in the process (imports excluded)."
    )
    if job:
        out.append(f"node job: job.started_at -> job.finished_at {cell(vals(job, 'job_to_finished'))} s")

    # Ratios and targets.
    r_lbw = ratio(vals(wrk, "lbw_px"), vals(bare, "lbw"))
    r_lbw_asrep = ratio(vals(wrk, "lbw"), vals(bare, "lbw"))
    r_total_w = ratio(vals(wrk, "total"), vals(bare, "total"))
    r_job_phases = ratio(vals(job, "lpbw"), vals(bare, "lpbw"))
    r_job_total = ratio(vals(job, "total"), vals(bare, "total"))
    mem_job = ratio(vals(job, "added_mib"), [voxel_mib])
    mem_wrk = ratio(vals(wrk, "added_mib"), [voxel_mib])
    mem_bare = ratio(vals(bare, "added_mib"), [voxel_mib])

    def f(x: float | None, target: float | None = None) -> str:
        if x is None:
            return "n/a"
        if target is None:
            return f"{x:.2f}"
        return f"{x:.2f} (target <= {target:g}: {'met' if x <= target else 'MISSED'})"

    ratio_rows = [
        ["node load+build+write / bare load+build+write (in-process worker, pixel read in load)", f(r_lbw, 1.2)],
        ["  same, from the worker's reported split", f(r_lbw_asrep)],
        ["node worker whole run / bare whole run (load+plugin+build+write, + plugin import)", f(r_total_w)],
        ["node job load+plugin+build+write (result text) / bare load+mask+build+write", f(r_job_phases)],
        ["node job start -> SEG stored / bare whole run", f(r_job_total)],
        ["node job peak added / int16 voxel array", f(mem_job, 2)],
        ["node job peak added / float32 voxel array", f(None if mem_job is None else mem_job / 2, 2)],
        ["node in-process worker peak added / int16 voxel array", f(mem_wrk, 2)],
        ["bare highdicom peak added / int16 voxel array (reference)", f(mem_bare)],
    ]
    out.append("")
    out.append(table(ratio_rows, ["ratio (of medians)", "value"], markdown))
    summary["ratios"] = {
        "lbw_node_worker_over_bare": r_lbw,
        "lbw_node_worker_as_reported_over_bare": r_lbw_asrep,
        "total_node_worker_over_bare": r_total_w,
        "job_phases_over_bare": r_job_phases,
        "job_total_over_bare": r_job_total,
        "job_added_over_int16": mem_job,
        "worker_added_over_int16": mem_wrk,
        "bare_added_over_int16": mem_bare,
    }

    # Where the node's time goes.
    ok_w = [r for r in wrk if r.ok]
    if ok_w:

        def xs(key: str) -> list[float]:
            return [r.extra["extra"][key] for r in ok_w]

        parts = [
            ("read headers (load_series: dcmread stop_before_pixels, sort, checks)", xs("headers")),
            ("read pixels (series.voxels(): dcmread of every file again, decode, copy into the volume)", xs("pixels")),
            (
                "import the plugin module (threshold.py imports scipy.ndimage; not in any reported phase)",
                xs("plugin_import"),
            ),
            ("plugin proper (thresholds on stored values)", [r.plugin_px or 0.0 for r in ok_w]),
            ("build: masks checked/converted (seg._masks)", xs("masks_check")),
            (
                "build: highdicom Segmentation (+ descriptions, provenance)",
                [r.extra["extra"]["build_seg"] - r.extra["extra"]["masks_check"] for r in ok_w],
            ),
            ("write: save_as", vals(ok_w, "write")),
        ]
        accounted = [sum(p[1][i] for p in parts) for i in range(len(ok_w))]
        parts.append(
            (
                "other (dropping the voxels, provenance, bookkeeping)",
                [r.total - a for r, a in zip(ok_w, accounted, strict=True)],
            )
        )
        tot = median(vals(ok_w, "total"))
        prow = [
            [name, cell(v, "{:.3f}"), f"{100 * (median(v) or 0.0) / tot:.0f} %" if tot else "n/a"] for name, v in parts
        ]
        out.append("")
        out.append("Where the node's time goes (in-process worker):")
        out.append("")
        out.append(table(prow, ["step", "s, median (min-max)", "of run"], markdown))
        summary["node_time"] = {name: spread(v) for name, v in parts}
    ok_j = [r for r in job if r.ok]
    if ok_j:
        out.append("")
        gap = [(r.job_to_finished or 0.0) - r.lpbw for r in ok_j]
        to_seg = [r.total - r.lpbw for r in ok_j]
        out.append(
            f"node job: outside the four reported phases (process start from the fork server, plugin import, "
            f"result through the pipe, store + index, ±0.2 s rounding): {cell(to_seg)} s to the SEG's index "
            f"record, {cell(gap)} s to job finished"
        )
    # Peak by phase.
    prow = []
    for name, rs, keys in (
        ("node in-process worker", ok_w, ["headers", "pixels", "plugin", "build"]),
        ("bare highdicom", [r for r in bare if r.ok], ["load", "mask", "build"]),
    ):
        if not rs:
            continue
        cells = []
        for k in keys:
            v = [r.extra["phase_peaks_mib"].get(k, float("nan")) - r.extra["start_mib"] for r in rs]
            cells.append(f"{k} {cell(v, '{:.0f}', spread=False)}")
        cells.append(f"write {cell(vals(rs, 'added_mib'), '{:.0f}', spread=False)}")
        prow.append([name, ", ".join(cells)])
    if prow:
        out.append("")
        out.append("Peak RSS above the start, MiB (median), after each phase:")
        out.append("")
        out.append(table(prow, ["process", "after phase"], markdown))
    # Every run.
    erows = []
    for name, rs, attrs in (
        ("node job", job, ["load", "plugin", "build", "write", "total", "added_mib"]),
        ("node worker", wrk, ["load_px", "plugin_px", "build", "write", "total", "added_mib"]),
        ("bare", bare, ["load", "plugin", "build", "write", "total", "added_mib"]),
    ):
        for a in attrs:
            each = ", ".join(
                "FAILED" if not r.ok else (f"{getattr(r, a):.0f}" if a == "added_mib" else f"{getattr(r, a):.2f}")
                for r in rs
            )
            label = {
                "load_px": "load (with pixels)",
                "plugin_px": "plugin (without pixels)",
                "added_mib": "peak added MiB",
            }.get(a, a)
            erows.append([f"{name}: {label}", each])
    out.append("")
    out.append("Every run (in repetition order):")
    out.append("")
    out.append(table(erows, ["measure", "runs"], markdown))
    summary["medians"] = {
        f"{r}.{a}": spread(vals([x for x in runs if x.way == r], a))
        for r in ("node-job", "node-worker", "bare")
        for a in (
            "load",
            "plugin",
            "build",
            "write",
            "lbw",
            "lbw_px",
            "total",
            "job_to_finished",
            "peak_mib",
            "added_mib",
        )
    }
    return "\n".join(out), summary


def what_if_report(runs: list[Run], voxel_mib: float, markdown: bool) -> str:
    rows = []
    for variant, label in WHAT_IF:
        way = "node-worker" + "".join(f"+{v}" for v in variant)
        rs = [r for r in runs if r.way == way and r.ok]
        if not rs:
            rows.append([label, "FAILED", "", "", "", "", ""])
            continue
        added = vals(rs, "added_mib")
        rows.append(
            [
                label,
                cell(added, "{:.0f}"),
                cell([a / voxel_mib for a in added], spread=False),
                cell([r.extra["extra"]["plugin_import"] for r in rs]),
                cell(vals(rs, "build")),
                cell(vals(rs, "total")),
                cell(vals(rs, "lbw_px")),
            ]
        )
    header = [
        "in-process worker, what if",
        "peak added MiB",
        "/ int16 array",
        "plugin import s",
        "build s",
        "whole run s",
        "load+build+write s",
    ]
    return table(rows, header, markdown)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=5, help="repetitions (a new series each)")
    p.add_argument("--slices", type=int, default=200, help="instances in the series")
    p.add_argument("--size", type=int, default=512, help="image rows and columns")
    p.add_argument("--stable-after", type=float, default=1.0, help="the node's [tracker] stable_after, seconds")
    p.add_argument("--quick", action="store_true", help="smoke run: 2 repetitions of 40 slices")
    p.add_argument(
        "--profile",
        action="store_true",
        help="after the repetitions, one more in-process worker run under cProfile (printed, not counted)",
    )
    p.add_argument(
        "--what-if",
        action="store_true",
        help="after the repetitions, in-process worker runs with the causes of the node's peak memory "
        "removed one by one (outside node/, by patching in the child; not counted above)",
    )
    p.add_argument("--job-timeout", type=float, default=300.0, help="max seconds for the node's job to finish")
    p.add_argument("--child-timeout", type=float, default=300.0, help="max seconds for one in-process/bare run")
    p.add_argument("--send-timeout", type=float, default=300.0, help="max seconds for one storescu transfer")
    p.add_argument("--json", metavar="OUT", type=Path, help="write all results as JSON here")
    p.add_argument("--workdir", type=Path, help="where data, logs and storage go [a new temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway after a failure)")
    p.add_argument("--child", nargs=3, metavar=("KIND", "IN", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.slices = 2, 40
    if args.repeat < 1 or args.slices < 2 or args.size < 8 or args.stable_after <= 0:
        p.error("--repeat >= 1, --slices >= 2, --size >= 8, --stable-after > 0")
    return args


def series_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        return child_main(*args.child)
    install_sigterm_handler()
    if missing_binaries([STORESCU, ECHOSCU]):
        return 2
    workdir, own_workdir = make_workdir(args.workdir, "bench-derive-")
    machine = machine_info(workdir)
    versions = tool_versions()
    import highdicom

    versions["highdicom"] = highdicom.__version__
    runs: list[Run] = []
    what_if_runs: list[Run] = []
    failed = False
    described = ""
    profile_text = ""
    try:
        with ProcessGroup() as pg:
            node = DeriveNode(pg, args.stable_after)
            described = node.describe()
            try:
                node.start(workdir / "node")
            except ReceiverUnavailable as e:
                log(f"the node did not start: {e}")
                failed = True
                return 1
            # Untimed warm-up: starts the node's plugin fork server (imports numpy, highdicom).
            warm = generate_series(
                SeriesSpec("warm", "warm-up", args.size, args.size, 5),
                workdir / "data" / "warm",
                seed=7,
                patient_id="WARMUP01",
            )
            w = measure_job(node, -1, warm, series_uid_of(warm[0]), workdir / "send-warm", args)
            log(f"warm-up job: {'ok' if w.ok else 'FAILED: ' + w.error}")
            if not w.ok:
                failed = True
                return 1
            ways = ["node-job", "node-worker", "bare"]
            for rep in range(args.repeat):
                data = workdir / "data" / f"rep{rep}"
                files = generate_series(SeriesSpec("ct", "CT", args.size, args.size, args.slices), data, seed=rep)
                uid = series_uid_of(files[0])
                order = ways[rep % 3 :] + ways[: rep % 3]
                rep_runs: dict[str, Run] = {}
                for way in order:
                    os.sync()  # no write-back of the previous step during this one
                    time.sleep(0.5)
                    work = workdir / "runs" / f"rep{rep}" / way
                    if way == "node-job":
                        run = measure_job(node, rep, files, uid, work, args)
                        if not node.alive():
                            run.ok, run.error = False, (run.error + "; " if run.error else "") + "the node died"
                    elif way == "node-worker":
                        run = measure_worker(rep, files, uid, work, args.child_timeout)
                    else:
                        run = measure_bare(rep, files, work, args.child_timeout)
                    rep_runs[way] = run
                    runs.append(run)
                    log(
                        f"rep {rep + 1}/{args.repeat} {way}: "
                        + (
                            f"load {run.load:.2f} (with pixels {run.load_px:.2f}) "
                            if run.load_px is not None
                            else f"load {run.load:.2f} "
                        )
                        + f"plugin/mask {run.plugin:.2f} build {run.build:.2f} write {run.write:.2f} "
                        f"total {run.total:.2f} s; peak {run.peak_mib:.0f} MiB (+{run.added_mib:.0f}); "
                        f"{run.mask_voxels} voxels in {run.seg_frames} frames"
                        + ("" if run.ok else f" [FAILED: {run.error}]")
                    )
                # Same mask, same SEG pixel data, everywhere.
                good = [r for r in rep_runs.values() if r.ok]
                if len({(r.mask_voxels, r.seg_frames, r.seg_pixel_digest) for r in good}) > 1:
                    detail = "; ".join(
                        f"{r.way}: {r.mask_voxels} voxels, {r.seg_frames} frames, pixel data {r.seg_pixel_digest}"
                        for r in good
                    )
                    log(f"rep {rep + 1}: THE SEGS DIFFER: {detail}")
                    for r in good:
                        r.ok, r.error = False, "SEGs differ between the three ways"
                bare_run = rep_runs.get("bare")
                if (
                    bare_run is not None
                    and bare_run.ok
                    and bare_run.extra["mask_voxels_ge"] != bare_run.extra["mask_voxels"]
                ):
                    log(
                        f"rep {rep + 1}: note: {bare_run.extra['mask_voxels_ge'] - bare_run.mask_voxels} voxels are "
                        f"exactly {LOWER_HU} HU (> vs >=)"
                    )
                failed |= not all(r.ok for r in rep_runs.values())
                if not args.keep:
                    rmtree_quiet(data)
            if args.what_if:
                files = generate_series(
                    SeriesSpec("ct", "CT", args.size, args.size, args.slices), workdir / "data" / "what-if", seed=98
                )
                uid = series_uid_of(files[0])
                for rep in range(min(args.repeat, 3)):
                    for variant, _ in WHAT_IF:  # interleaved
                        os.sync()
                        time.sleep(0.5)
                        name = "+".join(variant) or "as-is"
                        run = measure_worker(
                            rep,
                            files,
                            uid,
                            workdir / "runs" / f"what-if-{rep}" / name,
                            args.child_timeout,
                            variant=variant,
                        )
                        what_if_runs.append(run)
                        log(
                            f"what-if {rep + 1} {name}: peak +{run.added_mib:.0f} MiB, total {run.total:.2f} s, "
                            f"{run.mask_voxels} voxels" + ("" if run.ok else f" [FAILED: {run.error}]")
                        )
                if len({(r.mask_voxels, r.seg_pixel_digest) for r in what_if_runs if r.ok}) > 1:
                    log("what-if: THE VARIANTS' SEGS DIFFER")
                    failed = True
            if args.profile:
                files = generate_series(
                    SeriesSpec("ct", "CT", args.size, args.size, args.slices), workdir / "data" / "profile", seed=99
                )
                prof = workdir / "profile.txt"
                run = measure_worker(
                    -1, files, series_uid_of(files[0]), workdir / "runs" / "profile", args.child_timeout, profile=prof
                )
                profile_text = prof.read_text() if prof.exists() else f"(profile run failed: {run.error})"
            if not node.alive():
                failed = True
                log(f"the node exited during the run; log: {node.log_path}")
    except KeyboardInterrupt:
        log("interrupted: all child processes stopped")
        return 130
    except Exception:
        failed = True  # keep the work dir (logs) for the traceback that follows
        raise
    finally:
        if own_workdir and not args.keep and not failed:
            rmtree_quiet(workdir)
        else:
            log(f"work dir kept: {workdir}")

    voxel_mib = args.slices * args.size * args.size * 2 / 2**20
    bare_ok = [r for r in runs if r.way == "bare" and r.ok]
    if bare_ok:
        voxel_mib = bare_ok[0].extra["voxel_bytes"] / 2**20
    mach = (
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, Linux {machine['kernel']}, "
        f"storage {machine['workdir_fs']}, load avg at start {machine['loadavg_1min_at_start']}"
    )
    vers = ", ".join(f"{k} {v}" for k, v in versions.items() if k != "orthanc")
    plain, summary = report(runs, voxel_mib, False)
    md, _ = report(runs, voxel_mib, True)
    masks = sorted({(r.mask_voxels, r.seg_frames) for r in runs if r.ok})
    print()
    print(f"Machine:  {mach}")
    print(f"Versions: {vers}")
    print(
        f"Series: {args.slices} x {args.size}x{args.size} 16-bit CT (voxel array {voxel_mib:.0f} MiB as stored, "
        f"{2 * voxel_mib:.0f} MiB as float32), {args.repeat} repetition(s), order rotating"
    )
    print(f"Node: {described}")
    print(
        f"Mask (set voxels, SEG frames) in every run: {masks} (same SEG Pixel Data in all three ways: "
        f"{'yes' if not failed else 'see the log'})"
    )
    print()
    print(plain)
    if what_if_runs:
        wi_plain, wi_md = what_if_report(what_if_runs, voxel_mib, False), what_if_report(what_if_runs, voxel_mib, True)
        print()
        print(
            f"What if (in-process worker, a new series, {min(args.repeat, 3)} run(s) each, interleaved; cumulative "
            "from top to bottom; the SEGs are identical):"
        )
        print()
        print(wi_plain)
        md += "\n\n" + wi_md
    if profile_text:
        print()
        print("cProfile of one in-process worker run (not counted above):")
        print(profile_text)
    print()
    print("Markdown (for docs/benchmarks.md):")
    print()
    print(md)
    if args.json:
        out = {
            "machine": machine,
            "versions": versions,
            "settings": {
                "slices": args.slices,
                "size": args.size,
                "repeat": args.repeat,
                "stable_after": args.stable_after,
            },
            "voxel_mib": voxel_mib,
            "summary": summary,
            "runs": [dict(asdict(r), lbw=r.lbw, lbw_px=r.lbw_px) for r in runs + what_if_runs],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    if failed:
        print("\n!!!!! SOME REPETITIONS FAILED: see the log lines above !!!!!")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
