"""Plugins in their own environments: per-job cost of a warm worker, a cold one and a bare script; volume transfer.

One run measures, on the same data:

1. **Per-job overhead.** The example model (``onnx-tissue``, examples/onnx-organs) on a real CT series
   (``ct-head-philips-5mm`` of the test data, 28 slices of 512x512) and on a 300-slice series made from it
   (its slices repeated with new positions and UIDs, written as DICOM files), three ways:

   - *bare*: the model environment's python runs a script that loads the series with pydicom and runs
     the model in-process; timed inside the script after its setup (imports, onnxruntime session,
     one slice decoded and classified untimed): load + run. The script process's whole wall time is
     also recorded;
   - *warm*: a worker of the node's pool (node.plugins.pool.WorkerPool), set up once, leased for each
     job; the job is the node's real job path, ``run_in_process`` with one ``kind="environment"``
     step: load the series, share the voxels, the round trip, build, validate and write the SEG.
     Reported: wall, its parts from ``WorkResult.timings`` and ``overhead = wall - load - plugin -
     build - write`` (fork, protocol, transfer of the volume and of the label map);
   - *cold*: a new worker for each job (lease = start the interpreter, import, ``setup``; the job;
     then the worker is discarded); wall from the lease to the job's end.

2. **Transfer.** A 300x512x512 int16 volume in the node's memory handed to a worker in another
   environment (numpy 1 there, numpy 2 here) whose plugin reads one element of every 4 KiB page and
   returns nothing: ``save_array`` into the job's folder + ``WorkerClient.run`` (*copy*); the same round trip
   when the voxels were decoded straight into the mapped file (*zero-copy*, what the node does when no
   earlier step read them); against the environment's python doing ``np.load`` of the same array from
   a ``.npy`` file whose pages are in the page cache, plus the same touch (*bare np.load*).

The ways are interleaved (order rotating each repetition); figures are medians of ``--repeat`` runs
with every run listed. Nothing here is a test threshold: the script prints and records.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

SCRIPTS = Path(__file__).resolve().parent
sys.path.insert(0, str(SCRIPTS))

from bench_common import REPO_ROOT, install_sigterm_handler, log, machine_info, make_workdir, rmtree_quiet  # noqa: E402
from report import cell, median, table  # noqa: E402

PLUGIN = "onnx-tissue"
TARGET = "dicom_node_example_onnx.plugin:TissuePlugin"
TOUCH = "bench-touch"
TOUCH_TARGET = "bench_plugins_touch:touch"
SOURCE = "series/ct-head-philips-5mm"
#: The node's default [plugins] memory_limit_mb: the job's process runs under it, the worker's RSS is watched.
MEMORY_LIMIT_MB = 8192
WAYS = ("bare", "warm", "cold", "empty")
TRANSFER_WAYS = ("np.load", "copy", "zero-copy", "copy-write")

#: Run by the model environment's python: setup (untimed), then load the series with pydicom and run the model.
BARE_SCRIPT = r"""
import json, sys, time
t_start = time.perf_counter()
import numpy as np, pydicom, onnxruntime
from dicom_node_example_onnx.make_model import ensure_model
files = json.load(open(sys.argv[1]))
batch_size = int(sys.argv[2])
session = onnxruntime.InferenceSession(str(ensure_model()), providers=["CPUExecutionProvider"])
# Setup, like a warm worker's first job: the pixel path's lazy imports, and one pass of the model over a
# volume of the series' shape (onnxruntime's first run of each batch shape grows its buffers: seconds).
warm = pydicom.dcmread(files[0]).pixel_array.astype(np.float32)
t_first = time.perf_counter()
for start in range(0, len(files), batch_size):
    session.run(["labels"], {"hu": np.repeat(warm[None], min(batch_size, len(files) - start), axis=0)})
t0 = time.perf_counter()
datasets = [pydicom.dcmread(f) for f in files]
iop = np.array([float(x) for x in datasets[0].ImageOrientationPatient])
normal = np.cross(iop[:3], iop[3:])
datasets.sort(key=lambda d: float(np.dot([float(x) for x in d.ImagePositionPatient], normal)))
voxels = np.stack([d.pixel_array for d in datasets])
slopes = np.array([float(d.get("RescaleSlope", 1)) for d in datasets], np.float32)
intercepts = np.array([float(d.get("RescaleIntercept", 0)) for d in datasets], np.float32)
t1 = time.perf_counter()
hu = voxels.astype(np.float32) * slopes[:, None, None] + intercepts[:, None, None]
labels = np.empty(hu.shape, np.uint8)
for start in range(0, len(hu), batch_size):
    batch = np.ascontiguousarray(hu[start:start + batch_size], dtype=np.float32)
    (labels[start:start + len(batch)],) = session.run(["labels"], {"hu": batch})
t2 = time.perf_counter()
counts = np.bincount(labels.reshape(-1), minlength=4).tolist()
print(json.dumps({"setup": t0 - t_start, "first_pass": t0 - t_first, "load": t1 - t0, "run": t2 - t1, "counts": counts,
                  "numpy": np.__version__, "pydicom": pydicom.__version__, "onnxruntime": onnxruntime.__version__}))
"""

#: Run by the model environment's python: np.load of a .npy file (page cache warm) + the touch of every page.
NPLOAD_SCRIPT = r"""
import json, sys, time
import numpy as np
sys.path.insert(0, sys.argv[2])
from bench_plugins_touch import touch_pages
t0 = time.perf_counter()
a = np.load(sys.argv[1])
t1 = time.perf_counter()
touch_pages(a)
t2 = time.perf_counter()
print(json.dumps({"load": t1 - t0, "touch": t2 - t1, "shape": list(a.shape), "dtype": str(a.dtype)}))
"""


# --------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------


def default_data() -> Path:
    here = REPO_ROOT.parent / "shared" / "data"
    return here if here.is_dir() else Path(os.environ.get("DICOM_NODE_SHARED_DATA", "/work/shared/data"))


def source_files(data: Path) -> list[Path]:
    folder = data / SOURCE
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.name != "DIRFILE")
    if not files:
        raise SystemExit(f"no DICOM files in {folder}: pass --data (the folder holding {SOURCE})")
    return files


def repeated_series(files: list[Path], slices: int, out: Path) -> list[Path]:
    """A ``slices``-slice series from ``files``' slices repeated in order, each with a new position and new UIDs."""
    from pydicom import dcmread
    from pydicom.uid import generate_uid

    src = [dcmread(f) for f in files]
    iop = np.array([float(x) for x in src[0].ImageOrientationPatient])
    normal = np.cross(iop[:3], iop[3:])
    src.sort(key=lambda d: float(np.dot([float(x) for x in d.ImagePositionPatient], normal)))
    first = np.array([float(x) for x in src[0].ImagePositionPatient])
    step = float(np.dot(np.array([float(x) for x in src[-1].ImagePositionPatient]) - first, normal)) / (len(src) - 1)
    series_uid = generate_uid()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(slices):
        ds = src[i % len(src)].copy()
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        pos = first + i * step * normal
        ds.ImagePositionPatient = [f"{v:.4f}" for v in pos]
        if "SliceLocation" in ds:
            ds.SliceLocation = f"{float(np.dot(pos, normal)):.4f}"
        ds.SeriesDescription = f"{ds.get('SeriesDescription', '')} x{slices} (benchmark)"[:64]
        path = out / f"{i + 1:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def series_uid_of(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


def seg_voxels(path: Path) -> int:
    """Set voxels of a BINARY SEG (every segment), from its packed Pixel Data."""
    from pydicom import dcmread

    ds = dcmread(path)
    return int(np.unpackbits(np.frombuffer(ds.PixelData, np.uint8)).sum())


# --------------------------------------------------------------------------
# Part 1: per-job overhead
# --------------------------------------------------------------------------


@dataclass
class JobRun:
    series: str
    way: str
    rep: int
    ok: bool = True
    error: str = ""
    wall: float = 0.0
    #: WorkResult.timings (warm, cold) or the script's own (bare: load, run).
    timings: dict[str, float] = field(default_factory=dict)
    #: cold: the lease (interpreter start, imports, setup); bare: the script's setup.
    start: float = 0.0
    #: bare: the script process's whole wall time (start to exit), measured here.
    process_wall: float = 0.0
    #: bare: its setup's untimed pass of the model (onnxruntime's first run of each batch shape).
    first_pass: float = 0.0
    worker_pid: int = 0
    #: Voxels labelled fat, soft tissue or bone (bare: from the label map; warm/cold: set bits of the SEG).
    labelled: int = 0

    @property
    def overhead(self) -> float:
        """wall - load - plugin - build - write (warm and cold: fork, protocol, transfer; cold also its start)."""
        t = self.timings
        return self.wall - t.get("load", 0.0) - t.get("plugin", 0.0) - t.get("build", 0.0) - t.get("write", 0.0)

    @property
    def work(self) -> float:
        """The part of the wall a bare script also does: all but building and writing the SEG."""
        if self.way == "bare":
            return self.wall
        return self.wall - self.timings.get("build", 0.0) - self.timings.get("write", 0.0)


def run_bare(
    python: str, files: list[Path], work: Path, name: str, rep: int, batch_size: int, timeout: float
) -> JobRun:
    run = JobRun(name, "bare", rep)
    work.mkdir(parents=True, exist_ok=True)
    listing = work / "files.json"
    listing.write_text(json.dumps([str(f) for f in files]))
    t = time.perf_counter()
    try:
        done = subprocess.run(
            [python, "-c", BARE_SCRIPT, str(listing), str(batch_size)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(Path(python).parent.parent),
            check=False,
        )
    except subprocess.TimeoutExpired:
        run.ok, run.error = False, f"the bare script took more than {timeout:g} s"
        return run
    run.process_wall = time.perf_counter() - t
    if done.returncode:
        run.ok, run.error = False, f"the bare script failed (rc {done.returncode}): {done.stderr[-1500:]}"
        return run
    out = json.loads(done.stdout.strip().splitlines()[-1])
    run.timings = {"load": out["load"], "plugin": out["run"]}
    run.wall = out["load"] + out["run"]
    run.start = out["setup"]
    run.first_pass = out["first_pass"]
    run.labelled = int(sum(out["counts"][1:]))
    return run


def _spec(
    files: list[Path],
    out_dir: Path,
    socket: str,
    plugin_info: dict[str, Any],
    job_key: tuple[str, int, str, int],
    environment: str,
) -> Any:
    from node.plugins.worker import StepSpec, WorkSpec

    step = StepSpec(
        PLUGIN, TARGET, {}, kind="environment", socket=socket, environment=environment, remote=dict(plugin_info)
    )
    return WorkSpec(
        files=[str(f) for f in files],
        steps=[step],
        out_dir=str(out_dir),
        job_key=job_key,
        memory_limit_mb=MEMORY_LIMIT_MB,
        series_description="benchmark",
    )


def _job(
    files: list[Path], work: Path, w: Any, job_key: tuple[str, int, str, int], timeout: float, run: JobRun, t0: float
) -> None:
    """The node's job path for one leased worker (as node.jobs.actions runs it, RSS watch included).

    ``run.wall`` is from ``t0`` to the job's end (the SEG is checked after that, untimed).
    """
    from node.plugins.runtime import PluginRunError, run_in_process

    out_dir = work / "out"
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = _spec(files, out_dir, w.socket, w.plugin, job_key, w.key.environment)

    def watch() -> str | None:
        rss = w.rss_mb()
        return f"worker RSS {rss:.0f} MB over {MEMORY_LIMIT_MB} MB" if rss > MEMORY_LIMIT_MB else None

    try:
        result = run_in_process(spec, timeout=timeout, workers=1, watch=watch)
        run.wall = time.perf_counter() - t0
    except PluginRunError as e:
        run.ok, run.error = False, str(e)
        return
    run.timings = dict(result.timings)
    run.worker_pid = w.pid
    if not result.ok or len(result.outputs) != 1 or result.outputs[0].kind != "SEG":
        run.ok, run.error = False, f"job failed or not one SEG: {result.error or result.outputs}"
        return
    run.labelled = seg_voxels(Path(result.outputs[0].file))


def run_warm(
    pool: Any, key: Any, wspec: Any, files: list[Path], work: Path, name: str, rep: int, uid: str, timeout: float
) -> JobRun:
    run = JobRun(name, "warm", rep)
    t = time.perf_counter()
    w = pool.lease(key, wspec)
    try:
        _job(files, work, w, (uid, rep + 1, "bench-warm", 0), timeout, run, t)
    finally:
        pool.release(w, healthy=run.ok and w.alive())
    return run


def run_cold(
    pool: Any, key: Any, wspec: Any, files: list[Path], work: Path, name: str, rep: int, uid: str, timeout: float
) -> JobRun:
    run = JobRun(name, "cold", rep)
    t = time.perf_counter()
    w = pool.lease(key, wspec)
    run.start = time.perf_counter() - t
    try:
        _job(files, work, w, (uid, rep + 1, "bench-cold", 0), timeout, run, t)
    finally:
        pool.discard(w, "the benchmark's cold worker serves one job")
    return run


def run_empty(files: list[Path], work: Path, name: str, rep: int, uid: str, timeout: float) -> JobRun:
    """A job with no step: the node's job process reads the headers and ends (its fork, start and exit)."""
    from node.plugins.runtime import PluginRunError, run_in_process
    from node.plugins.worker import WorkSpec

    run = JobRun(name, "empty", rep)
    work.mkdir(parents=True, exist_ok=True)
    spec = WorkSpec(
        files=[str(f) for f in files],
        steps=[],
        out_dir=str(work),
        job_key=(uid, rep + 1, "bench-empty", 0),
        memory_limit_mb=MEMORY_LIMIT_MB,
    )
    t = time.perf_counter()
    try:
        result = run_in_process(spec, timeout=timeout, workers=1)
    except PluginRunError as e:
        run.ok, run.error = False, str(e)
        return run
    run.wall = time.perf_counter() - t
    run.timings = dict(result.timings)
    if not result.ok or result.outputs:
        run.ok, run.error = False, f"an empty job failed or made something: {result.error or result.outputs}"
    return run


# --------------------------------------------------------------------------
# Part 2: transfer
# --------------------------------------------------------------------------


@dataclass
class TransferRun:
    way: str
    rep: int
    ok: bool = True
    error: str = ""
    #: The whole: np.load + touch (bare), save_array + round trip (copy), round trip (zero-copy).
    total: float = 0.0
    #: np.load (bare) or save_array (copy).
    write_or_load: float = 0.0
    #: The round trip (copy, zero-copy) or the touch (bare).
    call: float = 0.0
    #: The worker's own time in the plugin (decode_series, map the file, touch).
    plugin: float = 0.0


def _series_message(voxels: Path) -> dict[str, Any]:
    """A SERIES message with voxels only: the touch plugin never reads a header."""
    return {
        "files": [],
        "frames": None,
        "positions": None,
        "orientation": None,
        "pixel_spacing": None,
        "voxels": {"path": str(voxels)},
    }


def transfer_copy(array: np.ndarray, socket: str, shm: Path, rep: int, way: str) -> TransferRun:
    """One hand-over: ``copy`` (save_array), ``copy-write`` (the .npy written with write(), not through a map)
    or ``zero-copy`` (the file already holds the voxels, as when the node decodes them straight into it)."""
    from dicom_node_sdk.protocol import WorkerClient, save_array

    run = TransferRun(way, rep)
    zero_copy = way == "zero-copy"
    folder = Path(tempfile.mkdtemp(prefix="bench-plugins-", dir=shm))
    out_dir = folder / "results"
    out_dir.mkdir()
    path = folder / "voxels.npy"
    try:
        if zero_copy:  # as the node does: the voxels decoded straight into the mapped file (not timed)
            from node.plugins.worker import _huge_pages

            mapped = np.lib.format.open_memmap(path, mode="w+", dtype=array.dtype, shape=array.shape)
            _huge_pages(mapped)  # as share_voxels does
            mapped[...] = array
            del mapped
        with WorkerClient(socket) as client:
            client.hello()  # connect before timing: the job process connects once, as here
            t0 = time.perf_counter()
            if way == "copy":
                save_array(array, path)
            elif way == "copy-write":
                with open(path, "wb") as f:
                    np.lib.format.write_array(f, array, allow_pickle=False)
            t1 = time.perf_counter()
            reply = client.run(_series_message(path), {}, out_dir=out_dir)
            t2 = time.perf_counter()
        run.write_or_load, run.call, run.total, run.plugin = t1 - t0, t2 - t1, t2 - t0, reply.seconds
        if reply.results:
            run.ok, run.error = False, f"the touch plugin returned {len(reply.results)} result(s)"
    except Exception as e:  # noqa: BLE001 (reported; the run goes on)
        run.ok, run.error = False, f"{type(e).__name__}: {e}"
    finally:
        rmtree_quiet(folder)
    return run


def transfer_npload(python: str, npy: Path, rep: int, timeout: float) -> TransferRun:
    run = TransferRun("np.load", rep)
    try:
        done = subprocess.run(
            [python, "-c", NPLOAD_SCRIPT, str(npy), str(SCRIPTS)],
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(Path(python).parent.parent),
            check=False,
        )
    except subprocess.TimeoutExpired:
        run.ok, run.error = False, f"np.load took more than {timeout:g} s"
        return run
    if done.returncode:
        run.ok, run.error = False, f"np.load script failed: {done.stderr[-1500:]}"
        return run
    out = json.loads(done.stdout.strip().splitlines()[-1])
    run.write_or_load, run.call, run.total = out["load"], out["touch"], out["load"] + out["touch"]
    return run


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def job_report(runs: list[JobRun], names: list[str], markdown: bool) -> tuple[str, list[str], dict[str, Any]]:
    """The table of part 1 (ms, median (min-max)), the ratio lines, and the summary for --json."""
    rows: list[list[str]] = []
    ratios: list[str] = []
    summary: dict[str, Any] = {}
    for name in names:
        by = {way: [r for r in runs if r.series == name and r.way == way and r.ok] for way in WAYS}

        def v(way: str, what: str, by: dict[str, list[JobRun]] = by) -> list[float]:
            rs = by[way]
            if what in ("wall", "start", "process_wall", "overhead", "work", "first_pass"):
                return [getattr(r, what) for r in rs]
            return [r.timings.get(what, 0.0) for r in rs]

        labels = {
            "bare": "bare script",
            "warm": "warm worker",
            "cold": "cold worker (new per job)",
            "empty": "job without a step",
        }
        for way in WAYS:
            if not by[way]:
                rows.append([f"{name}, {labels[way]}", *["FAILED"] * 9])
                continue
            node_side = way in ("warm", "cold")

            def c(what: str, show: bool = True) -> str:
                return cell(v(way, what), "{:.0f}", scale=1000) if show else ""  # noqa: B023

            start = {
                "bare": f"setup {c('start')} (its model pass {c('first_pass')}); process {c('process_wall')}",
                "cold": f"lease {c('start')}",
                "warm": "",
                "empty": "",
            }[way]
            rows.append(
                [
                    f"{name}, {labels[way]}",
                    c("wall"),
                    c("load"),
                    c("plugin", way != "empty"),
                    c("transfer", node_side),
                    c("call", node_side),
                    c("build", node_side),
                    c("write", node_side),
                    c("overhead", way != "bare"),
                    start,
                ]
            )
        warm, cold, bare = median(v("warm", "wall")), median(v("cold", "wall")), median(v("bare", "wall"))
        overhead, work = median(v("warm", "overhead")), median(v("warm", "work"))
        empty = median(v("empty", "overhead"))
        start = median(v("cold", "start"))
        s = {
            "warm_over_bare": warm / bare if warm and bare else None,
            "warm_without_seg_over_bare": work / bare if work and bare else None,
            "cold_over_warm": cold / warm if cold and warm else None,
            "warm_overhead_ms": overhead * 1000 if overhead is not None else None,
            "warm_extra_over_bare_ms": (work - bare) * 1000 if work and bare else None,
            "cold_start_ms": start * 1000 if start is not None else None,
            "empty_job_overhead_ms": empty * 1000 if empty is not None else None,
            "cold_minus_warm_ms": (cold - warm) * 1000 if cold and warm else None,
        }
        summary[name] = s

        def f(x: float | None, unit: str = "", digits: int = 2) -> str:
            return "n/a" if x is None else f"{x:.{digits}f}{unit}"

        met = "n/a" if overhead is None else ("met" if overhead * 1000 <= 50 else "MISSED")
        ratios += [
            f"ratio warm/bare ({name}): {f(s['warm_over_bare'])} (warm job wall incl. building and writing the SEG "
            f"/ bare load+run); without build+write: {f(s['warm_without_seg_over_bare'])}",
            f"ratio cold/warm ({name}): {f(s['cold_over_warm'])} (cold start {f(s['cold_start_ms'], ' ms', 0)}, "
            f"cold - warm {f(s['cold_minus_warm_ms'], ' ms', 0)})",
            f"warm overhead ({name}): {f(s['warm_overhead_ms'], ' ms', 1)} per job (wall - load - plugin - build - "
            f"write; target <= 50 ms: {met}); of it a job without a step: {f(s['empty_job_overhead_ms'], ' ms', 1)}; "
            f"warm wall - build - write - bare: {f(s['warm_extra_over_bare_ms'], ' ms', 0)}",
        ]
    header = [
        "ms, median (min-max)",
        "wall",
        "load",
        "plugin / run",
        "transfer",
        "call",
        "build",
        "write",
        "overhead",
        "start",
    ]
    return table(rows, header, markdown), ratios, summary


def transfer_report(
    runs: list[TransferRun], shape: tuple[int, ...], markdown: bool
) -> tuple[str, list[str], dict[str, Any]]:
    by = {way: [r for r in runs if r.way == way and r.ok] for way in TRANSFER_WAYS}
    rows = []
    labels = {
        "np.load": "bare np.load (env python, page cache warm) + touch",
        "copy": "save_array into the job folder + round trip (worker maps, touches)",
        "zero-copy": "round trip only (voxels already in the mapped file)",
        "copy-write": "the .npy written with one write() + round trip",
    }
    for way in TRANSFER_WAYS:
        rs = by[way]
        if not rs:
            rows.append([labels[way], "FAILED", "", "", ""])
            continue
        rows.append(
            [
                labels[way],
                cell([r.total for r in rs], "{:.0f}", scale=1000),
                cell([r.write_or_load for r in rs], "{:.0f}", scale=1000),
                cell([r.call for r in rs], "{:.0f}", scale=1000),
                "" if way == "np.load" else cell([r.plugin for r in rs], "{:.0f}", scale=1000),
            ]
        )
    base = median([r.total for r in by["np.load"]])
    copy, zero = median([r.total for r in by["copy"]]), median([r.total for r in by["zero-copy"]])
    write = median([r.total for r in by["copy-write"]])
    rc = copy / base if copy and base else None
    rz = zero / base if zero and base else None
    rw = write / base if write and base else None
    size = "x".join(map(str, shape))

    def verdict(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2f} (target <= 1.2: {'met' if x <= 1.2 else 'MISSED'})"

    ratios = [
        f"ratio copy/np.load ({size} int16): {verdict(rc)}",
        f"ratio zero-copy/np.load ({size} int16): {verdict(rz)}",
        f"ratio copy-write/np.load ({size} int16): {verdict(rw)} (write() instead of save_array's memory map)",
    ]
    header = ["ms, median (min-max)", "total", "np.load / save_array", "touch / round trip", "in the worker's plugin"]
    return (
        table(rows, header, markdown),
        ratios,
        {"copy_over_npload": rc, "zero_copy_over_npload": rz, "copy_write_over_npload": rw},
    )


def every_run(runs: list[JobRun], transfers: list[TransferRun], markdown: bool) -> str:
    rows = []
    for name in dict.fromkeys(r.series for r in runs):
        for way in WAYS:
            rs = [r for r in runs if r.series == name and r.way == way]
            rows.append(
                [f"{name}, {way}: wall", ", ".join("FAILED" if not r.ok else f"{r.wall * 1000:.0f}" for r in rs)]
            )
            if way != "bare":
                rows.append(
                    [
                        f"{name}, {way}: overhead",
                        ", ".join("FAILED" if not r.ok else f"{r.overhead * 1000:.0f}" for r in rs),
                    ]
                )
    for way in TRANSFER_WAYS:
        rs = [r for r in transfers if r.way == way]
        rows.append([f"transfer, {way}", ", ".join("FAILED" if not r.ok else f"{r.total * 1000:.0f}" for r in rs)])
    return table(rows, ["ms", "runs (in repetition order)"], markdown)


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--repeat", type=int, default=5, help="timed runs of each way (the median is reported)")
    p.add_argument(
        "--slices",
        type=int,
        default=300,
        help="slices of the series made from the real CT by repeating its slices (0: only the real one)",
    )
    p.add_argument("--transfer-slices", type=int, default=300, help="slices of the 512x512 int16 volume of part 2")
    p.add_argument("--batch-size", type=int, default=16, help="the model's batch_size (slices per onnxruntime call)")
    p.add_argument(
        "--python",
        help="the model environment's python (with dicom-node-sdk and examples/onnx-organs "
        "installed) [built with tests/helpers/envs.py, numpy<2 and pydicom<3]",
    )
    p.add_argument("--data", type=Path, default=None, help=f"the test data folder holding {SOURCE}")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 1 repetition, the real CT only, a 20-slice transfer volume"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="max seconds for one job, script or worker start")
    p.add_argument("--json", metavar="OUT", type=Path, help="write all results as JSON here")
    p.add_argument("--workdir", type=Path, help="where data, jobs and logs go [a new temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway after a failure)")
    args = p.parse_args(argv)
    if args.quick:
        args.repeat, args.slices, args.transfer_slices = 1, 0, 20
    if args.repeat < 1 or args.slices < 0 or args.transfer_slices < 1 or args.batch_size < 1:
        p.error("--repeat >= 1, --slices >= 0, --transfer-slices >= 1, --batch-size >= 1")
    return args


def env_python(arg: str | None) -> str:
    if arg:
        return arg
    sys.path.insert(0, str(REPO_ROOT))
    from tests.helpers.envs import OLD_STACK, make_env

    log("building (or reusing) the model environment: numpy<2, pydicom<3, onnxruntime, onnx, the SDK, the example")
    return str(
        make_env(
            [*OLD_STACK, "onnxruntime", "onnx"], [REPO_ROOT / "sdk", REPO_ROOT / "examples" / "onnx-organs"], tag="onnx"
        )
    )


def versions(python: str) -> dict[str, str]:
    import pydicom

    code = (
        "import json, sys, numpy, pydicom, onnxruntime; print(json.dumps({'python': sys.version.split()[0], "
        "'numpy': numpy.__version__, 'pydicom': pydicom.__version__, 'onnxruntime': onnxruntime.__version__}))"
    )
    env = json.loads(
        subprocess.run(
            [python, "-c", code],
            capture_output=True,
            text=True,
            check=True,
            timeout=120,
            cwd=str(Path(python).parent.parent),
        ).stdout
    )
    commit = (
        subprocess.run(
            ["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
        ).stdout.strip()
        or "no commit"
    )
    return {
        "commit": commit,
        "node python": sys.version.split()[0],
        "node numpy": np.__version__,
        "node pydicom": pydicom.__version__,
        **{f"env {k}": v for k, v in env.items()},
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    python = env_python(args.python)
    data = args.data or default_data()
    workdir, own = make_workdir(args.workdir, "bench-plugins-")
    machine = machine_info(workdir)
    vers = versions(python)
    shm = workdir  # where the node hands arrays over: the job's folder, in the data directory's page cache
    failed = False
    runs: list[JobRun] = []
    transfers: list[TransferRun] = []
    series: dict[str, list[Path]] = {}
    from node.config import WarmSettings
    from node.plugins.pool import WorkerKey, WorkerPool, WorkerSpec
    from node.plugins.runtime import start_fork_server

    warm_pool = WorkerPool(workdir / "logs" / "warm")
    cold_pool = WorkerPool(workdir / "logs" / "cold")
    settings = WarmSettings(setup_timeout=args.timeout)
    model_spec = WorkerSpec(python, {}, settings)
    try:
        real = source_files(data)
        series[f"CT {len(real)} slices"] = real
        if args.slices:
            log(f"writing a {args.slices}-slice series made from {SOURCE}")
            series[f"CT {args.slices} slices"] = repeated_series(
                real, args.slices, workdir / "data" / f"ct{args.slices}"
            )
        start_fork_server()
        warm_key = WorkerKey("onnx", PLUGIN, TARGET)
        cold_key = WorkerKey("onnx-cold", PLUGIN, TARGET)
        t = time.perf_counter()
        w = warm_pool.lease(warm_key, model_spec)
        warm_pid = w.pid
        log(f"warm worker pid {w.pid} ready in {time.perf_counter() - t:.2f} s (setup {w.setup_seconds:.2f} s)")
        warm_pool.release(w)
        # Untimed: the fork server's first job and the worker's first run (lazy imports on both sides).
        for name, files in series.items():
            r = run_warm(
                warm_pool,
                warm_key,
                model_spec,
                files,
                workdir / "jobs" / "warm-up",
                name,
                -1,
                series_uid_of(files[0]),
                args.timeout,
            )
            log(f"warm-up job ({name}): {'ok' if r.ok else 'FAILED: ' + r.error}")
            if not r.ok:
                failed = True
                return 1
        for name, files in series.items():
            uid = series_uid_of(files[0])
            for rep in range(args.repeat):
                order = WAYS[rep % 4 :] + WAYS[: rep % 4]
                found: dict[str, JobRun] = {}
                for way in order:
                    work = workdir / "jobs" / f"{name.replace(' ', '-')}-{rep}-{way}"
                    if way == "bare":
                        r = run_bare(python, files, work, name, rep, args.batch_size, args.timeout)
                    elif way == "warm":
                        r = run_warm(warm_pool, warm_key, model_spec, files, work, name, rep, uid, args.timeout)
                        if r.ok and r.worker_pid != warm_pid:
                            r.ok, r.error = False, f"the warm job ran in pid {r.worker_pid}, not {warm_pid}"
                    elif way == "empty":
                        r = run_empty(files, work, name, rep, uid, args.timeout)
                    else:
                        r = run_cold(cold_pool, cold_key, model_spec, files, work, name, rep, uid, args.timeout)
                    rmtree_quiet(work)
                    found[way] = r
                    runs.append(r)
                    log(
                        f"{name} rep {rep + 1}/{args.repeat} {way}: wall {r.wall * 1000:.0f} ms, "
                        + ", ".join(f"{k} {v * 1000:.0f}" for k, v in r.timings.items())
                        + (f", overhead {r.overhead * 1000:.0f} ms" if way != "bare" else "")
                        + (f", start {r.start * 1000:.0f} ms" if r.start else "")
                        + f"; {r.labelled} voxels labelled"
                        + ("" if r.ok else f" [FAILED: {r.error}]")
                    )
                good = [r for r in found.values() if r.ok and r.way != "empty"]
                if len({r.labelled for r in good}) > 1:
                    log(
                        f"{name} rep {rep + 1}: THE LABEL MAPS DIFFER: "
                        + ", ".join(f"{r.way} {r.labelled}" for r in good)
                    )
                    for r in good:
                        r.ok, r.error = False, "label maps differ between the ways"
                failed |= not all(r.ok for r in found.values())
        cold_pool.close()

        # Part 2: transfer.
        shape = (args.transfer_slices, 512, 512)
        base = np.stack([__import__("pydicom").dcmread(f).pixel_array for f in real]).astype(np.int16)
        array = np.ascontiguousarray(np.resize(base, shape))  # the real slices repeated
        npy = workdir / "data" / "volume.npy"
        npy.parent.mkdir(parents=True, exist_ok=True)
        np.save(npy, array)
        npy.read_bytes()  # its pages into the page cache
        touch_spec = WorkerSpec(python, {"PYTHONPATH": str(SCRIPTS)}, settings)
        touch_key = WorkerKey("onnx", TOUCH, TOUCH_TARGET)
        tw = warm_pool.lease(touch_key, touch_spec)
        try:
            for way in TRANSFER_WAYS[1:]:  # untimed first round: the worker's and this side's first calls
                transfer_copy(array, tw.socket, shm, -1, way)
            transfer_npload(python, npy, -1, args.timeout)
            for rep in range(args.repeat):
                order = TRANSFER_WAYS[rep % 4 :] + TRANSFER_WAYS[: rep % 4]
                for way in order:
                    if way == "np.load":
                        tr = transfer_npload(python, npy, rep, args.timeout)
                    else:
                        tr = transfer_copy(array, tw.socket, shm, rep, way)
                    transfers.append(tr)
                    failed |= not tr.ok
                    log(
                        f"transfer rep {rep + 1}/{args.repeat} {way}: {tr.total * 1000:.1f} ms "
                        f"({tr.write_or_load * 1000:.1f} + {tr.call * 1000:.1f}; plugin {tr.plugin * 1000:.1f})"
                        + ("" if tr.ok else f" [FAILED: {tr.error}]")
                    )
        finally:
            warm_pool.release(tw)
    except KeyboardInterrupt:
        log("interrupted: every worker stopped")
        return 130
    except Exception:
        failed = True
        raise
    finally:
        warm_pool.close()
        cold_pool.close()
        if own and not args.keep and not failed:
            rmtree_quiet(workdir)
        else:
            log(f"work dir kept: {workdir}")

    names = list(series)
    plain, ratios, summary = job_report(runs, names, False)
    md, _, _ = job_report(runs, names, True)
    t_plain, t_ratios, t_summary = transfer_report(transfers, shape, False)
    t_md, _, _ = transfer_report(transfers, shape, True)
    mach = (
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, Linux {machine['kernel']}, "
        f"work dir on {machine['workdir_fs']}, load avg at start {machine['loadavg_1min_at_start']}, "
        f"at end {os.getloadavg()[0]:.2f}"
    )
    print()
    print(f"Machine:  {mach}")
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print(
        f"Model: {PLUGIN} (batch_size {args.batch_size}), {args.repeat} run(s) of each way, order rotating; "
        f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE', '(unset)')}"
    )
    print()
    print(
        "Per job (ms): wall; its parts as WorkResult.timings has them; overhead = wall - load - plugin - build - "
        "write. Bare: load + run timed inside the script after its setup."
    )
    print()
    print(plain)
    print()
    print(
        f"Transfer of a {'x'.join(map(str, shape))} int16 volume ({array.nbytes / 2**20:.0f} MiB) to a worker "
        "in the model environment:"
    )
    print()
    print(t_plain)
    print()
    for line in ratios + t_ratios:
        print(line)
    print()
    print("Markdown (for docs/benchmarks.md):")
    print()
    print(md)
    print()
    print(t_md)
    print()
    print(every_run(runs, transfers, True))
    if args.json:
        out = {
            "machine": machine,
            "versions": vers,
            "loadavg_at_end": os.getloadavg()[0],
            "settings": {
                "repeat": args.repeat,
                "slices": args.slices,
                "transfer_shape": list(shape),
                "batch_size": args.batch_size,
            },
            "summary": {"jobs": summary, "transfer": t_summary},
            "jobs": [dict(asdict(r), overhead=r.overhead) for r in runs],
            "transfers": [asdict(r) for r in transfers],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")
    if failed:
        print("\n!!!!! SOME RUNS FAILED: see the log lines above !!!!!")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
