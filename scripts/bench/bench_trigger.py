#!/usr/bin/env python3
"""Series completion latency: from a series' last instance to its job starting (issue 3).

Target: "from the last instance of a 200-instance series to its job starting is
stable_after plus under 100 ms of overhead".  This script measures that
overhead for the node and, in the same run on the same files, the equivalent
for Orthanc (its ``StableAge`` setting and the Lua ``OnStableSeries``
callback), and prints the ratio.

One repetition = a freshly generated synthetic CT series (new Study/Series/SOP
Instance UIDs, no ImagesInAcquisition, so only the quiet-period timer can
complete it), sent with DCMTK ``storescu`` in one association to each
receiver in turn (the order alternates between repetitions).  Both receivers
run for the whole benchmark, after an untimed warm-up series each.

The node runs with ``[tracker] stable_after = N``, ``use_expected_counts =
false`` and one rule forwarding CT series to a DCMTK ``storescp``.  Its times
come from its own index (all UTC, microseconds):

* ``series.last_received_at``: when the last instance was received (the
  reference the issue means),
* ``series_revision.stable_at``: when the conditional UPDATE made it stable,
* ``job.created_at`` / ``job.started_at``: job inserted / claimed by a worker.

Orthanc has no sub-second record of either moment (``/changes`` dates and
the ``LastUpdate`` metadata are whole seconds), so its stable event is
timestamped by the Lua callback itself: ``OnStableSeries`` runs
``os.execute("echo ID UID $(date +%s.%N) >> FILE")``, i.e. the wall clock
(nanosecond resolution) at the moment the callback runs, plus the cost of
spawning ``sh`` and ``date`` (calibrated and printed, ~1-3 ms).  The common
reference for both receivers is the wall clock just after ``storescu`` exits
(the last C-STORE answered and the association released: both receivers
commit the instance before answering), so the headline ratio compares like
with like; the node's own ``last_received_at`` reference is reported too.

All times are CLOCK_REALTIME of the same machine (Python ``time.time()``,
``datetime.now(UTC)`` in the node, ``date`` in Orthanc's Lua), so they are
directly comparable.

Usage::

    python scripts/bench/bench_trigger.py --repeat 10
    python scripts/bench/bench_trigger.py --quick          # 3 repetitions, 50 instances

Everything runs on loopback; every child process is stopped on exit, error
or Ctrl-C, and every wait is bounded.  Exit status 1 if a repetition failed.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import select
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    ECHOSCU,
    LOOPBACK,
    ORTHANC,
    STORESCP,
    STORESCU,
    NodeReceiver,
    OrthancReceiver,
    ProcessGroup,
    ReceiverUnavailable,
    SeriesSpec,
    dcmtk_env,
    echo_ok,
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
from report import median, spread, table  # noqa: E402

DEST_AE = "STORESCP"
WARMUP_INSTANCES = 5


# --------------------------------------------------------------------------
# Receivers set up for the trigger measurement
# --------------------------------------------------------------------------


class TriggerNode(NodeReceiver):
    """The node with a quiet-period tracker and one forwarding rule for CT."""

    def __init__(self, pg: ProcessGroup, stable_after: float, dest_port: int) -> None:
        super().__init__(pg)
        self.stable_after = stable_after
        self.dest_port = dest_port

    def extra_config(self) -> str:
        return (
            "min_free_mb = 0\n"  # still in [node]: the benchmark is not about free space
            "\n[tracker]\n"
            f"stable_after = {self.stable_after}\n"
            "use_expected_counts = false\n"
            "\n[[destinations]]\n"
            f'name = "scp"\nae_title = "{DEST_AE}"\nhost = "{LOOPBACK}"\nport = {self.dest_port}\n'
            "\n[[rules]]\n"
            'name = "ct"\n'
            'match = { Modality = "CT" }\n'
            'actions = [{ type = "forward", to = ["scp"] }]\n'
        )

    def describe(self) -> str:
        return (
            f"python -m node run (defaults; [tracker] stable_after = {self.stable_after:g}, "
            "use_expected_counts = false; rule ct: Modality = CT -> forward to a DCMTK storescp)"
        )

    # -- index look-ups (read only; the times are the node's own) ----------

    def series_times(self, series_uid: str) -> dict[str, object] | None:
        rows = self.query(
            "select s.last_received_at, s.instance_count, r.stable_at, r.triggered_at, "
            "j.created_at, j.started_at, j.finished_at, j.state, j.last_error "
            "from series s join series_revision r on r.series_fk = s.id "
            "join job j on j.series_fk = s.id and j.revision = r.revision "
            "where s.series_instance_uid = ? order by r.revision, j.id",
            series_uid,
        )
        if not rows:
            return None
        keys = (
            "last_received_at",
            "instance_count",
            "stable_at",
            "triggered_at",
            "created_at",
            "started_at",
            "finished_at",
            "state",
            "last_error",
        )
        out = dict(zip(keys, rows[0], strict=True))
        out["revisions_or_jobs"] = len(rows)
        return out


LUA = """\
-- Written by scripts/bench/bench_trigger.py: timestamp each stable series.
-- os.time() has 1 s resolution, so the shell's date(1) gives the time.
function OnStableSeries(seriesId, tags, metadata)
  os.execute("echo " .. seriesId .. " " .. tags["SeriesInstanceUID"] .. " $(date +%s.%N) >> '{out}'")
end
"""


class TriggerOrthanc(OrthancReceiver):
    """Orthanc with StableAge and a Lua OnStableSeries that appends a timestamp to a file."""

    def __init__(self, pg: ProcessGroup, stable_age: int, lua_dir: Path) -> None:
        self.events = lua_dir / "orthanc-stable.txt"
        self.lua = lua_dir / "stable.lua"
        lua_dir.mkdir(parents=True, exist_ok=True)
        self.lua.write_text(LUA.replace("{out}", str(self.events)))
        super().__init__(pg, extra={"StableAge": stable_age, "LuaScripts": [str(self.lua)]})

    def describe(self) -> str:
        return (
            f"Orthanc (defaults; StableAge = {self.extra['StableAge']}, Lua OnStableSeries -> "
            "os.execute('date +%s.%N'))"
        )

    def stable_event(self, series_uid: str) -> tuple[float, str] | None:
        """(wall-clock time, Orthanc series id) of the series' OnStableSeries call, if it happened."""
        try:
            lines = self.events.read_text().splitlines()
        except FileNotFoundError:
            return None
        for line in lines:
            parts = line.split()
            if len(parts) == 3 and parts[1] == series_uid:
                return float(parts[2]), parts[0]
        return None

    def series_instances(self, orthanc_id: str) -> int:
        info = self._get(f"/series/{orthanc_id}")
        assert isinstance(info, dict)
        return len(info.get("Instances", []))


def start_storescp(pg: ProcessGroup, out_dir: Path) -> int:
    """A DCMTK storescp as the node's forwarding destination; returns its port."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = out_dir.parent / "storescp.log"
    proc = pg.start(
        [STORESCP, "-aet", DEST_AE, "-dhl", "-od", str(out_dir), str(port)],
        log_path=log_path,
        env=dcmtk_env(),
        cwd=out_dir.parent,
    )
    if (
        not wait_until(lambda: proc.poll() is not None or echo_ok(port, DEST_AE), 20, interval=0.2)
        or proc.poll() is not None
    ):
        raise RuntimeError(f"storescp did not start: {tail(log_path)}")
    return port


# --------------------------------------------------------------------------
# One measurement
# --------------------------------------------------------------------------


@dataclass
class Run:
    receiver: str
    rep: int
    series_uid: str
    ok: bool = True
    error: str = ""
    send_s: float = 0.0
    #: All in seconds; "overhead" = the interval minus stable_after.
    job_overhead: float | None = None  # node: job.started_at - last_received_at - stable_after
    stable_overhead: float | None = None  # node: stable_at - last_received_at - stable_after
    stable_to_created: float | None = None  # node: job.created_at - stable_at
    created_to_started: float | None = None  # node: job.started_at - job.created_at
    exit_after_last: float | None = None  # node: storescu exit - last_received_at
    ext_overhead: float | None = None  # both: (job start | OnStableSeries) - storescu exit - stable_after
    job_note: str = ""  # node: the forward job did not succeed (does not invalidate the start time)
    extra: dict[str, object] = field(default_factory=dict)


def utc_ts(value: object) -> float:
    """The node's index time text ('YYYY-MM-DD HH:MM:SS.ffffff', UTC) as a POSIX timestamp."""
    parsed = dt.datetime.fromisoformat(str(value))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def send(
    pg: ProcessGroup, files: list[Path], port: int, ae: str, log_dir: Path, timeout: float
) -> tuple[float, float, str]:
    """One storescu association; returns (wall clock when it exited, duration, error).

    The exit is observed through a pidfd (``select`` returns the moment the
    process ends), not ``Popen.wait(timeout)``, which polls with sleeps of up
    to 50 ms and would blur the reference by as much.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / "storescu.log"
    cmd = [STORESCU, "-ll", "error", "-aec", ae, "-to", "30", "-ta", "60", LOOPBACK, str(port), *map(str, files)]
    t0 = time.time()
    proc = pg.start(cmd, log_path=log_path, env=dcmtk_env())
    pidfd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
        t_exit = time.time()
    finally:
        os.close(pidfd)
    if not ready:
        pg.stop(proc)
        return t_exit, t_exit - t0, f"storescu timed out after {timeout:.0f} s"
    rc = proc.wait(timeout=5)
    pg.stop(proc)  # exited: only forgets it
    return t_exit, t_exit - t0, "" if rc == 0 else f"storescu rc={rc}: {tail(log_path, 5)}"


def measure_node(
    node: TriggerNode, rep: int, files: list[Path], series_uid: str, log_dir: Path, args: argparse.Namespace
) -> Run:
    run = Run("node", rep, series_uid)
    t_exit, run.send_s, err = send(node.pg, files, node.port, node.ae_title, log_dir, args.send_timeout)
    if err:
        run.ok, run.error = False, err
        return run
    row: dict[str, object] = {}

    def started() -> bool:
        got = node.series_times(series_uid)
        if got is None or got["started_at"] is None:
            return False
        row.update(got)
        return True

    if not wait_until(started, args.stable_after + args.trigger_timeout, interval=0.1):
        run.ok, run.error = False, f"no job started within {args.stable_after + args.trigger_timeout:.0f} s"
        return run

    def finished() -> bool:
        got = node.series_times(series_uid)
        if got is None or got["state"] not in ("succeeded", "failed", "cancelled"):
            return False
        row.update(got)
        return True

    # Let the forward finish so it does not load the machine during the next measurement.
    if not wait_until(finished, args.job_timeout, interval=0.2):
        run.job_note = f"forward job still {row['state']} after {args.job_timeout:.0f} s"
    last = utc_ts(row["last_received_at"])
    stable, created, start = utc_ts(row["stable_at"]), utc_ts(row["created_at"]), utc_ts(row["started_at"])
    sa = args.stable_after
    run.job_overhead = start - last - sa
    run.stable_overhead = stable - last - sa
    run.stable_to_created = created - stable
    run.created_to_started = start - created
    run.exit_after_last = t_exit - last
    run.ext_overhead = start - t_exit - sa
    run.extra = {k: str(v) for k, v in row.items()}
    problems = []
    if row["instance_count"] != len(files):
        problems.append(f"node indexed {row['instance_count']} of {len(files)} instances")
    if row["revisions_or_jobs"] != 1:
        problems.append(f"{row['revisions_or_jobs']} revision/job rows instead of 1")
    if row["state"] in ("failed", "cancelled"):  # the forward's outcome; its start time is what is measured
        took = utc_ts(row["finished_at"]) - start
        run.job_note = f"forward job {row['state']} after {took:.1f} s: {row['last_error']}"
    if problems:
        run.ok, run.error = False, "; ".join(problems)
    return run


def measure_orthanc(
    orthanc: TriggerOrthanc, rep: int, files: list[Path], series_uid: str, log_dir: Path, args: argparse.Namespace
) -> Run:
    run = Run("orthanc", rep, series_uid)
    t_exit, run.send_s, err = send(orthanc.pg, files, orthanc.port, orthanc.ae_title, log_dir, args.send_timeout)
    if err:
        run.ok, run.error = False, err
        return run
    event: list[tuple[float, str]] = []

    def stable() -> bool:
        got = orthanc.stable_event(series_uid)
        if got is not None:
            event.append(got)
        return got is not None

    # Orthanc's StableAge is checked in whole seconds every 500 ms: allow a few seconds more.
    if not wait_until(stable, args.stable_after + args.trigger_timeout, interval=0.1):
        run.ok, run.error = False, f"no OnStableSeries within {args.stable_after + args.trigger_timeout:.0f} s"
        return run
    when, orthanc_id = event[0]
    run.ext_overhead = when - t_exit - args.stable_after
    run.extra = {"orthanc_series": orthanc_id, "stable_event": when, "storescu_exit": t_exit}
    try:
        n = orthanc.series_instances(orthanc_id)
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        n = -1
        run.extra["count_error"] = str(e)
    if n != len(files):
        run.ok, run.error = False, f"Orthanc holds {n} of {len(files)} instances"
    return run


def date_spawn_cost(workdir: Path, n: int = 20) -> float:
    """Median seconds from calling system() to date(1)'s timestamp, as Orthanc's Lua does it."""
    out = workdir / "calibrate.txt"
    costs = []
    for _ in range(n):
        out.unlink(missing_ok=True)
        t0 = time.time()
        os.system(f"echo calib $(date +%s.%N) >> '{out}'")  # noqa: S605 - the very command Orthanc runs
        costs.append(float(out.read_text().split()[1]) - t0)
    return median(costs) or 0.0


# --------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------


def ms(v: float | None) -> str:
    return "n/a" if v is None else f"{v * 1000:.1f}"


def summary(runs: list[Run], attr: str) -> tuple[float, float, float, list[float]] | None:
    vals = [getattr(r, attr) for r in runs if r.ok and getattr(r, attr) is not None]
    s = spread(vals)
    return None if s is None else (*s, vals)


def report(
    node_runs: list[Run], orthanc_runs: list[Run], args: argparse.Namespace, unavailable: dict[str, str]
) -> tuple[str, str, dict[str, object]]:
    sa = f"{args.stable_after:g} s"
    measures = [
        ("node", node_runs, "job_overhead", f"node: job started - last instance received (index) - {sa}"),
        ("node", node_runs, "stable_overhead", f"node: series stable - last instance received (index) - {sa}"),
        ("node", node_runs, "ext_overhead", f"node: job started - storescu exit - {sa}"),
        ("orthanc", orthanc_runs, "ext_overhead", f"orthanc: OnStableSeries - storescu exit - StableAge {sa}"),
    ]
    header = ["overhead (ms)", "median", "min", "max", "runs"]
    rows: list[list[str]] = []
    stats: dict[str, object] = {}
    for name, runs, attr, label in measures:
        if name not in args.receiver_list:
            continue
        if name in unavailable:
            rows.append([label, "skipped", "", "", ""])
            continue
        s = summary(runs, attr)
        if s is None:
            rows.append([label, "FAILED", "", "", ""])
            continue
        med, lo, hi, vals = s
        each = ", ".join(f"{v * 1000:.1f}" if abs(v) < 0.1 else f"{v * 1000:.0f}" for v in vals)
        rows.append([label, ms(med), ms(lo), ms(hi), each])
        stats[f"{name}.{attr}"] = {"median": med, "min": lo, "max": hi, "runs": vals}
    node_ext, orth_ext = summary(node_runs, "ext_overhead"), summary(orthanc_runs, "ext_overhead")
    ratio = None
    if node_ext and orth_ext and node_ext[0] > 0:
        ratio = orth_ext[0] / node_ext[0]
        rows.append(["ratio orthanc / node (medians, same reference: storescu exit)", f"{ratio:.1f}x", "", "", ""])
    stats["ratio_orthanc_over_node"] = ratio
    brk_header = ["node breakdown (ms)", "median", "min", "max"]
    brk_rows = []
    for attr, label in (
        ("stable_overhead", f"timer: stable_at - last_received_at - {sa}"),
        ("stable_to_created", "rules + job insert: job.created_at - stable_at"),
        ("created_to_started", "worker wake + claim: job.started_at - job.created_at"),
        ("exit_after_last", "storescu exit - last_received_at (fsync, commit, answer, release)"),
    ):
        s = summary(node_runs, attr)
        if s:
            brk_rows.append([label, ms(s[0]), ms(s[1]), ms(s[2])])
            stats[f"node.{attr}"] = {"median": s[0], "min": s[1], "max": s[2], "runs": s[3]}
    plain = table(rows, header, False) + ("\n\n" + table(brk_rows, brk_header, False) if brk_rows else "")
    md = table(rows, header, True) + ("\n\n" + table(brk_rows, brk_header, True) if brk_rows else "")
    return plain, md, stats


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--receivers", default="node,orthanc", help="comma-separated subset of: node,orthanc")
    p.add_argument("--repeat", type=int, default=10, help="repetitions (a new series each)")
    p.add_argument("--count", type=int, default=200, help="instances per series")
    p.add_argument("--size", type=int, default=64, help="image rows and columns")
    p.add_argument(
        "--stable-after",
        type=int,
        default=2,
        help="seconds: the node's stable_after and Orthanc's StableAge (whole seconds in Orthanc)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 3 repetitions of 50 instances")
    p.add_argument(
        "--trigger-timeout",
        type=float,
        default=30.0,
        help="max seconds beyond stable_after to wait for the job / stable event",
    )
    p.add_argument("--job-timeout", type=float, default=120.0, help="max seconds for the forward job to finish")
    p.add_argument("--send-timeout", type=float, default=300.0, help="max seconds for one storescu transfer")
    p.add_argument("--json", metavar="OUT", type=Path, help="write all results as JSON here")
    p.add_argument("--workdir", type=Path, help="where data, logs and storage go [a new temp dir]")
    p.add_argument("--keep", action="store_true", help="keep the work dir (kept anyway after a failure)")
    args = p.parse_args(argv)
    args.receiver_list = [r.strip() for r in args.receivers.split(",") if r.strip()]
    if not args.receiver_list or any(r not in ("node", "orthanc") for r in args.receiver_list):
        p.error("--receivers: choose from node,orthanc")
    if args.quick:
        args.repeat, args.count = 3, 50
    if args.repeat < 1 or args.count < 1 or args.stable_after < 1 or args.size < 8:
        p.error("--repeat, --count, --stable-after must be >= 1 and --size >= 8")
    return args


def series_uid_of(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    needed = [STORESCU, ECHOSCU, STORESCP] + ([ORTHANC] if "orthanc" in args.receiver_list else [])
    if missing_binaries(needed):
        return 2
    workdir, own_workdir = make_workdir(args.workdir, "bench-trigger-")
    machine = machine_info(workdir)
    versions = tool_versions()
    node_runs: list[Run] = []
    orthanc_runs: list[Run] = []
    unavailable: dict[str, str] = {}
    described: dict[str, str] = {}
    failed = False
    calib = None
    try:
        with ProcessGroup() as pg:
            receivers: dict[str, TriggerNode | TriggerOrthanc] = {}
            if "node" in args.receiver_list:
                dest_port = start_storescp(pg, workdir / "dest" / "out")
                receivers["node"] = TriggerNode(pg, args.stable_after, dest_port)
            if "orthanc" in args.receiver_list:
                receivers["orthanc"] = TriggerOrthanc(pg, args.stable_after, workdir / "orthanc")
                calib = date_spawn_cost(workdir)
                log(f"date(1) via system(): {calib * 1000:.1f} ms from the call to the timestamp (median of 20)")
            for name, recv in list(receivers.items()):
                described[name] = recv.describe()
                try:
                    recv.start(workdir / name)
                except ReceiverUnavailable as e:
                    unavailable[name] = str(e)
                    log(f"SKIPPING {name}: {e}")
                    del receivers[name]
            # Untimed warm-up: first series through each receiver (imports, first rule evaluation, Lua start).
            warm = generate_series(
                SeriesSpec("warm", "warm-up", args.size, args.size, WARMUP_INSTANCES),
                workdir / "data" / "warmup",
                seed=7,
                patient_id="WARMUP01",
            )
            warm_uid = series_uid_of(warm[0])
            for name, recv in receivers.items():
                m = measure_node if name == "node" else measure_orthanc
                w = m(recv, -1, warm, warm_uid, workdir / name / "send-warmup", args)  # type: ignore[arg-type]
                log(f"warm-up {name}: {'ok' if w.ok else 'FAILED: ' + w.error}")
            names = list(receivers)
            for rep in range(args.repeat):
                files = generate_series(
                    SeriesSpec("ct", "CT", args.size, args.size, args.count), workdir / "data" / f"rep{rep}", seed=rep
                )
                uid = series_uid_of(files[0])
                order = names if rep % 2 == 0 else names[::-1]
                for name in order:
                    recv = receivers[name]
                    os.sync()  # no write-back from the previous transfer during this one
                    time.sleep(0.5)
                    log_dir = workdir / name / f"send-{rep}"
                    if name == "node":
                        run = measure_node(recv, rep, files, uid, log_dir, args)  # type: ignore[arg-type]
                        node_runs.append(run)
                        detail = (
                            f"job {ms(run.job_overhead)} ms, stable {ms(run.stable_overhead)} ms, "
                            f"from storescu exit {ms(run.ext_overhead)} ms"
                        )
                    else:
                        run = measure_orthanc(recv, rep, files, uid, log_dir, args)  # type: ignore[arg-type]
                        orthanc_runs.append(run)
                        detail = f"stable event from storescu exit {ms(run.ext_overhead)} ms"
                    if not recv.alive():
                        run.ok, run.error = False, (run.error + "; " if run.error else "") + "receiver died"
                    status = "ok" if run.ok else f"FAILED: {run.error}"
                    if run.job_note:
                        status += f"; NOTE {run.job_note}"
                    log(
                        f"rep {rep + 1}/{args.repeat} {name}: sent {len(files)} in {run.send_s:.2f} s; "
                        f"overhead {detail} [{status}]"
                    )
                    failed |= not run.ok
            for name, recv in receivers.items():
                if not recv.alive():
                    failed = True
                    log(f"{name} exited during the run; log: {recv.log_path}")
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

    plain, md, stats = report(node_runs, orthanc_runs, args, unavailable)
    mach = (
        f"{machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, Linux {machine['kernel']}, "
        f"storage {machine['workdir_fs']}, load avg at start {machine['loadavg_1min_at_start']}"
    )
    vers = ", ".join(f"{k} {v}" for k, v in versions.items())
    print()
    print(f"Machine:  {mach}")
    print(f"Versions: {vers}")
    print(
        f"Series: {args.count} x {args.size}x{args.size} 16-bit CT, one storescu association, "
        f"{args.repeat} repetition(s), stable_after / StableAge = {args.stable_after} s"
    )
    for name, d in described.items():
        print(f"  {name:8s} {'SKIPPED: ' + unavailable[name].splitlines()[0] if name in unavailable else d}")
    if calib is not None:
        print(f"  Orthanc's timestamp includes spawning sh + date from Lua: ~{calib * 1000:.1f} ms (calibrated)")
    print()
    print(plain)
    notes = [f"rep {r.rep + 1}: {r.job_note}" for r in node_runs if r.job_note]
    if notes:
        print()
        print(f"Forward jobs that did not succeed ({len(notes)} of {len(node_runs)}; their start times still count):")
        for n in notes:
            print(f"  {n}")
    print()
    print("Markdown (for docs/benchmarks.md):")
    print()
    print(md)
    if args.json:
        out = {
            "machine": machine,
            "versions": versions,
            "settings": {
                "count": args.count,
                "size": args.size,
                "stable_after": args.stable_after,
                "repeat": args.repeat,
            },
            "date_spawn_cost_s": calib,
            "unavailable": unavailable,
            "summary": stats,
            "runs": [asdict(r) for r in node_runs + orthanc_runs],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")
    if failed:
        print("\n!!!!! SOME REPETITIONS FAILED: see the log lines above !!!!!")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
