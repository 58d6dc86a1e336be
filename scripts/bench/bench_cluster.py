#!/usr/bin/env python3
"""Scale-out simulation: many node processes claiming work from one PostgreSQL, and the index's share of a receive.

Two questions decide how far several node processes on one index can go (docs/scale-out.md):

1. **Claiming.** Every job and every delivery is claimed by exactly one process with ``SELECT ... FOR
   UPDATE SKIP LOCKED`` and an UPDATE that writes the owner. Do ten processes claiming at once get in
   each other's way? The script fills one database with queued deliveries across several destinations
   and pending jobs, then runs 1 and then N claimer processes for a fixed time each, calling the node's
   own ``node.jobs.store.claim_next`` and ``node.send.queue.claim`` (batches of the dispatcher's size),
   and reports claims per second and the p50/p99 latency of one claim call. No row may be claimed twice
   (checked after each run from the ``attempts`` column).

2. **The database's share of receiving.** A node on the same PostgreSQL receives a synthetic CT series
   from DCMTK ``storescu`` (1 and 4 associations). The node is started through a small launcher that
   times its index writer's transactions (``IndexWriter._transaction``, client side: statements, round
   trips and the commit) and PostgreSQL's ``pg_stat_statements`` sums the server's own execution time;
   both per instance are set against the whole receive time per instance (wall time of the sends / the
   instances). The writer's busy fraction says how close one process is to being bound by its index.

Usage::

    python scripts/bench/bench_cluster.py                  # 200k deliveries, 20k jobs, 10 claimers, 10 s
    python scripts/bench/bench_cluster.py --quick          # 20k / 2k, 3 s per run, 100 instances
    python scripts/bench/bench_cluster.py --json out.json

PostgreSQL is Debian's package (``/usr/lib/postgresql/*/bin``), started in a temporary directory on a free
loopback port with ``fsync`` on and stopped at the end; as root it runs as the ``postgres`` user. Every
child process is stopped on exit, and every wait is bounded.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import glob
import json
import multiprocessing as mp
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, insert, text

from node.demo.peers import NodeRun, free_port
from node.index.db import make_engine, migrate
from node.index.models import Delivery, Instance, Job, Patient, Series, Study, utcnow
from node.jobs.store import claim_next
from node.send.dispatch import BATCH
from node.send.queue import claim

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import ProcessGroup, SeriesSpec, generate_series, send_with_storescu  # noqa: E402

DESTINATIONS = ("pacs", "archive", "research", "ai")
SERIES = 2000


# -- PostgreSQL ------------------------------------------------------------------------------------


@contextlib.contextmanager
def postgres(workdir: Path, max_connections: int = 100) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (fsync on, pg_stat_statements loaded); yields the server's base URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if not found:
        sys.exit("PostgreSQL is not installed (Debian package postgresql): /usr/lib/postgresql/*/bin/initdb")
    bin_dir = Path(found[-1]).parent
    root = workdir / "pg"
    root.mkdir(parents=True)
    os.chmod(workdir, 0o777)
    os.chmod(root, 0o777)
    as_pg = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    data, port = root / "data", free_port()
    subprocess.run(
        [*as_pg, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"],
        check=True,
        capture_output=True,
    )
    options = (
        f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c fsync=on -c max_connections={max_connections} "
        "-c shared_preload_libraries=pg_stat_statements -c shared_buffers=256MB"
    )
    ctl = [*as_pg, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(root / "pg.log"), "-w", "-t", "60"]
    subprocess.run([*ctl, "-o", options, "start"], check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}"
    finally:
        subprocess.run([*ctl, "-m", "fast", "stop"], capture_output=True)


def new_database(server: str, name: str) -> str:
    engine = create_engine(f"{server}/postgres")
    try:
        with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            c.execute(text(f"CREATE DATABASE {name}"))
    finally:
        engine.dispose()
    return f"{server}/{name}"


# -- filling the queues ----------------------------------------------------------------------------


def fill(engine: Engine, deliveries: int, jobs: int) -> None:
    """One patient and study, SERIES series, one instance per delivered object, the deliveries and jobs."""
    now = utcnow()
    per_series_instances = max(1, deliveries // len(DESTINATIONS) // SERIES)
    with engine.begin() as c:
        patient = c.execute(insert(Patient.__table__).values(patient_id="BENCH").returning(Patient.id)).scalar_one()
        study = c.execute(
            insert(Study.__table__).values(study_instance_uid="2.25.1", patient_fk=patient).returning(Study.id)
        ).scalar_one()
        series_ids = list(
            c.execute(
                insert(Series.__table__).returning(Series.id),
                [{"series_instance_uid": f"2.25.2.{i}", "study_fk": study, "modality": "CT"} for i in range(SERIES)],
            ).scalars()
        )
    instances: list[tuple[int, int, str]] = []  # (instance id, series id, sop uid)
    rows = [
        {
            "sop_instance_uid": f"2.25.3.{s}.{k}",
            "series_fk": sid,
            "sop_class_uid": "1.2.840.10008.5.1.4.1.1.2",
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "file_path": f"files/{s}/{k}.dcm",
            "file_size": 520_000,
            "checksum": "0" * 16,
        }
        for s, sid in enumerate(series_ids)
        for k in range(per_series_instances)
    ]
    for part in _chunks(rows, 10_000):
        with engine.begin() as c:
            got = c.execute(
                insert(Instance.__table__).returning(Instance.id, Instance.series_fk, Instance.sop_instance_uid), part
            )
            instances += [(r[0], r[1], r[2]) for r in got]
    delivery_rows = [
        {
            "instance_fk": iid,
            "series_fk": sid,
            "destination": d,
            "sop_instance_uid": uid,
            "state": "queued",
            "next_attempt_at": now - dt.timedelta(minutes=1),
        }
        for d in DESTINATIONS
        for iid, sid, uid in instances
    ][:deliveries]
    for part in _chunks(delivery_rows, 20_000):
        with engine.begin() as c:
            c.execute(insert(Delivery.__table__), part)
    rules = max(1, jobs // SERIES)
    job_rows = [
        {
            "series_fk": sid,
            "revision": 1,
            "rule": f"rule-{r}",
            "action_index": 0,
            "kind": "plugin",
            "action": json.dumps({"type": "plugin", "plugin": "threshold-seg"}),
            "state": "pending",
            "not_before": now - dt.timedelta(minutes=1),
        }
        for r in range(rules)
        for sid in series_ids
    ][:jobs]
    for part in _chunks(job_rows, 20_000):
        with engine.begin() as c:
            c.execute(insert(Job.__table__), part)
    vacuum(engine)


def reset(engine: Engine) -> None:
    """Everything claimed back to waiting (and the dead row versions vacuumed), for the next run."""
    with engine.begin() as c:
        c.execute(text("UPDATE job SET state = 'pending', owner = NULL, attempts = 0 WHERE state <> 'pending'"))
        c.execute(text("UPDATE delivery SET state = 'queued', owner = NULL, attempts = 0 WHERE state <> 'queued'"))
    vacuum(engine)


def vacuum(engine: Engine) -> None:
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("VACUUM ANALYZE job"))
        c.execute(text("VACUUM ANALYZE delivery"))
        c.execute(text("VACUUM ANALYZE instance"))


def _chunks(items: list[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    for i in range(0, len(items), size):
        yield items[i : i + size]


# -- claimers --------------------------------------------------------------------------------------


@dataclass
class ClaimRun:
    kind: str
    processes: int
    seconds: float
    claimed: int
    calls: int
    per_second: float
    p50_ms: float
    p99_ms: float
    drained: bool
    claimed_twice: int


def _claimer(url: str, kind: str, index: int, start_at: float, seconds: float, out: Any) -> None:
    """One process: claim until the time is up (or nothing is left); send back counts and call latencies."""
    engine = make_engine(url)
    owner = f"bench:{os.getpid()}:{index}"
    with engine.connect() as c:  # the connection is made before the clock starts, as in a running node
        c.execute(text("SELECT 1"))
    while time.time() < start_at:
        time.sleep(0.001)
    deadline, claimed, latencies, drained = start_at + seconds, 0, [], False
    while time.time() < deadline:
        t0 = time.perf_counter()
        if kind == "jobs":
            got = 1 if claim_next(engine, owner) is not None else 0
        else:
            got = len(claim(engine, DESTINATIONS[index % len(DESTINATIONS)], BATCH, owner))
        latencies.append(time.perf_counter() - t0)
        if not got:
            drained = True
            break
        claimed += got
    out.put((claimed, latencies, time.time() - start_at, drained))
    engine.dispose()


def claim_run(url: str, engine: Engine, kind: str, processes: int, seconds: float) -> ClaimRun:
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    start_at = time.time() + 2.0  # every process connected and waiting when the clock starts
    procs = [ctx.Process(target=_claimer, args=(url, kind, i, start_at, seconds, out)) for i in range(processes)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join(timeout=30)
    claimed = sum(r[0] for r in results)
    latencies = sorted(x for r in results for x in r[1])
    elapsed = max(r[2] for r in results)
    table = "job" if kind == "jobs" else "delivery"
    with engine.connect() as c:
        twice = c.execute(text(f"SELECT count(*) FROM {table} WHERE attempts > 1")).scalar_one()
        taken = c.execute(text(f"SELECT count(*) FROM {table} WHERE owner IS NOT NULL")).scalar_one()
    if taken != claimed:
        raise SystemExit(f"{kind}: the claimers reported {claimed} claims, the table holds {taken} owned rows")
    return ClaimRun(
        kind,
        processes,
        round(elapsed, 2),
        claimed,
        len(latencies),
        round(claimed / elapsed, 1),
        round(1000 * statistics.quantiles(latencies, n=100)[49], 2) if len(latencies) > 1 else 0.0,
        round(1000 * statistics.quantiles(latencies, n=100)[98], 2) if len(latencies) > 1 else 0.0,
        any(r[3] for r in results),
        int(twice),
    )


# -- the index's share of receiving ----------------------------------------------------------------

#: Runs ``dicom-node run`` with the index writer's transactions timed; the totals are written every 0.1 s.
LAUNCHER = """
import json, os, sys, threading, time
from node.index import writer
stats = {"transactions": 0, "items": 0, "seconds": 0.0}
_run = writer.IndexWriter._transaction
def _timed(self, batch):
    t0 = time.perf_counter()
    try:
        return _run(self, batch)
    finally:
        stats["transactions"] += 1
        stats["items"] += len(batch)
        stats["seconds"] += time.perf_counter() - t0
writer.IndexWriter._transaction = _timed
def _dump():
    path = os.environ["BENCH_WRITER_STATS"]
    while True:
        with open(path + ".tmp", "w") as f:
            json.dump(stats, f)
        os.replace(path + ".tmp", path)
        time.sleep(0.1)
threading.Thread(target=_dump, daemon=True).start()
sys.argv = ["dicom-node", "run", "--config", sys.argv[1]]
from node.cli import main
main()
"""


class TimedNodeRun(NodeRun):
    @staticmethod
    def command(config: Path) -> list[str]:
        return [sys.executable, "-c", LAUNCHER, str(config)]


@dataclass
class ReceiveRun:
    streams: int
    instances: int
    mb_per_instance: float
    wall_ms_per_instance: float
    writer_ms_per_instance: float
    server_ms_per_instance: float
    writer_transactions: int
    #: The writer's time over the wall time: with one association, the index's share of each instance's
    #: receive; with several, how busy the one writer of the process is.
    index_share: float


def receive_run(server: str, workdir: Path, files: list[Path], streams: int) -> ReceiveRun:
    """A fresh node and database; warm up with one file, then send ``files`` in ``streams`` associations."""
    name = f"ingest_{streams}"
    url = new_database(server, name)
    engine = create_engine(url)
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        c.execute(text("CREATE EXTENSION pg_stat_statements"))
    run_dir = workdir / name
    run_dir.mkdir()
    config = run_dir / "node.toml"
    port = free_port()
    config.write_text(
        f'[node]\nport = {port}\nhost = "127.0.0.1"\ndata_dir = "{run_dir / "data"}"\n'
        f'[database]\nurl = "{url}"\n[web]\nenabled = false\n[tracker]\nstable_after = 600\n'
    )
    stats_path = run_dir / "writer.json"
    node = TimedNodeRun(
        config,
        port,
        run_dir / "node.log",
        env={**os.environ, "BENCH_WRITER_STATS": str(stats_path)},
        popen={"start_new_session": True},
    )
    node.start(timeout=60)
    try:
        with ProcessGroup() as pg:
            warm = send_with_storescu(pg, files[:1], port, "DICOM_NODE", 1, run_dir / "warm")
            if not warm.ok:
                raise SystemExit(f"the warm-up send failed: see {run_dir / 'warm'}")
            with engine.connect() as c:
                c.execute(text("SELECT pg_stat_statements_reset()"))
            before = _writer_stats(stats_path)
            sent = send_with_storescu(pg, files[1:], port, "DICOM_NODE", streams, run_dir / "send")
            if not sent.ok:
                raise SystemExit(f"the send failed: see {run_dir / 'send'}")
            after = _writer_stats(stats_path)
            with engine.connect() as c:
                server_ms = c.execute(
                    text(
                        "SELECT coalesce(sum(total_exec_time), 0) FROM pg_stat_statements s "
                        "JOIN pg_database d ON d.oid = s.dbid WHERE d.datname = :n "
                        "AND s.query NOT LIKE '%pg_stat_statements%'"
                    ),
                    {"n": name},
                ).scalar_one()
                indexed = c.execute(text("SELECT count(*) FROM instance")).scalar_one()
    finally:
        node.stop()
    engine.dispose()
    n = len(files) - 1
    if indexed != len(files):
        raise SystemExit(f"{indexed} of {len(files)} instances indexed: see {run_dir / 'node.log'}")
    wall = sent.elapsed_s
    writer_seconds = after["seconds"] - before["seconds"]
    return ReceiveRun(
        streams,
        n,
        round(sum(f.stat().st_size for f in files[1:]) / n / 1e6, 3),
        round(1000 * wall / n, 2),
        round(1000 * writer_seconds / n, 2),
        round(float(server_ms) / n, 2),
        int(after["transactions"] - before["transactions"]),
        round(writer_seconds / wall, 3),
    )


def _writer_stats(path: Path) -> dict[str, float]:
    """The node's writer totals once its dumper has caught up (it writes them every 0.1 s)."""
    time.sleep(0.3)
    stats: dict[str, float] = json.loads(path.read_text())
    return stats


# -- main ------------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--deliveries", type=int, default=200_000)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--processes", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of each claiming run")
    ap.add_argument("--instances", type=int, default=300, help="instances per receive run (0: none)")
    ap.add_argument("--quick", action="store_true", help="20k deliveries, 2k jobs, 3 s runs, 100 instances")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    if args.quick:
        args.deliveries, args.jobs, args.seconds, args.instances = 20_000, 2_000, 3.0, 100
    workdir = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        with postgres(workdir, max_connections=args.processes + 40) as server:
            url = new_database(server, "claims")
            engine = make_engine(url)
            migrate(engine)
            t0 = time.perf_counter()
            fill(engine, args.deliveries, args.jobs)
            print(
                f"filled {args.deliveries} queued deliveries ({len(DESTINATIONS)} destinations) and "
                f"{args.jobs} pending jobs in {time.perf_counter() - t0:.1f} s",
                flush=True,
            )
            claims: list[ClaimRun] = []
            for kind in ("jobs", "deliveries"):
                for n in sorted({1, args.processes}):
                    engine.dispose()
                    run = claim_run(url, engine, kind, n, args.seconds)
                    claims.append(run)
                    print(_claim_line(run), flush=True)
                    reset(engine)
            engine.dispose()
            results["claims"] = [asdict(r) for r in claims]
            files = (
                []
                if not args.instances
                else generate_series(SeriesSpec("ct512", "0.5 MB", 512, 512, args.instances + 1), workdir / "series")
            )
            receives: list[ReceiveRun] = []
            for streams in (1, 4) if files else ():
                r = receive_run(server, workdir, files, streams)
                receives.append(r)
                print(_receive_line(r), flush=True)
            results["receive"] = [asdict(r) for r in receives]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


def _claim_line(r: ClaimRun) -> str:
    what = "job claims" if r.kind == "jobs" else f"delivery claims (batches of {BATCH})"
    return (
        f"{r.processes:>2} process(es), {what}: {r.per_second:,.0f} rows/s over {r.seconds} s "
        f"({r.calls} calls; latency p50 {r.p50_ms} ms, p99 {r.p99_ms} ms)"
        f"{'; queue drained' if r.drained else ''}; claimed twice: {r.claimed_twice}"
    )


def _receive_line(r: ReceiveRun) -> str:
    return (
        f"receive, {r.streams} association(s), {r.instances} x {r.mb_per_instance} MB: "
        f"{r.wall_ms_per_instance} ms per instance; index writer {r.writer_ms_per_instance} ms per instance "
        f"({r.writer_transactions} transactions; {100 * r.index_share:.0f}% of the wall time), "
        f"PostgreSQL executing {r.server_ms_per_instance} ms per instance"
    )


if __name__ == "__main__":
    sys.exit(main())
