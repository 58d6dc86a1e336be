#!/usr/bin/env python3
"""Soak test: hours-long behaviour in minutes -- parallel senders, the whole receive and forward path.

The node is started as a subprocess (``python -m node run --config CFG``) on free loopback
ports with SQLite in a temporary data directory and one rule that forwards every CT series
to a DCMTK ``storescp --fork`` destination. ``--senders`` threads then send synthetic CT
series (``--instances`` slices of ``--rows`` x ``--cols``, 16-bit, new Study/Series/SOP
Instance UIDs every round) to it until the time is up, one association per series.
Even-numbered senders use DCMTK ``storescu``, odd-numbered ones the node's own SCU
(``node.send.scu.send_files``), so both ends of the node's DICOM code are exercised.

What is checked (any failure makes the exit code 1):

* every association: storescu's exit code and error log lines, or the node SCU's summary;
* every SOP Instance UID sent is in the node's index, and arrived at storescp through the
  node's forward queue (waited for, bounded by ``--drain-timeout``); no delivery failed;
* the node is still running at the end and stops cleanly on SIGTERM.

What is measured and reported (a person judges; the machine is shared and noisy):

* the node's RSS (psutil, the main process and with its children) every ``--sample-interval``
  seconds: median of the first and last minute of load, and the least-squares slope after
  the first minute (MiB/min) -- a leak shows as a steady positive slope;
* instances/s received (all senders) and forwarded (from the node's delivery table);
* the forward backlog over time, and ``/healthz`` answers where the node serves them.

storescp's files are counted (SOP Instance UID from the file name) and deleted as the run
goes, so only the node's own storage grows (about 131 KB per 256x256 instance).

    python scripts/soak.py                       # 10 minutes, 8 senders
    python scripts/soak.py --minutes 1 --json /tmp/soak.json
    python scripts/soak.py --seconds 20 --senders 2

The result is printed and written as JSON (``--json``, default ``soak-result.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))

from bench_common import (  # noqa: E402 (scripts/bench is not a package)
    LOOPBACK,
    STORESCP,
    STORESCU,
    NodeReceiver,
    ProcessGroup,
    SeriesSpec,
    StorescpReceiver,
    dcmtk_env,
    free_port,
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

MIB = 1024 * 1024


# --------------------------------------------------------------------------
# The node and its destination
# --------------------------------------------------------------------------


class SoakNode(NodeReceiver):
    """The node with its web port on a free port and one rule forwarding every CT series to ``archive``."""

    start_timeout = 120.0  # start-up on a loaded 2-core machine

    def __init__(self, pg: ProcessGroup, archive_port: int, archive_ae: str) -> None:
        super().__init__(pg)
        self.archive_port = archive_port
        self.archive_ae = archive_ae
        self.web_port = free_port()  # never 8080: a soak must not collide with a node already running here

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        cmd, env, cwd = super()._command(workdir)
        # DICOM_NODE_* variables would override the soak's config (a test run sets DICOM_NODE_WEB__PORT=0).
        return cmd, {k: v for k, v in env.items() if not k.startswith("DICOM_NODE_")}, cwd

    def extra_config(self) -> str:
        # ImagesInAcquisition is set on every instance, so a series is complete when its last slice arrives;
        # stable_after is the fallback. Short retry delays: a transient hiccup must not outlast the drain.
        return f"""
[web]
host = "{LOOPBACK}"
port = {self.web_port}

[tracker]
stable_after = 5

[[destinations]]
name = "archive"
ae_title = "{self.archive_ae}"
host = "{LOOPBACK}"
port = {self.archive_port}
retry = {{ initial_delay = 1, max_delay = 10, multiplier = 2, jitter = 0.2 }}

[[rules]]
name = "soak-forward"
match = {{ Modality = "CT" }}
actions = [{{ type = "forward", to = ["archive"] }}]
"""


# --------------------------------------------------------------------------
# Synthetic series with new UIDs every round
# --------------------------------------------------------------------------


class SeriesFactory:
    """One sender's series: the template's slices written again with new UIDs each round."""

    def __init__(self, template: list[Path], out_dir: Path, sender: int) -> None:
        import pydicom

        self.datasets = [pydicom.dcmread(p) for p in template]
        self.out_dir = out_dir
        self.sender = sender
        out_dir.mkdir(parents=True, exist_ok=True)

    def next(self, round_no: int) -> tuple[str, list[str], list[Path]]:
        """(series UID, SOP Instance UIDs, files) of a new series."""
        from pydicom.uid import generate_uid

        study, series, frame = generate_uid(), generate_uid(), generate_uid()
        uids: list[str] = []
        paths: list[Path] = []
        for i, ds in enumerate(self.datasets):
            sop = generate_uid()
            ds.SOPInstanceUID = sop
            ds.file_meta.MediaStorageSOPInstanceUID = sop
            ds.StudyInstanceUID = study
            ds.SeriesInstanceUID = series
            ds.FrameOfReferenceUID = frame
            ds.ImagesInAcquisition = len(self.datasets)
            ds.PatientID = f"SOAK{self.sender:02d}"
            ds.AccessionNumber = f"S{self.sender:02d}R{round_no:06d}"
            path = self.out_dir / f"{i + 1:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            uids.append(sop)
            paths.append(path)
        return series, uids, paths


# --------------------------------------------------------------------------
# Senders
# --------------------------------------------------------------------------


@dataclass
class Association:
    """One series sent in one association."""

    sender: int
    tool: str
    round: int
    series_uid: str
    instances: int
    started: float  # seconds since the load phase began
    seconds: float
    ok: bool
    error: str = ""


@dataclass
class Sender:
    index: int
    tool: str  # "storescu" or "node-scu"
    sent_uids: list[str] = field(default_factory=list)
    associations: list[Association] = field(default_factory=list)
    crashed: str = ""


def send_storescu(
    pg: ProcessGroup, port: int, calling_ae: str, files: list[Path], log_path: Path, timeout: float
) -> str:
    """Send ``files`` in one storescu association; '' on success, else why not."""
    cmd = [
        STORESCU,
        "-ll",
        "warn",
        "-aet",
        calling_ae,
        "-aec",
        "DICOM_NODE",
        "-to",
        "30",
        "-ta",
        "60",
        "-td",
        "120",
        LOOPBACK,
        str(port),
        *map(str, files),
    ]
    with contextlib.suppress(FileNotFoundError):
        log_path.unlink()
    proc = pg.start(cmd, log_path=log_path, env=dcmtk_env())
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        rc = None
    finally:
        pg.stop(proc)
    errors = [line for line in _lines(log_path) if line.startswith(("E:", "F:"))]
    if rc is None:
        return f"storescu did not finish within {timeout:.0f} s"
    if rc != 0 or errors:
        return f"storescu rc={rc}: " + " | ".join(errors[:5] or [tail(log_path, 3)])
    return ""


def send_node_scu(port: int, calling_ae: str, files: list[Path], timeout: float) -> str:
    """Send ``files`` with the node's own SCU (one association for one series); '' on success."""
    from node.send.scu import Peer, send_files

    peer = Peer(LOOPBACK, port, called_ae="DICOM_NODE", calling_ae=calling_ae, timeout=timeout)
    summary = send_files(peer, files, attempts=1)
    if summary.ok and summary.sent == len(files):
        return ""
    why = [f"{Path(p).name}: {t}" for p, t in (summary.errors + summary.skipped)[:5]]
    return f"node SCU sent {summary.sent} of {len(files)}: " + " | ".join(why)


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()
    except OSError:
        return []


def run_sender(
    s: Sender,
    pg: ProcessGroup,
    template: list[Path],
    work: Path,
    port: int,
    t0: float,
    deadline: float,
    stop: threading.Event,
    timeout: float,
) -> None:
    """Send new series until the deadline; never starts a round after it (bounded by ``timeout`` per round)."""
    try:
        factory = SeriesFactory(template, work / f"sender-{s.index}", s.index)
        calling_ae = f"SOAK_{s.tool[:4].upper()}_{s.index}"
        round_no = 0
        while time.monotonic() < deadline and not stop.is_set():
            round_no += 1
            series, uids, files = factory.next(round_no)
            started = time.monotonic()
            try:
                if s.tool == "storescu":
                    error = send_storescu(pg, port, calling_ae, files, work / f"storescu-{s.index}.log", timeout)
                else:
                    error = send_node_scu(port, calling_ae, files, timeout)
            except Exception as e:  # noqa: BLE001 - an unexpected error is a failed association, not a crash
                error = f"{type(e).__name__}: {e}"
            a = Association(
                s.index,
                s.tool,
                round_no,
                series,
                len(uids),
                round(started - t0, 3),
                round(time.monotonic() - started, 3),
                not error,
                error,
            )
            s.associations.append(a)
            if error:
                log(f"sender {s.index} round {round_no}: FAILED: {error}")
                if s.tool == "storescu":
                    kept = work / f"storescu-{s.index}-round{round_no}-failed.log"
                    with contextlib.suppress(OSError):
                        (work / f"storescu-{s.index}.log").rename(kept)
            else:
                s.sent_uids.extend(uids)
    except Exception as e:  # noqa: BLE001 - reported as a failure of the run
        s.crashed = f"{type(e).__name__}: {e}"
        log(f"sender {s.index} crashed: {s.crashed}")


# --------------------------------------------------------------------------
# Observers: the node's memory and queue, storescp's folder
# --------------------------------------------------------------------------


@dataclass
class Sample:
    t: float  # seconds since the load phase began
    phase: str  # "load" or "drain"
    rss_mib: float
    rss_tree_mib: float
    children: int
    instances: int | None
    backlog: int | None  # deliveries queued or being sent
    delivered: int | None
    healthz: int | None  # HTTP status, None when nothing answered
    load1: float | None = None  # the machine's 1-minute load average (it is shared: rates depend on it)


def index_query(db: Path, sql: str) -> list[tuple]:
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        return con.execute(sql).fetchall()
    finally:
        con.close()


def delivery_states(db: Path) -> dict[str, int]:
    return dict(index_query(db, "select state, count(*) from delivery group by state"))


def healthz(port: int) -> int | None:
    try:
        with urllib.request.urlopen(f"http://{LOOPBACK}:{port}/healthz", timeout=5) as r:  # noqa: S310 (loopback)
            return int(r.status)
    except urllib.error.HTTPError as e:
        return int(e.code)
    except (urllib.error.URLError, OSError, ValueError):
        return None


class Sampler(threading.Thread):
    """Every ``interval`` s: the node's RSS (alone and with its children), index and queue counts, /healthz."""

    def __init__(self, node: SoakNode, t0: float, interval: float) -> None:
        super().__init__(daemon=True, name="sampler")
        import psutil

        self.proc = psutil.Process(node.proc.pid)  # type: ignore[union-attr]
        self.node = node
        self.t0 = t0
        self.interval = interval
        self.phase = "load"
        self.samples: list[Sample] = []
        self.halt = threading.Event()

    def sample(self) -> Sample | None:
        import psutil

        try:
            rss = self.proc.memory_info().rss
            kids = self.proc.children(recursive=True)
        except psutil.Error:
            return None
        tree = rss
        for k in kids:
            with contextlib.suppress(psutil.Error):
                tree += k.memory_info().rss
        instances = backlog = delivered = None
        with contextlib.suppress(sqlite3.Error):
            db = self.node.data_dir / "index.sqlite"
            instances = index_query(db, "select count(*) from instance")[0][0]
            states = delivery_states(db)
            backlog = states.get("queued", 0) + states.get("sending", 0)
            delivered = states.get("delivered", 0)
        s = Sample(
            round(time.monotonic() - self.t0, 2),
            self.phase,
            round(rss / MIB, 1),
            round(tree / MIB, 1),
            len(kids),
            instances,
            backlog,
            delivered,
            healthz(self.node.web_port),
            round(os.getloadavg()[0], 2),
        )
        self.samples.append(s)
        return s

    def run(self) -> None:
        while not self.halt.is_set():
            self.sample()
            self.halt.wait(self.interval)


class ArchiveScanner(threading.Thread):
    """Records the SOP Instance UIDs storescp wrote (``CT.<uid>``) and deletes the files, bounding disk use.

    Only files untouched for a few seconds are taken during the run (a forked storescp may still be
    writing a newer one); ``final()`` takes everything once storescp has stopped.
    """

    def __init__(self, folder: Path, interval: float = 10.0, settle: float = 5.0) -> None:
        super().__init__(daemon=True, name="archive-scanner")
        self.folder = folder
        self.interval = interval
        self.settle = settle
        self.received: dict[str, int] = {}  # SOP Instance UID -> files seen
        self.other: list[str] = []
        self.halt = threading.Event()

    def scan(self, settle: float) -> None:
        now = time.time()
        for entry in os.scandir(self.folder):
            try:
                if not entry.is_file() or now - entry.stat().st_mtime < settle:
                    continue
            except FileNotFoundError:
                continue
            name = entry.name
            prefix, _, uid = name.partition(".")
            if len(prefix) == 2 and uid:
                self.received[uid] = self.received.get(uid, 0) + 1
            else:
                self.other.append(name)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            with contextlib.suppress(OSError):
                self.scan(self.settle)

    def final(self) -> None:
        self.halt.set()
        self.join(timeout=60)
        self.scan(0.0)


# --------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------


def slope_per_minute(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) in MiB per minute."""
    if len(points) < 3:
        return None
    xs = [p[0] for p in points]
    ys = [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx * 60.0


def memory_figures(samples: list[Sample], load_seconds: float) -> dict[str, Any]:
    """First- vs last-minute medians (a third of the run when shorter than 3 minutes) and slopes."""
    load = [s for s in samples if s.phase == "load"]
    if not load:
        return {}
    window = min(60.0, load_seconds / 3)
    end = load[-1].t
    first = [s for s in load if s.t <= window] or load[:1]
    last = [s for s in load if s.t >= end - window] or load[-1:]
    # The first minute is warm-up (imports, caches, SQLite's page cache); the trend is taken after it.
    steady = [s for s in load if s.t > window]
    if len(steady) < 5:
        steady = load
    out: dict[str, Any] = {"window_s": round(window, 1), "samples": len(load)}
    for key in ("rss_mib", "rss_tree_mib"):
        f = statistics.median(getattr(s, key) for s in first)
        la = statistics.median(getattr(s, key) for s in last)
        sl = slope_per_minute([(s.t, getattr(s, key)) for s in steady])
        # Warm-up (caches filling) flattens out; a leak keeps its slope in the second half too.
        sl2 = slope_per_minute([(s.t, getattr(s, key)) for s in load if s.t >= end / 2])
        out[key] = {
            "first_window_median": round(f, 1),
            "last_window_median": round(la, 1),
            "growth": round(la - f, 1),
            "slope_after_first_window_mib_per_min": None if sl is None else round(sl, 3),
            "slope_second_half_mib_per_min": None if sl2 is None else round(sl2, 3),
            "min": round(min(getattr(s, key) for s in load), 1),
            "max": round(max(getattr(s, key) for s in load), 1),
        }
    return out


def rate_by_minute(samples: list[Sample]) -> list[float]:
    """Instances/s received in each whole minute of the load, from the index counts the samples saw."""
    load = [s for s in samples if s.phase == "load" and s.instances is not None]
    out: list[float] = []
    if not load:
        return out
    minute = 0
    while (minute + 1) * 60 <= load[-1].t + 1:
        a = min(load, key=lambda s: abs(s.t - minute * 60))
        b = min(load, key=lambda s: abs(s.t - (minute + 1) * 60))
        if b.t > a.t:
            out.append(round((b.instances - a.instances) / (b.t - a.t), 1))  # type: ignore[operator]
        minute += 1
    return out


def forward_rate(db: Path) -> dict[str, Any]:
    """Instances/s forwarded, by the node's own clock: first delivery queued to last delivered."""
    with contextlib.suppress(sqlite3.Error, ValueError, TypeError):
        first, last, n = index_query(
            db, "select min(created_at), max(delivered_at), count(delivered_at) from delivery"
        )[0]
        span = (dt.datetime.fromisoformat(last) - dt.datetime.fromisoformat(first)).total_seconds()
        return {"delivered": n, "span_s": round(span, 1), "instances_per_s": round(n / span, 1) if span > 0 else None}
    return {}


# --------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0, help="load duration in minutes (default 10)")
    ap.add_argument("--seconds", type=float, default=None, help="load duration in seconds (overrides --minutes)")
    ap.add_argument("--senders", type=int, default=8, help="parallel senders (default 8)")
    ap.add_argument(
        "--tools",
        choices=["mixed", "storescu", "node-scu"],
        default="mixed",
        help="mixed: even senders use storescu, odd ones the node's SCU (default)",
    )
    ap.add_argument("--instances", type=int, default=20, help="instances per series (default 20)")
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--sample-interval", type=float, default=3.0, help="seconds between RSS samples (default 3)")
    ap.add_argument(
        "--drain-timeout",
        type=float,
        default=600.0,
        help="seconds to wait after the load for the forward queue to empty (default 600)",
    )
    ap.add_argument(
        "--association-timeout",
        type=float,
        default=300.0,
        help="seconds one series' association may take before it counts as failed",
    )
    ap.add_argument("--json", type=Path, default=Path("soak-result.json"), help="result file")
    ap.add_argument("--workdir", type=Path, default=None, help="keep everything here (default: a temp dir, removed)")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.duration = args.seconds if args.seconds is not None else args.minutes * 60.0
    if args.duration <= 0 or args.senders < 1 or args.instances < 1:
        ap.error("--minutes/--seconds, --senders and --instances must be positive")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """The soak itself; returns the result (``result["ok"]`` says whether it passed)."""
    workdir, own = make_workdir(args.workdir, "soak-")
    result: dict[str, Any] = {
        "command": " ".join(["python scripts/soak.py", *args.argv]),
        "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(workdir),
        "versions": tool_versions(),
        "settings": {
            "duration_s": args.duration,
            "senders": args.senders,
            "tools": args.tools,
            "series": f"{args.instances} x CT {args.rows}x{args.cols} 16-bit, explicit VR LE",
            "forward": "one rule: every CT series -> storescp --fork (DCMTK)",
        },
    }
    problems: list[str] = []
    try:
        with ProcessGroup() as pg:
            template = generate_series(
                SeriesSpec("soak", "soak", args.rows, args.cols, args.instances),
                workdir / "template",
                patient_id="SOAK00",
            )
            result["settings"]["instance_bytes"] = template[0].stat().st_size
            archive = StorescpReceiver(pg, fork=True)
            archive.start(workdir / "archive")
            node = SoakNode(pg, archive.port, archive.ae_title)
            node.start(workdir / "node")
            db = node.data_dir / "index.sqlite"
            log(
                f"node on port {node.port} (web {node.web_port}), storescp on {archive.port}; "
                f"{args.senders} senders for {args.duration:.0f} s"
            )
            scanner = ArchiveScanner(archive.out_dir)
            scanner.start()

            tools = {"mixed": ["storescu", "node-scu"], "storescu": ["storescu"], "node-scu": ["node-scu"]}[args.tools]
            senders = [Sender(k, tools[k % len(tools)]) for k in range(args.senders)]
            stop = threading.Event()
            t0 = time.monotonic()
            deadline = t0 + args.duration
            sampler = Sampler(node, t0, args.sample_interval)
            sampler.start()
            threads = [
                threading.Thread(
                    target=run_sender,
                    name=f"sender-{s.index}",
                    daemon=True,
                    args=(s, pg, template, workdir / "send", node.port, t0, deadline, stop, args.association_timeout),
                )
                for s in senders
            ]
            for th in threads:
                th.start()
            next_report = t0 + 60
            try:
                while any(th.is_alive() for th in threads):
                    for th in threads:
                        th.join(timeout=1.0)
                    if time.monotonic() >= next_report:
                        next_report += 60
                        last = sampler.samples[-1] if sampler.samples else None
                        done = sum(len(s.sent_uids) for s in senders)
                        log(
                            f"{time.monotonic() - t0:.0f} s: {done} instances sent"
                            + (f", node RSS {last.rss_mib} MiB, backlog {last.backlog}" if last else "")
                        )
                    if not node.alive():
                        problems.append("the node exited during the load")
                        stop.set()
            except KeyboardInterrupt:
                stop.set()
                problems.append("interrupted")
                raise
            load_end = time.monotonic()
            load_seconds = load_end - t0
            sampler.sample()  # the last point of the load phase
            sampler.phase = "drain"

            sent = [u for s in senders for u in s.sent_uids]
            sent_set = set(sent)
            log(f"load done after {load_seconds:.0f} s: {len(sent)} instances; waiting for the forward queue")

            def drained() -> bool:
                try:
                    st = delivery_states(db)
                except sqlite3.Error:
                    return False
                return not st.get("queued") and not st.get("sending") and sum(st.values()) >= len(sent_set)

            drain_ok = node.alive() and wait_until(drained, args.drain_timeout, interval=1.0)
            drain_seconds = time.monotonic() - load_end
            sampler.halt.set()
            sampler.join(timeout=30)

            in_index = {u for (u,) in index_query(db, "select sop_instance_uid from instance")}
            states = delivery_states(db)
            failed_deliveries = index_query(
                db, "select sop_instance_uid, last_status, last_error from delivery where state = 'failed' limit 5"
            )
            forwarded = forward_rate(db)
            series_states = dict(index_query(db, "select state, count(*) from series group by state"))
            jobs = dict(index_query(db, "select state, count(*) from job group by state"))

            node_rc = None
            if node.proc is not None:
                pg.stop(node.proc, grace=60.0)
                node_rc = node.proc.returncode
                node.proc = None
            archive.stop()
            scanner.final()

            assocs = [a for s in senders for a in s.associations]
            failed = [a for a in assocs if not a.ok]
            lost = sorted(sent_set - in_index)
            not_forwarded = sorted(sent_set - set(scanner.received))
            duplicates = sum(1 for u in sent_set if scanner.received.get(u, 0) > 1)
            result["load"] = {
                "seconds": round(load_seconds, 1),
                "associations": len(assocs),
                "associations_by_tool": {t: sum(1 for a in assocs if a.tool == t) for t in tools},
                "failed_associations": len(failed),
                "failures": [asdict(a) for a in failed[:20]],
                "instances_sent": len(sent),
                "instances_per_s": round(len(sent) / load_seconds, 1) if load_seconds else None,
                "association_seconds_median": round(statistics.median(a.seconds for a in assocs), 3)
                if assocs
                else None,
                "association_seconds_max": max((a.seconds for a in assocs), default=None),
                "sender_crashes": [s.crashed for s in senders if s.crashed],
                "instances_per_s_by_minute": rate_by_minute(sampler.samples),
                "load_average_by_sample": [s.load1 for s in sampler.samples if s.phase == "load"],
            }
            result["index"] = {
                "instances": len(in_index),
                "lost": len(lost),
                "lost_examples": lost[:10],
                "series_states": series_states,
                "jobs": jobs,
            }
            result["forward"] = {
                "drained": drain_ok,
                "drain_seconds_after_load": round(drain_seconds, 1),
                "delivery_states": states,
                "failed_examples": [list(r) for r in failed_deliveries],
                "received_by_storescp": len(scanner.received),
                "not_received": len(not_forwarded),
                "not_received_examples": not_forwarded[:10],
                "received_more_than_once": duplicates,
                "unexpected_files": scanner.other[:10],
                **forwarded,
            }
            result["memory"] = memory_figures(sampler.samples, load_seconds)
            probes = [s.healthz for s in sampler.samples]
            result["healthz"] = {
                "probes": len(probes),
                "ok": sum(1 for h in probes if h == 200),
                "no_answer": sum(1 for h in probes if h is None),
                "other": sorted({h for h in probes if h not in (None, 200)}),
            }
            result["node_exit_code"] = node_rc
            result["samples"] = [asdict(s) for s in sampler.samples]

            if failed:
                problems.append(f"{len(failed)} association(s) failed")
            if any(s.crashed for s in senders):
                problems.append("a sender crashed")
            if not sent:
                problems.append("nothing was sent")
            if lost:
                problems.append(f"{len(lost)} instance(s) sent successfully are not in the node's index")
            if not drain_ok:
                problems.append(f"the forward queue did not empty within {args.drain_timeout:.0f} s: {states}")
            if states.get("failed"):
                problems.append(f"{states['failed']} deliveries failed")
            if not_forwarded:
                problems.append(f"{len(not_forwarded)} instance(s) never reached storescp")
            if node_rc not in (0, None):
                problems.append(f"the node exited with {node_rc} on SIGTERM (log: {tail(node.log_path, 5)})")
    except KeyboardInterrupt:
        problems.append("interrupted")
    except Exception as e:  # noqa: BLE001 - reported in the result, not a traceback mid-run
        problems.append(f"{type(e).__name__}: {e}")
        log(f"soak aborted: {type(e).__name__}: {e}")
    finally:
        if own and not problems:
            rmtree_quiet(workdir)
        elif problems:
            log(f"kept {workdir} for inspection")
    result["problems"] = problems
    result["ok"] = not problems
    result["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    return result


def summary(result: dict[str, Any]) -> str:
    """The result as a person reads it."""
    lines = [f"soak: {'PASS' if result['ok'] else 'FAIL'}  ({result['command']})"]
    ld, ix, fw, mem = (result.get(k, {}) for k in ("load", "index", "forward", "memory"))
    if ld:
        lines.append(
            f"  load: {ld['seconds']} s, {ld['associations']} associations "
            f"({', '.join(f'{k} {v}' for k, v in ld['associations_by_tool'].items())}), "
            f"{ld['failed_associations']} failed; {ld['instances_sent']} instances, "
            f"{ld['instances_per_s']} instances/s; association median {ld['association_seconds_median']} s, "
            f"max {ld['association_seconds_max']} s"
        )
        if ld.get("instances_per_s_by_minute"):
            lines.append(f"  instances/s by minute: {ld['instances_per_s_by_minute']}")
    if ix:
        lines.append(
            f"  index: {ix['instances']} instances, {ix['lost']} lost; series {ix['series_states']}; jobs {ix['jobs']}"
        )
    if fw:
        lines.append(
            f"  forward: {fw['delivery_states']}; storescp received {fw['received_by_storescp']}, "
            f"{fw['not_received']} missing, {fw['received_more_than_once']} twice; "
            f"{fw.get('instances_per_s')} instances/s over {fw.get('span_s')} s; queue empty "
            f"{fw['drain_seconds_after_load']} s after the load"
        )
    for key, label in (("rss_mib", "node RSS"), ("rss_tree_mib", "node + children RSS")):
        m = mem.get(key)
        if key == "rss_tree_mib" and m == mem.get("rss_mib"):
            continue  # no child processes (no plugin ran): the same figures
        if m:
            lines.append(
                f"  {label}: first {mem['window_s']:.0f} s median {m['first_window_median']} MiB, "
                f"last {mem['window_s']:.0f} s median {m['last_window_median']} MiB "
                f"(growth {m['growth']:+} MiB), slope after the first window "
                f"{m['slope_after_first_window_mib_per_min']} MiB/min (second half of the load "
                f"{m['slope_second_half_mib_per_min']}), range {m['min']}-{m['max']} MiB"
            )
    hz = result.get("healthz")
    if hz:
        lines.append(
            f"  /healthz: {hz['ok']} of {hz['probes']} probes answered 200, {hz['no_answer']} no answer"
            + (f", other statuses {hz['other']}" if hz["other"] else "")
        )
    if "node_exit_code" in result:
        lines.append(f"  node exit code on SIGTERM: {result['node_exit_code']}")
    for p in result["problems"]:
        lines.append(f"  PROBLEM: {p}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if missing_binaries([STORESCU, STORESCP]):
        return 2
    install_sigterm_handler()
    result = run(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(summary(result), flush=True)
    log(f"result written to {args.json}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
