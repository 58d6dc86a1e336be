#!/usr/bin/env python3
"""Ingest rate with a large index (1,000,000 instances) versus an empty one.

Why this benchmark exists: a node that is fast on a fresh data directory
but slows down as its index grows fails in production after a few months.
Every C-STORE does several index look-ups and inserts in the write path
(``node/index/records.py``); with SQLite's B-trees those should cost
O(log n), so the rate with a million rows should stay close to the rate on
an empty index (target: ratio >= 0.90).  A statement that scans a table,
or an index whose random inserts miss SQLite's page cache on every row,
shows up here and nowhere else.

What it does:

1. Builds (once, cached in ``--workdir``) a SQLite index with ``--rows``
   instance rows: the schema comes from the node's own Alembic migrations,
   rows are inserted directly with ``sqlite3`` (``executemany``, journal off)
   in the shape a real node produces: 200 instances per study in 4 series,
   about 2 studies per patient, random UIDs in pydicom's ``generate_uid``
   form, storage paths in the node's layout, a checksum, timestamps spread
   over a year, one association per series.  The cache file name carries
   the row count, the Alembic head and a hash of the DDL, so any schema
   change (even a migration edited in place) rebuilds it.
2. For each stream count and each index (empty, pre-filled), on a fresh
   copy of the data directory: starts the node (with the ``clean-shutdown``
   marker present, so start-up does not reconcile a million rows that have
   no files), sends an untimed warm-up series, then times ``--count``
   128x128 instances sent by DCMTK ``storescu`` (TCP_NODELAY=1), then checks
   that every instance was stored and indexed.
3. Prints the rates, the ratios pre-filled/empty, and the query plan of
   every statement of the write path against the pre-filled index.

Usage::

    python scripts/bench/bench_index_scale.py --rows 20000 --count 200   # quick
    python scripts/bench/bench_index_scale.py                            # 1M rows, 1000 instances
    python scripts/bench/bench_index_scale.py --repeat 3 --json out.json

Progress goes to stderr, results to stdout.  Exit status: 0 if every
transfer was complete and every ratio meets ``--target``; 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import random
import shutil
import sqlite3
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    ECHOSCU,
    REPO_ROOT,
    STORESCU,
    NodeReceiver,
    ProcessGroup,
    ReceiverUnavailable,
    SeriesSpec,
    generate_series,
    install_sigterm_handler,
    log,
    machine_info,
    missing_binaries,
    rmtree_quiet,
    send_with_storescu,
    tail,
    tool_versions,
    wait_until,
)
from report import median  # noqa: E402
from report import table as report_table  # noqa: E402

sys.path.insert(0, str(REPO_ROOT))

WARMUP_INSTANCES = 5
CLEAN_MARKER = "clean-shutdown"  # node.storage.recovery.CLEAN_MARKER
DEFAULT_WORKDIR = Path(tempfile.gettempdir()) / "dicom-node-bench-index-scale"
UID_PREFIX = "1.2.826.0.1.3680043.8.498."  # pydicom's generate_uid() prefix

CT = "1.2.840.10008.5.1.4.1.1.2"
MR = "1.2.840.10008.5.1.4.1.1.4"
EXPLICIT_LE = "1.2.840.10008.1.2.1"


# --------------------------------------------------------------------------
# The pre-filled index
# --------------------------------------------------------------------------


def schema_head() -> str:
    """The node's newest Alembic revision (the schema the node will expect)."""
    from alembic.script import ScriptDirectory

    from node.index.db import alembic_config

    return str(ScriptDirectory.from_config(alembic_config()).get_current_head())


def _schema_sql(con: sqlite3.Connection) -> str:
    rows = con.execute(
        "SELECT type, name, coalesce(sql, '') FROM sqlite_master WHERE name NOT LIKE 'sqlite_stat%' ORDER BY type, name"
    ).fetchall()
    return "\n".join("|".join(r) for r in rows)


def schema_fingerprint(scratch: Path) -> str:
    """Short hash of the DDL the node's migrations create today.

    The Alembic revision alone is not enough to key the cache: a migration
    edited in place (same revision id) changes the schema without changing
    the head, and a stale cached index would then be used silently.
    """
    db = scratch / f".schema-{os.getpid()}.sqlite"
    try:
        _create_schema(db)
        con = sqlite3.connect(db)
        try:
            sql = _schema_sql(con)
        finally:
            con.close()
    finally:
        for p in scratch.glob(f".schema-{os.getpid()}.sqlite*"):
            p.unlink(missing_ok=True)
    return hashlib.sha256(sql.encode()).hexdigest()[:10]


def _uid(rng: random.Random) -> str:
    """A UID shaped like ``pydicom.uid.generate_uid()``: prefix + ~38 random digits."""
    return UID_PREFIX + str(rng.getrandbits(126))


def _ts(t: dt.datetime) -> str:
    """SQLAlchemy's SQLite DateTime storage format (what the node writes)."""
    return t.strftime("%Y-%m-%d %H:%M:%S.%f")


def _create_schema(path: Path) -> None:
    from node.index.db import make_engine, migrate

    engine = make_engine(f"sqlite:///{path}")
    try:
        migrate(engine)
    finally:
        engine.dispose()


#: The columns fill_index gives a value, in the order of its row tuples. Named rather than read from the
#: schema, so a column a later migration adds (with a default, as the node's inserts need too) does not
#: break the fill.
FILL_COLUMNS: dict[str, tuple[str, ...]] = {
    "patient": ("id", "patient_id", "issuer_of_patient_id", "patient_name", "birth_date", "sex", "created_at"),
    "study": (
        "id",
        "study_instance_uid",
        "patient_fk",
        "study_date",
        "study_time",
        "accession_number",
        "study_id",
        "study_description",
        "referring_physician_name",
        "created_at",
    ),
    "series": (
        "id",
        "series_instance_uid",
        "study_fk",
        "modality",
        "series_number",
        "series_description",
        "body_part_examined",
        "protocol_name",
        "manufacturer",
        "station_name",
        "frame_of_reference_uid",
        "instance_count",
        "first_received_at",
        "last_received_at",
    ),
    "instance": (
        "id",
        "sop_instance_uid",
        "series_fk",
        "sop_class_uid",
        "transfer_syntax_uid",
        "instance_number",
        "acquisition_number",
        "image_type",
        "rows",
        "columns",
        "number_of_frames",
        "bits_allocated",
        "photometric_interpretation",
        "image_position_patient",
        "image_orientation_patient",
        "pixel_spacing",
        "slice_thickness",
        "slice_location",
        "file_path",
        "file_size",
        "checksum",
        "received_at",
        "calling_ae",
        "called_ae",
        "peer_address",
        "association_id",
    ),
}


def fill_index(path: Path, rows: int, per_study: int, per_series: int, seed: int = 20261122) -> dict[str, int]:
    """Create the node's schema in ``path`` and insert ``rows`` realistic instance rows.

    Returns row counts per table.  Bulk-load settings (journal off,
    synchronous off, a 1 GiB page cache, foreign-key checks off: the ids are
    consistent by construction) are connection- or load-only; the file is
    switched back to WAL at the end, as the node expects.
    """
    _create_schema(path)
    rng = random.Random(seed)
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=DELETE")
    con.execute("PRAGMA journal_mode=OFF")
    con.execute("PRAGMA synchronous=OFF")
    con.execute("PRAGMA cache_size=-1048576")
    con.execute("PRAGMA temp_store=MEMORY")
    con.execute("PRAGMA foreign_keys=OFF")

    def ins(table: str, data: list[tuple[object, ...]]) -> None:
        names = FILL_COLUMNS[table]
        con.executemany(f"INSERT INTO {table} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})", data)

    n_studies = -(-rows // per_study)
    start = dt.datetime(2025, 11, 22, 7, 0, 0)
    span_s = 365 * 86400
    # Scanners (calling AE, address, manufacturer, station) and protocols.
    scanners = [
        (
            f"CT_SCANNER_{k}",
            f"10.20.1.{10 + k}",
            ["SIEMENS", "GE MEDICAL SYSTEMS", "Philips"][k % 3],
            f"CTSTATION{k:02d}",
        )
        for k in range(8)
    ]
    mr_scanners = [
        (f"MR_SCANNER_{k}", f"10.20.2.{10 + k}", ["SIEMENS", "GE MEDICAL SYSTEMS"][k % 2], f"MRSTATION{k:02d}")
        for k in range(3)
    ]
    body_parts = ["CHEST", "ABDOMEN", "HEAD", "PELVIS", "NECK", "SPINE"]
    first = ["Anna", "Peter", "Maria", "Jan", "Eva", "Lukas", "Sofia", "Tomas", "Lena", "Karl"]
    last = ["Muller", "Schmidt", "Novak", "Svoboda", "Weber", "Fischer", "Dvorak", "Meyer", "Wagner", "Horak"]

    patient_rows: list[tuple[object, ...]] = []
    study_rows: list[tuple[object, ...]] = []
    series_rows: list[tuple[object, ...]] = []
    inst_rows: list[tuple[object, ...]] = []
    done = 0
    next_log = 200_000
    series_id = 0
    inst_id = 0
    patient_id = 0
    t0 = time.perf_counter()
    con.execute("BEGIN")
    for s in range(n_studies):
        # ~2 studies per patient: a new patient on every even study, or at random.
        if s % 2 == 0 or rng.random() < 0.1:
            patient_id += 1
            pname = f"{rng.choice(last)}^{rng.choice(first)}"
            when = start + dt.timedelta(seconds=span_s * s / n_studies)
            patient_rows.append(
                (
                    patient_id,
                    f"PID{patient_id:08d}",
                    "",
                    pname,
                    f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
                    rng.choice("MFO"),
                    _ts(when),
                )
            )
        when = start + dt.timedelta(seconds=span_s * s / n_studies)
        is_mr = rng.random() < 0.2
        modality, sop_class = ("MR", MR) if is_mr else ("CT", CT)
        ae, addr, manufacturer, station = rng.choice(mr_scanners if is_mr else scanners)
        body = rng.choice(body_parts)
        study_rows.append(
            (
                s + 1,
                _uid(rng),
                patient_id,
                when.strftime("%Y%m%d"),
                when.strftime("%H%M%S.%f")[:10],
                f"ACC{s + 1:09d}",
                str(rng.randint(1, 9999)),
                f"{modality} {body.title()}",
                "Referrer^Doctor",
                _ts(when),
            )
        )
        n_inst = min(per_study, rows - done)
        n_series = -(-n_inst // per_series)
        for k in range(n_series):
            series_id += 1
            in_series = min(per_series, n_inst - k * per_series)
            frame_uid = _uid(rng)
            assoc = f"{rng.getrandbits(48):012x}"
            s_first = when + dt.timedelta(seconds=k * 30)
            thickness = rng.choice([0.625, 1.0, 1.25, 2.5, 5.0])
            spacing = rng.choice([0.488281, 0.683594, 0.78125, 0.976562])
            recv = s_first
            for i in range(in_series):
                inst_id += 1
                sop_uid = _uid(rng)
                digest = hashlib.sha256(sop_uid.encode()).hexdigest()
                z = -thickness * i
                recv = s_first + dt.timedelta(microseconds=25_000 * i)
                inst_rows.append(
                    (
                        inst_id,
                        sop_uid,
                        series_id,
                        sop_class,
                        EXPLICIT_LE,
                        i + 1,
                        1,
                        "ORIGINAL\\PRIMARY\\AXIAL",
                        512,
                        512,
                        None,
                        16,
                        "MONOCHROME2",
                        f"{-spacing * 256:.3f}\\{-spacing * 256:.3f}\\{z:.3f}",
                        "1\\0\\0\\0\\1\\0",
                        f"{spacing:.6f}\\{spacing:.6f}",
                        thickness,
                        z,
                        f"storage/{digest[:2]}/{digest[2:4]}/{digest[:32]}-{rng.getrandbits(32):08x}.dcm",
                        rng.randint(524_800, 525_600),
                        f"xxh3_128:{rng.getrandbits(128):032x}",
                        _ts(recv),
                        ae,
                        "DICOM_NODE",
                        addr,
                        assoc,
                    )
                )
            series_rows.append(
                (
                    series_id,
                    _uid(rng),
                    s + 1,
                    modality,
                    k + 1,
                    f"{body.title()} {thickness} mm",
                    body,
                    f"{body.title()} routine",
                    manufacturer,
                    station,
                    frame_uid,
                    in_series,
                    _ts(s_first),
                    _ts(recv),
                )
            )
        done += n_inst
        if len(inst_rows) >= 50_000 or done == rows:
            ins("patient", patient_rows)
            ins("study", study_rows)
            ins("series", series_rows)
            ins("instance", inst_rows)
            patient_rows, study_rows, series_rows, inst_rows = [], [], [], []
            if done >= next_log or done == rows:
                next_log += 200_000
                rate = done / (time.perf_counter() - t0)
                log(f"  {done:,}/{rows:,} instance rows ({rate:,.0f} rows/s)")
    con.execute("COMMIT")
    counts = {
        t: con.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in ("patient", "study", "series", "instance")
    }
    bad = con.execute("PRAGMA foreign_key_check").fetchall()
    con.close()
    if bad:
        raise RuntimeError(f"pre-filled index breaks foreign keys: {bad[:5]}")
    con = sqlite3.connect(path, isolation_level=None)
    con.execute("PRAGMA journal_mode=WAL")
    con.close()
    return counts


def cached_index(workdir: Path, args: argparse.Namespace) -> tuple[Path, str]:
    """Path of the pre-filled index for ``args.rows`` (built if missing or stale)."""
    cache = workdir / "cache"
    cache.mkdir(parents=True, exist_ok=True)
    head = schema_head()
    fingerprint = schema_fingerprint(cache)
    path = cache / f"index-{args.rows}-rows-{args.per_study}x{args.per_series}-schema-{head}-{fingerprint}.sqlite"
    if path.exists() and not args.rebuild:
        try:
            con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
            n = con.execute("SELECT count(*) FROM instance").fetchone()[0]
            ver = con.execute("SELECT version_num FROM alembic_version").fetchone()[0]
            same = hashlib.sha256(_schema_sql(con).encode()).hexdigest()[:10] == fingerprint
            con.close()
            if n == args.rows and ver == head and same:
                log(f"using cached pre-filled index {path} ({path.stat().st_size / 1e6:.0f} MB)")
                return path, f"{head} ({fingerprint})"
            log(f"cached index {path} is stale ({n} rows, schema {ver}, same DDL: {same}); rebuilding")
        except sqlite3.Error as exc:
            log(f"cached index {path} is unreadable ({exc}); rebuilding")
    for old in cache.glob(f"index-{args.rows}-rows-*"):
        old.unlink()
    tmp = cache / f".building-{os.getpid()}.sqlite"
    tmp.unlink(missing_ok=True)
    log(f"building a pre-filled index with {args.rows:,} instance rows ...")
    t0 = time.perf_counter()
    try:
        counts = fill_index(tmp, args.rows, args.per_study, args.per_series)
        os.replace(tmp, path)
    finally:
        for p in cache.glob(f".building-{os.getpid()}.sqlite*"):
            p.unlink(missing_ok=True)
    log(
        f"built {path.name} in {time.perf_counter() - t0:.0f}s: "
        + ", ".join(f"{v:,} {k}" for k, v in counts.items())
        + f", {path.stat().st_size / 1e6:.0f} MB"
    )
    return path, f"{head} ({fingerprint})"


def copy_index(src: Path, data_dir: Path, mode: str = "pages") -> float:
    """Copy the cached index into a fresh data dir, fsync'ed so its write-back
    does not compete with the node's fsyncs during the timed transfer.

    ``mode="pages"`` writes the copy in 4 KiB pages, leaving it in the page
    cache as if SQLite had written it itself.  ``mode="bulk"`` uses
    ``shutil.copyfile`` (copy_file_range): on kernels with large page-cache
    folios (ext4 on Linux >= 6.x) the copy then sits in large folios, and
    every random 4 KiB page a WAL checkpoint writes back dirties a whole
    folio, multiplying the bytes written to disk several times over.  That
    is an artefact of how the file entered the cache, not of the index size,
    so it is not the default; ``--copy-mode bulk`` shows it.
    """
    t0 = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    dst = data_dir / "index.sqlite"
    if mode == "bulk":
        shutil.copyfile(src, dst)
    else:
        with open(src, "rb", buffering=0) as fin, open(dst, "wb", buffering=0) as fout:
            while chunk := fin.read(1 << 20):
                view = memoryview(chunk)
                for off in range(0, len(view), 4096):
                    fout.write(view[off : off + 4096])
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    # Without the marker the node would compare storage with the index at
    # start-up and report every pre-filled row as a missing file.
    (data_dir / CLEAN_MARKER).write_text("pre-filled by bench_index_scale.py\n")
    return time.perf_counter() - t0


# --------------------------------------------------------------------------
# Query plans of the write path
# --------------------------------------------------------------------------


def write_path_plans(db: Path) -> list[tuple[str, str, list[str]]]:
    """EXPLAIN QUERY PLAN of every prebuilt statement in ``node.index.records``.

    Inserts show no plan (their foreign-key and unique checks are index
    look-ups SQLite does not list); every SELECT/UPDATE must be a SEARCH.
    """
    from sqlalchemy.dialects import sqlite as sqlite_dialect
    from sqlalchemy.sql.dml import Delete, Insert, Update
    from sqlalchemy.sql.selectable import Select

    from node.index import records

    out: list[tuple[str, str, list[str]]] = []
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        for name, stmt in sorted(vars(records).items()):
            if not isinstance(stmt, (Select, Insert, Update, Delete)):
                continue
            kw = {}
            if isinstance(stmt, (Insert, Update)) and not getattr(stmt, "_values", None):
                kw["column_keys"] = [c.name for c in stmt.table.columns if c.name != "id"]
            sql = str(stmt.compile(dialect=sqlite_dialect.dialect(), **kw))
            try:
                plan = [str(r[3]) for r in con.execute("EXPLAIN QUERY PLAN " + sql, [None] * sql.count("?"))]
            except sqlite3.Error as exc:
                plan = [f"(cannot explain: {exc})"]
            out.append((name, " ".join(sql.split()), plan))
    finally:
        con.close()
    return out


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@dataclass
class RunResult:
    kind: str  # "empty" or "prefilled"
    rows_before: int
    streams: int
    elapsed_s: float
    inst_per_s: float
    mb_per_s: float
    startup_s: float
    copy_s: float
    ok: bool
    error: str = ""
    #: Node CPU time (user+system) and bytes written to storage (files, WAL,
    #: database) per timed instance: far less sensitive than the rate to other
    #: load on a shared machine, and they say where a slowdown comes from.
    cpu_ms_per_inst: float = 0.0
    write_kib_per_inst: float = 0.0
    loadavg_1min: float = 0.0


@dataclass
class Cell:
    runs: list[RunResult] = field(default_factory=list)

    def median(self, attr: str) -> float | None:
        return median([getattr(r, attr) for r in self.runs if r.ok])


def proc_usage(pid: int) -> tuple[float, int]:
    """(CPU seconds user+system, bytes written to the storage layer) of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as fp:
        fields = fp.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    written = 0
    try:
        with open(f"/proc/{pid}/io") as fp:
            for line in fp:
                if line.startswith("write_bytes:"):
                    written = int(line.split()[1])
    except OSError:
        pass
    return cpu, written


def index_counts(db: Path, series_uids: list[str]) -> tuple[int, list[int]]:
    """(instance rows, instance_count of each given series) in a stopped node's index."""
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        n = con.execute("SELECT count(*) FROM instance").fetchone()[0]
        counts = [
            (con.execute("SELECT instance_count FROM series WHERE series_instance_uid = ?", (u,)).fetchone() or [-1])[0]
            for u in series_uids
        ]
    finally:
        con.close()
    return n, counts


def run_cell(
    pg: ProcessGroup,
    kind: str,
    rows_before: int,
    prefilled: Path | None,
    cell_dir: Path,
    warmup: list[Path],
    files: list[Path],
    nbytes: int,
    series_uids: tuple[str, str],
    streams: int,
    args: argparse.Namespace,
) -> RunResult:
    rmtree_quiet(cell_dir)
    copy_s = copy_index(prefilled, cell_dir / "node-data", args.copy_mode) if prefilled is not None else 0.0
    recv = NodeReceiver(pg)

    def fail(msg: str) -> RunResult:
        return RunResult(kind, rows_before, streams, 0, 0, 0, 0, copy_s, False, msg)

    load = os.getloadavg()[0]

    t0 = time.perf_counter()
    try:
        recv.start(cell_dir)
    except ReceiverUnavailable as exc:
        return fail(f"node did not start: {exc}")
    startup = time.perf_counter() - t0
    try:
        w = send_with_storescu(
            pg, warmup, recv.port, recv.ae_title, 1, cell_dir / "send-warmup", timeout=args.send_timeout
        )
        if not w.ok:
            return fail("warm-up failed: " + "; ".join(w.errors))
        assert recv.proc is not None
        cpu0, wr0 = proc_usage(recv.proc.pid)
        res = send_with_storescu(
            pg, files, recv.port, recv.ae_title, streams, cell_dir / "send", timeout=args.send_timeout
        )
        expected = len(warmup) + len(files)
        wait_until(lambda: recv.stored_count() >= expected, args.settle, interval=0.1)
        stored_files = recv.stored_count()
        alive = recv.alive()
        cpu1, wr1 = proc_usage(recv.proc.pid) if alive else (cpu0, wr0)
    finally:
        recv.stop()
    errors = list(res.errors)
    if not alive:
        errors.append("the node died during the run")
    if stored_files != expected:
        errors.append(f"{stored_files} files stored, expected {expected}")
    n, counts = index_counts(recv.data_dir / "index.sqlite", list(series_uids))
    if n != rows_before + expected:
        errors.append(f"index has {n} instance rows, expected {rows_before + expected}")
    if counts != [len(warmup), len(files)]:
        errors.append(f"series instance_count {counts}, expected {[len(warmup), len(files)]}")
    if errors and recv.log_path is not None:
        log(f"node log tail:\n{tail(recv.log_path, 15)}")
    return RunResult(
        kind,
        rows_before,
        streams,
        round(res.elapsed_s, 3),
        len(files) / res.elapsed_s,
        nbytes / res.elapsed_s / 1e6,
        round(startup, 2),
        round(copy_s, 2),
        not errors,
        "; ".join(errors),
        round((cpu1 - cpu0) * 1000 / len(files), 3),
        round((wr1 - wr0) / 1024 / len(files), 1),
        round(load, 2),
    )


# --------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="dicom-node ingest rate with a pre-filled index (1M instances) vs an empty one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--rows", type=int, default=1_000_000, help="instance rows in the pre-filled index")
    p.add_argument("--count", type=int, default=1000, help="128x128 instances sent per timed transfer")
    p.add_argument("--streams", default="1,4", help="comma-separated parallel storescu counts")
    p.add_argument("--repeat", type=int, default=1, help="repetitions per cell; the median is reported")
    p.add_argument("--per-study", type=int, default=200, help="instances per study in the pre-filled index")
    p.add_argument("--per-series", type=int, default=50, help="instances per series in the pre-filled index")
    p.add_argument(
        "--workdir",
        type=Path,
        default=DEFAULT_WORKDIR,
        help="cache of pre-filled indexes and run directories (kept between runs)",
    )
    p.add_argument("--rebuild", action="store_true", help="rebuild the cached pre-filled index")
    p.add_argument("--keep", action="store_true", help="keep every run's data dir and logs")
    p.add_argument(
        "--copy-mode",
        choices=("pages", "bulk"),
        default="pages",
        help="how the pre-filled index is copied into each run's data dir (see copy_index)",
    )
    p.add_argument("--target", type=float, default=0.90, help="minimum acceptable rate ratio prefilled/empty")
    p.add_argument("--json", metavar="OUT", type=Path, help="write all results as JSON here")
    p.add_argument("--settle", type=float, default=30.0, help="max seconds to wait for the stored count")
    p.add_argument("--send-timeout", type=float, default=900.0, help="max seconds for one transfer")
    args = p.parse_args(argv)
    args.stream_list = [int(s) for s in args.streams.split(",") if s.strip()]
    if not args.stream_list or min(args.stream_list) < 1:
        p.error("--streams needs positive integers")
    if args.rows < 1 or args.count < 1 or args.repeat < 1 or args.per_series < 1 or args.per_study < 1:
        p.error("--rows, --count, --repeat, --per-study and --per-series must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    if missing_binaries([STORESCU, ECHOSCU]):
        return 2
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work dir: {workdir}")
    machine = machine_info(workdir)
    versions = tool_versions()

    results: dict[tuple[str, int], Cell] = {}
    any_failure = False
    runs_dir = workdir / "runs"
    try:
        prefilled, head = cached_index(workdir, args)
        plans = write_path_plans(prefilled)

        from pydicom import dcmread

        data_dir = workdir / "data" / f"n{args.count}"
        rmtree_quiet(workdir / "data")
        warmup = generate_series(
            SeriesSpec("warmup", "warm-up", 128, 128, WARMUP_INSTANCES),
            workdir / "data" / "warmup",
            seed=7,
            patient_id="WARMUP01",
        )
        files = generate_series(SeriesSpec("small128", "128x128 16-bit", 128, 128, args.count), data_dir, seed=42)
        nbytes = sum(f.stat().st_size for f in files)
        series_uids = (
            str(dcmread(warmup[0], stop_before_pixels=True).SeriesInstanceUID),
            str(dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID),
        )
        log(f"generated {len(files)} instances, {nbytes / 1e6:.1f} MB")

        kinds = [("empty", 0, None), ("prefilled", args.rows, prefilled)]
        with ProcessGroup() as pg:
            for rep in range(args.repeat):
                for streams in args.stream_list:
                    # Alternate the order between repetitions so a drift in
                    # machine load does not always hit the same index.
                    order = kinds if rep % 2 == 0 else kinds[::-1]
                    for kind, rows_before, src in order:
                        cell_dir = runs_dir / f"r{rep}-{kind}-{streams}s"
                        run = run_cell(
                            pg, kind, rows_before, src, cell_dir, warmup, files, nbytes, series_uids, streams, args
                        )
                        results.setdefault((kind, streams), Cell()).runs.append(run)
                        label = f"rep {rep + 1}/{args.repeat} {kind:9s} ({rows_before:,} rows) streams={streams}"
                        if run.ok:
                            log(
                                f"{label}: {run.inst_per_s:7.1f} inst/s {run.mb_per_s:6.1f} MB/s "
                                f"cpu {run.cpu_ms_per_inst:.2f} ms/inst, writes {run.write_kib_per_inst:.0f} KiB/inst "
                                f"({run.elapsed_s:.2f}s; load {run.loadavg_1min:.2f}; node start-up {run.startup_s:.2f}s"
                                + (f", index copy {run.copy_s:.1f}s" if run.copy_s else "")
                                + ")"
                            )
                            if not args.keep:
                                rmtree_quiet(cell_dir)
                        else:
                            any_failure = True
                            log(f"!!!!! {label}: FAILED: {run.error} (kept {cell_dir})")
    except KeyboardInterrupt:
        log("interrupted: all child processes stopped")
        return 130
    finally:
        if not args.keep:
            rmtree_quiet(workdir / "data")

    # --- report
    print()
    print(
        f"Machine:  {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, "
        f"Linux {machine['kernel']}, storage {machine['workdir_fs']}, "
        f"load avg at start {machine['loadavg_1min_at_start']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + f", schema {head}")
    print(
        f"Data: {args.count} instances 128x128 16-bit (~{nbytes / args.count / 1024:.0f} KiB each), "
        f"DCMTK storescu on loopback, TCP_NODELAY=1; pre-filled index: {args.rows:,} instances "
        f"({args.per_study} per study, {args.per_series} per series), "
        f"{prefilled.stat().st_size / 1e6:.0f} MB; median of {args.repeat} run(s)"
    )
    print()
    header = ["index", "streams", "inst/s", "MB/s", "elapsed s", "node CPU ms/inst", "writes KiB/inst", "start-up s"]
    table: list[list[str]] = []
    for streams in args.stream_list:
        for kind, rows_before, _src in (("empty", 0, None), ("prefilled", args.rows, None)):
            cell = results.get((kind, streams), Cell())
            rate = cell.median("inst_per_s")
            table.append(
                [
                    f"{kind} ({rows_before:,} rows)",
                    str(streams),
                    "FAILED" if rate is None else f"{rate:.1f}",
                    "-" if rate is None else f"{cell.median('mb_per_s'):.2f}",
                    "-" if rate is None else f"{cell.median('elapsed_s'):.2f}",
                    "-" if rate is None else f"{cell.median('cpu_ms_per_inst'):.2f}",
                    "-" if rate is None else f"{cell.median('write_kib_per_inst'):.0f}",
                    "-" if rate is None else f"{cell.median('startup_s'):.2f}",
                ]
            )
    print(report_table(table, header))
    print()
    ratios: dict[int, float | None] = {}
    below = False
    for streams in args.stream_list:
        a = results.get(("prefilled", streams), Cell()).median("inst_per_s")
        b = results.get(("empty", streams), Cell()).median("inst_per_s")
        ratios[streams] = a / b if a and b else None
        if ratios[streams] is None:
            print(f"ratio prefilled/empty, {streams} stream(s): n/a")
            below = True
        else:
            verdict = "ok" if ratios[streams] >= args.target else "BELOW TARGET"
            below |= ratios[streams] < args.target
            ca = results[("prefilled", streams)].median("cpu_ms_per_inst")
            cb = results[("empty", streams)].median("cpu_ms_per_inst")
            cpu = f"; node CPU per instance x{ca / cb:.2f}" if ca and cb else ""
            print(
                f"ratio prefilled/empty, {streams} stream(s): {ratios[streams]:.2f} "
                f"(target >= {args.target:.2f}: {verdict}){cpu}"
            )
    print()
    print(f"Write-path query plans (node/index/records.py) on the {args.rows:,}-row index:")
    scans = []
    for name, sql, plan in plans:
        print(f"  {name}: {sql[:110]}{'...' if len(sql) > 110 else ''}")
        for step in plan or ["(no plan: plain insert; unique/foreign-key checks are index look-ups)"]:
            print(f"      {step}")
            if step.startswith("SCAN"):
                scans.append(name)
    if scans:
        print(f"!!!!! table/index SCAN in the write path: {', '.join(scans)}")

    if args.json:
        out = {
            "machine": machine,
            "versions": versions,
            "schema": head,
            "settings": {
                "rows": args.rows,
                "count": args.count,
                "streams": args.stream_list,
                "repeat": args.repeat,
                "per_study": args.per_study,
                "per_series": args.per_series,
                "target": args.target,
                "copy_mode": args.copy_mode,
            },
            "runs": [asdict(r) for cell in results.values() for r in cell.runs],
            "ratios": {str(k): v for k, v in ratios.items()},
            "plans": [{"name": n, "sql": s, "plan": p} for n, s, p in plans],
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")
    if any_failure:
        print("\n!!!!! SOME TRANSFERS FAILED OR COUNTS MISMATCHED: see the log lines above !!!!!")
    return 1 if any_failure or below or scans else 0


if __name__ == "__main__":
    sys.exit(main())
