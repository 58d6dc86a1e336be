#!/usr/bin/env python3
"""Ingest (C-STORE) throughput: dicom-node versus well-known receivers.

Why this benchmark exists: ingest rate is the first number anyone asks of a
DICOM node, and an absolute number alone says little on a shared 2-core VM.
So every receiver gets exactly the same files from exactly the same sender
(DCMTK ``storescu``) on loopback, in one run, and the report gives ratios of
this node against DCMTK ``storescp`` (a C++ lower bound on overhead: it only
writes files), Orthanc (a C++ PACS with a database, the closest peer) and
pynetdicom's ``storescp`` (the pure-Python baseline the node builds on).

The node can be run in several variants side by side: ``--node-processes 1,2,4`` (``[node]
processes``: one node process and N-1 receiver processes sharing the DICOM port) and
``--node-databases sqlite,postgresql`` (PostgreSQL: one throwaway server on loopback for the whole
run, started as the tests start it, a new database per run, ``fsync`` on). Each variant is a
receiver of its own, named ``node`` (1 process, SQLite), ``node-x4``, ``node-pg``, ``node-pg-x2``...;
a variant with several processes counts as started once every receiver process listens.

Matrix: two data sets (512x512 16-bit CT, ~0.5 MB per instance; 128x128
16-bit, ~35 KB per instance) x stream counts (1 and 4 parallel storescu
associations).  For every cell and receiver: fresh storage directory and a
freshly started receiver, one untimed warm-up association, then the timed
transfer, then a check that the receiver really stored every instance.

Usage examples::

    python scripts/bench/bench_ingest.py --quick --receivers storescp,orthanc,pynetdicom
    python scripts/bench/bench_ingest.py --repeat 3 --json bench-ingest.json
    python scripts/bench/bench_ingest.py --receivers node,orthanc,storescp --storescp-fork \
        --node-processes 1,2,4 --node-databases sqlite,postgresql

Run from anywhere; the node is started with the repository root as cwd.
Progress goes to stderr, the results tables to stdout.  The exit status is
1 if any transfer failed or any receiver stored a different number of
instances than were sent, 0 otherwise (a receiver that cannot be started,
such as a node that does not exist yet, is skipped with a message).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The throwaway PostgreSQL server the tests use (tests/helpers/postgres.py): one way to start it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from bench_common import (  # noqa: E402
    ECHOSCU,
    ORTHANC,
    RECEIVER_NAMES,
    STORESCP,
    STORESCU,
    NodeReceiver,
    OrthancReceiver,
    ProcessGroup,
    PynetdicomReceiver,
    Receiver,
    ReceiverUnavailable,
    SeriesSpec,
    StorescpReceiver,
    free_port,
    generate_series,
    install_sigterm_handler,
    log,
    machine_info,
    make_workdir,
    missing_binaries,
    rmtree_quiet,
    send_with_storescu,
    tool_versions,
    wait_until,
)
from report import median, table  # noqa: E402

WARMUP_INSTANCES = 5


@dataclass
class RunResult:
    """One timed transfer to one receiver."""

    elapsed_s: float
    inst_per_s: float
    mb_per_s: float
    sent: int
    stored: int
    settle_s: float  # time after storescu exited until the count was reached
    ok: bool
    error: str = ""


@dataclass
class CellResult:
    """All runs of one (data set, streams) cell for one receiver."""

    runs: list[RunResult] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.runs) and all(r.ok for r in self.runs)

    def median(self, attr: str) -> float | None:
        return median([getattr(r, attr) for r in self.runs if r.ok])


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


class NodeVariant(NodeReceiver):
    """The node with ``processes`` processes on SQLite, or on PostgreSQL (``database`` makes a new database)."""

    def __init__(self, pg: ProcessGroup, processes: int, database: Callable[[], str] | None) -> None:
        super().__init__(pg)
        self.processes = processes
        self.database = database
        self.name = node_name(processes, database is not None)
        self.web_port = 0

    def extra_config(self) -> str:
        self.web_port = free_port()
        text = f"processes = {self.processes}\n\n[web]\nport = {self.web_port}\n"
        if self.database is not None:
            text += f'\n[database]\nurl = "{self.database()}"\n'
        return text

    def start(self, workdir: Path) -> None:
        """Started once the node answers C-ECHO and (several processes) /readyz says every receiver listens."""
        super().start(workdir)
        if self.processes > 1 and not wait_until(self._receivers_up, 90, interval=0.25):
            self.stop()
            raise ReceiverUnavailable(f"{self.name}: the receiver processes did not all listen within 90 s")

    def _receivers_up(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.web_port}/readyz", timeout=5) as rsp:
                return bool(json.load(rsp)["checks"].get("receivers") == "ok")
        except (OSError, ValueError):  # 503 (not ready yet) is an HTTPError, an OSError
            return False

    def describe(self) -> str:
        db = "PostgreSQL on loopback (fsync on)" if self.database is not None else "SQLite in data_dir"
        return f"python -m node run, [node] processes = {self.processes}, {db}"


def node_name(processes: int, postgresql: bool) -> str:
    return "node" + ("-pg" if postgresql else "") + (f"-x{processes}" if processes > 1 else "")


def make_receiver(name: str, pg: ProcessGroup, args: argparse.Namespace) -> Receiver:
    if name.startswith("node"):
        processes, postgresql = args.node_variants[name]
        return NodeVariant(pg, processes, args.new_database if postgresql else None)
    if name == "storescp":
        return StorescpReceiver(pg, fork=args.storescp_fork)
    if name == "orthanc":
        return OrthancReceiver(pg, extra=args.orthanc_set)
    if name == "pynetdicom":
        return PynetdicomReceiver(pg)
    raise ValueError(name)


def wait_for_count(recv: Receiver, expected: int, settle: float) -> tuple[int, float]:
    """Wait (bounded) until ``recv`` reports ``expected`` stored instances.

    A receiver that acknowledges C-STORE before the file is on disk would
    show up here as a non-zero settle time, which the report prints: such a
    receiver's rate would otherwise be flattering.
    """
    t0 = time.perf_counter()
    seen = [-1]
    probe_started = [t0]

    def done() -> bool:
        # Settle time is measured to the *start* of the successful probe, so
        # the cost of counting (a directory walk, a REST call) is not in it.
        probe_started[0] = time.perf_counter()
        try:
            seen[0] = recv.stored_count()
        except Exception:  # noqa: BLE001 - REST hiccup: try again until timeout
            return False
        return seen[0] >= expected

    wait_until(done, settle, interval=0.1)
    return seen[0], probe_started[0] - t0


def run_one(
    recv: Receiver,
    cell_dir: Path,
    warmup: list[Path],
    files: list[Path],
    bytes_total: int,
    streams: int,
    args: argparse.Namespace,
) -> RunResult:
    """Fresh start, warm-up, timed send, verification, stop."""
    recv.start(cell_dir)
    try:
        w = send_with_storescu(
            recv.pg, warmup, recv.port, recv.ae_title, 1, cell_dir / "send-warmup", timeout=args.send_timeout
        )
        if not w.ok:
            return RunResult(0, 0, 0, len(files), 0, 0, False, "warm-up failed: " + "; ".join(w.errors))
        got, _ = wait_for_count(recv, len(warmup), args.settle)
        if got != len(warmup):
            return RunResult(0, 0, 0, len(files), 0, 0, False, f"warm-up: stored {got} of {len(warmup)}")
        # Start every timed send with no dirty pages left by the previous
        # receiver: otherwise receivers that fsync (this node, Orthanc) wait
        # behind the write-back of receivers that do not.
        os.sync()

        res = send_with_storescu(
            recv.pg, files, recv.port, recv.ae_title, streams, cell_dir / "send", timeout=args.send_timeout
        )
        expected = len(warmup) + len(files)
        total, settle_s = wait_for_count(recv, expected, args.settle)
        stored = total - len(warmup)
        errors = list(res.errors)
        if total != expected:
            errors.append(f"COUNT MISMATCH: sent {len(files)}, stored {stored}")
        if not recv.alive():
            errors.append("receiver died during the run")
        return RunResult(
            elapsed_s=res.elapsed_s,
            inst_per_s=len(files) / res.elapsed_s,
            mb_per_s=bytes_total / res.elapsed_s / 1e6,
            sent=len(files),
            stored=stored,
            settle_s=round(settle_s, 3),
            ok=not errors,
            error="; ".join(errors),
        )
    finally:
        recv.stop()


# --------------------------------------------------------------------------
# Reporting
# --------------------------------------------------------------------------


def fmt_rate(cell: CellResult | None) -> str:
    if cell is None:
        return "n/a"
    med = cell.median("inst_per_s")
    if med is None:
        return "FAILED"
    return f"{med:.1f}" + ("" if cell.ok else "!")


def fmt_ratio(node: CellResult | None, other: CellResult | None) -> str:
    if node is None or other is None:
        return "n/a"
    a, b = node.median("inst_per_s"), other.median("inst_per_s")
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}"


def build_rows(
    cells: list[tuple[SeriesSpec, int, int]],
    results: dict[tuple[str, int], dict[str, CellResult]],
    receivers: list[str],
) -> tuple[list[str], list[list[str]]]:
    """The rates table: one row per cell, one column per receiver (plain text and Markdown)."""
    header = ["data", "streams", *[f"{r} inst/s" for r in receivers]]
    rows: list[list[str]] = []
    for spec, streams, inst_bytes in cells:
        res = results.get((spec.key, streams), {})
        row = [f"{spec.label} x{spec.count} (~{inst_bytes / 1024:.0f} KiB)", str(streams)]
        rows.append(row + [fmt_rate(res.get(r)) for r in receivers])
    return header, rows


def build_ratio_rows(
    cells: list[tuple[SeriesSpec, int, int]],
    results: dict[tuple[str, int], dict[str, CellResult]],
    receivers: list[str],
) -> tuple[list[str], list[list[str]]]:
    """The ratios table: one row per cell and node variant, its rate over each other receiver's."""
    nodes = [r for r in receivers if r.startswith("node")]
    others = [r for r in ("orthanc", "storescp", "pynetdicom") if r in receivers]
    header = ["data", "streams", "node", "inst/s", *[f"/{r}" for r in others]]
    rows: list[list[str]] = []
    for spec, streams, _ in cells:
        res = results.get((spec.key, streams), {})
        for n in nodes:
            row = [spec.key, str(streams), n, fmt_rate(res.get(n))]
            rows.append(row + [fmt_ratio(res.get(n), res.get(r)) for r in others])
    return header, rows


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="C-STORE ingest throughput of dicom-node vs storescp, Orthanc and pynetdicom.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "--receivers", default=",".join(RECEIVER_NAMES), help="comma-separated subset of: " + ",".join(RECEIVER_NAMES)
    )
    p.add_argument("--count-ct", type=int, default=200, help="instances of 512x512 CT")
    p.add_argument("--count-small", type=int, default=1000, help="instances of 128x128")
    p.add_argument(
        "--quick", action="store_true", help="smoke run: 20 CT and 50 small instances (overrides the counts)"
    )
    p.add_argument("--streams", default="1,4", help="comma-separated parallel storescu counts")
    p.add_argument(
        "--repeat", type=int, default=1, help="repetitions per cell (fresh receiver each); the median is reported"
    )
    p.add_argument("--json", metavar="OUT", type=Path, help="write all results as JSON here")
    p.add_argument("--workdir", type=Path, help="where data and receiver storage go [a new temp dir]")
    p.add_argument(
        "--keep", action="store_true", help="keep the work dir (logs, stored files); it is kept anyway after a failure"
    )
    p.add_argument(
        "--node-processes", default="1", help="comma-separated [node] processes values, one node variant each"
    )
    p.add_argument(
        "--node-databases", default="sqlite", help="comma-separated index databases of the node: sqlite, postgresql"
    )
    p.add_argument(
        "--storescp-fork", action="store_true", help="run DCMTK storescp with --fork (one process per association)"
    )
    p.add_argument(
        "--orthanc-set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override an Orthanc option, e.g. SyncStorageArea=false (repeatable)",
    )
    p.add_argument(
        "--settle", type=float, default=30.0, help="max seconds to wait for the stored count after a transfer"
    )
    p.add_argument("--send-timeout", type=float, default=900.0, help="max seconds for one transfer before it is killed")
    args = p.parse_args(argv)

    args.receiver_list = [r.strip() for r in args.receivers.split(",") if r.strip()]
    bad = [r for r in args.receiver_list if r not in RECEIVER_NAMES]
    if bad or not args.receiver_list:
        p.error(f"unknown receivers {bad}; choose from {','.join(RECEIVER_NAMES)}")
    try:
        processes = [int(n) for n in args.node_processes.split(",") if n.strip()]
    except ValueError:
        p.error(f"--node-processes wants integers, got {args.node_processes!r}")
    databases = [d.strip() for d in args.node_databases.split(",") if d.strip()]
    if not processes or min(processes) < 1 or not databases or set(databases) - {"sqlite", "postgresql"}:
        p.error("--node-processes needs positive integers, --node-databases sqlite and/or postgresql")
    # "node" stands for every variant, in its place in the receiver order.
    args.node_variants = {node_name(n, d == "postgresql"): (n, d == "postgresql") for d in databases for n in processes}
    if "node" in args.receiver_list:
        i = args.receiver_list.index("node")
        args.receiver_list[i : i + 1] = list(args.node_variants)
    args.new_database = None  # set in main() when a variant needs PostgreSQL
    args.stream_list = [int(s) for s in args.streams.split(",") if s.strip()]
    if not args.stream_list or min(args.stream_list) < 1:
        p.error("--streams needs positive integers")
    if args.quick:
        args.count_ct, args.count_small = 20, 50
    if args.count_ct < 0 or args.count_small < 0 or args.repeat < 1:
        p.error("counts must be >= 0 and --repeat >= 1")
    overrides: dict[str, object] = {}
    for item in args.orthanc_set:
        key, sep, val = item.partition("=")
        if not sep:
            p.error(f"--orthanc-set wants KEY=JSON, got {item!r}")
        try:
            overrides[key] = json.loads(val)
        except json.JSONDecodeError:
            overrides[key] = val
    args.orthanc_set = overrides
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    with contextlib.ExitStack() as stack:
        if any(pg for _, pg in args.node_variants.values() if pg) and any(
            r.startswith("node") for r in args.receiver_list
        ):
            from helpers.postgres import new_database, postgres_server

            server = stack.enter_context(postgres_server())
            args.new_database = lambda: new_database(server)
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:

    needed = [STORESCU, ECHOSCU]
    needed += [STORESCP] if "storescp" in args.receiver_list else []
    needed += [ORTHANC] if "orthanc" in args.receiver_list else []
    if missing_binaries(needed):
        return 2
    workdir, own_workdir = make_workdir(args.workdir, "bench-ingest-")

    machine = machine_info(workdir)
    versions = tool_versions()
    specs = [
        s
        for s in (
            SeriesSpec("ct512", "CT 512x512 16-bit", 512, 512, args.count_ct),
            SeriesSpec("small128", "128x128 16-bit", 128, 128, args.count_small),
        )
        if s.count > 0
    ]

    results: dict[tuple[str, int], dict[str, CellResult]] = {}
    unavailable: dict[str, str] = {}
    described: dict[str, str] = {}
    cells: list[tuple[SeriesSpec, int, int]] = []
    any_failure = False

    try:
        # --- data: generated once; every receiver gets the very same files.
        t0 = time.perf_counter()
        warmup = generate_series(
            SeriesSpec("warmup", "warm-up", 128, 128, WARMUP_INSTANCES),
            workdir / "data" / "warmup",
            seed=7,
            patient_id="WARMUP01",
        )
        data: dict[str, tuple[list[Path], int]] = {}
        for spec in specs:
            files = generate_series(spec, workdir / "data" / spec.key, seed=42)
            data[spec.key] = (files, sum(f.stat().st_size for f in files))
        log(
            f"generated data in {time.perf_counter() - t0:.1f}s: "
            + ", ".join(f"{k}: {len(f)} files, {b / 1e6:.1f} MB" for k, (f, b) in data.items())
        )
        cells = [(spec, st, data[spec.key][1] // max(1, spec.count)) for spec in specs for st in args.stream_list]

        with ProcessGroup() as pg:
            receivers = {name: make_receiver(name, pg, args) for name in args.receiver_list}
            described = {name: r.describe() for name, r in receivers.items()}
            for rep in range(args.repeat):
                for spec, streams, _ in cells:
                    files, nbytes = data[spec.key]
                    # Rotate the receiver order between repetitions so slow
                    # drifts on a shared machine do not always hit the same one.
                    order = (
                        args.receiver_list[rep % len(args.receiver_list) :]
                        + args.receiver_list[: rep % len(args.receiver_list)]
                    )
                    for name in order:
                        if name in unavailable:
                            continue
                        recv = receivers[name]
                        cell_dir = workdir / "runs" / f"r{rep}" / f"{spec.key}-{streams}s" / name
                        label = f"rep {rep + 1}/{args.repeat} {spec.key} x{spec.count} streams={streams} {name}"
                        try:
                            run = run_one(recv, cell_dir, warmup, files, nbytes, streams, args)
                        except ReceiverUnavailable as exc:
                            unavailable[name] = str(exc)
                            log(f"SKIPPING {name} for the rest of the run: {exc}")
                            continue
                        results.setdefault((spec.key, streams), {}).setdefault(name, CellResult()).runs.append(run)
                        if run.ok:
                            extra = f", settle {run.settle_s:.2f}s" if run.settle_s > 0.2 else ""
                            log(
                                f"{label}: {run.inst_per_s:8.1f} inst/s  {run.mb_per_s:7.1f} MB/s "
                                f"({run.elapsed_s:.2f}s{extra})"
                            )
                        else:
                            any_failure = True
                            rate = f" (measured {run.inst_per_s:.1f} inst/s)" if run.elapsed_s else ""
                            log(f"!!!!! {label}: FAILED{rate}: {run.error}")
                            log(f"!!!!! receiver log: {recv.log_path}")
                        if not args.keep and run.ok:
                            rmtree_quiet(cell_dir)
    except KeyboardInterrupt:
        log("interrupted: all child processes stopped")
        return 130
    finally:
        if own_workdir and not args.keep and not any_failure:
            rmtree_quiet(workdir)
        elif args.keep or any_failure:
            log(f"work dir kept: {workdir}")

    # --- report
    header, rows = build_rows(cells, results, args.receiver_list)
    mach_line = (
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, "
        f"Linux {machine['kernel']}, storage {machine['workdir_fs']}, "
        f"load avg at start {machine['loadavg_1min_at_start']}"
    )
    ver_line = ", ".join(f"{k} {v}" for k, v in versions.items())
    print()
    print(f"Machine:  {mach_line}")
    print(f"Versions: {ver_line}")
    print(
        f"Median of {args.repeat} run(s) per cell; instances/s, wall clock from first storescu "
        f"start to last storescu exit; '!' = some run failed verification."
    )
    for name in args.receiver_list:
        if name in unavailable:
            print(f"  {name:10s} SKIPPED: {unavailable[name].splitlines()[0]}")
        else:
            print(f"  {name:10s} {described.get(name, '')}")
    ratio_header, ratio_rows = build_ratio_rows(cells, results, args.receiver_list)
    print()
    print(table(rows, header))
    if ratio_rows:
        print()
        print(table(ratio_rows, ratio_header))
    print()
    print("Markdown (for docs/benchmarks.md):")
    print()
    print(
        f"Machine: {mach_line}. Versions: {ver_line}. "
        f"Sender: DCMTK storescu on loopback, TCP_NODELAY=1; median of {args.repeat} run(s)."
    )
    print()
    print(table(rows, header, markdown=True))
    if ratio_rows:
        print()
        print(table(ratio_rows, ratio_header, markdown=True))

    if args.json:
        out = {
            "machine": machine,
            "versions": versions,
            "settings": {
                "count_ct": args.count_ct,
                "count_small": args.count_small,
                "streams": args.stream_list,
                "repeat": args.repeat,
                "warmup_instances": WARMUP_INSTANCES,
                "storescp_fork": args.storescp_fork,
                "node_variants": {n: {"processes": k, "postgresql": pg} for n, (k, pg) in args.node_variants.items()},
                "orthanc_overrides": args.orthanc_set,
            },
            "receivers": {
                n: ({"skipped": unavailable[n]} if n in unavailable else {"command": described.get(n, "")})
                for n in args.receiver_list
            },
            "cells": [
                {
                    "data": spec.key,
                    "label": spec.label,
                    "instances": spec.count,
                    "bytes_per_instance": inst_bytes,
                    "streams": streams,
                    "results": {
                        name: {
                            "median_inst_per_s": cr.median("inst_per_s"),
                            "median_mb_per_s": cr.median("mb_per_s"),
                            "ok": cr.ok,
                            "runs": [asdict(r) for r in cr.runs],
                        }
                        for name, cr in results.get((spec.key, streams), {}).items()
                    },
                }
                for spec, streams, inst_bytes in cells
            ],
            "table": {"header": header, "rows": rows},
            "ratios": {"header": ratio_header, "rows": ratio_rows},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")

    if any_failure:
        print("\n!!!!! SOME TRANSFERS FAILED OR COUNTS MISMATCHED: see the log lines above !!!!!")
    return 1 if any_failure else 0


if __name__ == "__main__":
    sys.exit(main())
