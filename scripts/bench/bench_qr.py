#!/usr/bin/env python3
"""C-FIND latency with 1,000 and 100,000 studies in the index: this node vs Orthanc (issue 18).

What one size does:

1. Generates (once, cached under ``--cache``) ``N`` tiny studies of one CT instance each (8x8 pixels,
   16-bit), about two studies per patient, with varied Patient's Name, Patient ID and Study Date: the
   names are made of four two-letter syllables (about five patients per family name, whatever the
   size), the dates advance one day per 20 studies. The files sit in folders of 50
   (the storescu streams share them out: even shares at 1,000 studies too).
2. Starts every server on an empty data directory (``--servers``: ``node`` with SQLite, ``node-pg`` on a
   throwaway PostgreSQL server, ``orthanc`` with its defaults: SQLite index, plain files) and fills each
   one by real C-STORE: ``--streams`` parallel DCMTK ``storescu`` processes, each scanning its share of
   the folders (``+sd +r``). How long each fill took is printed and recorded; every server must then
   hold all N instances. Then it waits ``--settle`` seconds (the servers' deferred series-stability
   work) and until every server is idle.
3. Runs the same C-FIND queries against every server with the same client (pynetdicom, Study Root, one
   association per server kept open for all queries), query by query in turn (the server order
   alternates) so that a change in machine load hits every server alike. Four kinds, ``--queries`` of
   each, each query with its own target drawn from the data (the same targets for every server):

   * ``patient-id``: STUDY level, PatientID exact (about 2 matches);
   * ``name-wildcard``: STUDY level, PatientName ``<family name>*`` (about 12 matches);
   * ``date-range``: STUDY level, StudyDate ``<day>-<day+1>`` (about 40 matches);
   * ``series``: SERIES level, StudyInstanceUID of one study (1 match).

   STUDY-level queries ask for the return keys a viewer's study list asks for (names, IDs, dates,
   accession, description, ModalitiesInStudy, NumberOfStudyRelatedInstances). The latency of a query
   runs from sending the C-FIND-RQ to the final response, all pending responses read and decoded.
   Every server must return, for every query, the number of matches the generated data holds (a
   query that does not is reported, asked once more, and makes the exit status 1).
4. Prints median and p95 per kind and server, and the ratios node/Orthanc of the medians (below 1:
   the node answers faster).

    python scripts/bench/bench_qr.py --sizes 200 --queries 20          # quick check
    python scripts/bench/bench_qr.py --json /tmp/bench-qr.json          # 1,000 and 100,000 studies

Progress goes to stderr, results to stdout. Nothing here is a test threshold.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# The node of this work tree (its in-process helpers: node.demo.peers), whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
# The throwaway PostgreSQL server the tests use (tests/helpers/postgres.py): one way to start it.
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))

from bench_common import (  # noqa: E402
    CT_IMAGE_STORAGE,
    ECHOSCU,
    LOOPBACK,
    ORTHANC,
    STORESCU,
    NodeReceiver,
    OrthancReceiver,
    ProcessGroup,
    Receiver,
    ReceiverUnavailable,
    dcmtk_env,
    free_port,
    install_sigterm_handler,
    log,
    machine_info,
    make_workdir,
    missing_binaries,
    rmtree_quiet,
    set_ct_pixel_module,
    tail,
    tool_versions,
    wait_until,
)
from report import median, table  # noqa: E402

DATA_VERSION = 3  # bump when the generated studies change (the cache is keyed by it)
DEFAULT_CACHE = Path("/tmp/dicom-node-bench-qr")
PER_FOLDER = 50  # small enough that every size splits evenly over 4 streams
STUDIES_PER_DAY = 20
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
UID_ROOT = "1.2.826.0.1.3680043.8.498.77."  # pydicom's root, a branch of our own
CALLING_AE = "BENCHFIND"
KINDS = ("patient-id", "name-wildcard", "date-range", "series")
SYLLABLES = [c + v for c in "bdfgklmnprstvz" for v in "aeiou"][:40]
GIVEN = ["Anna", "Peter", "Maria", "Jan", "Eva", "Lukas", "Sofia", "Tomas", "Lena", "Karl", "Ida", "Otto"]
STUDY_RETURN_KEYS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "AccessionNumber",
    "StudyID",
    "StudyDescription",
    "ReferringPhysicianName",
    "ModalitiesInStudy",
    "NumberOfStudyRelatedInstances",
)
SERIES_RETURN_KEYS = ("Modality", "SeriesNumber", "SeriesDescription", "NumberOfSeriesRelatedInstances")


# --------------------------------------------------------------------------
# The studies
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """What the queries need to know of one generated study."""

    patient_id: str
    family: str
    date: str
    study_uid: str


def _family_name(k: int) -> str:
    """The k-th family name: four two-letter syllables (no name is a prefix of another)."""
    n = len(SYLLABLES)
    return "".join(SYLLABLES[(k // n**j) % n] for j in range(4)).capitalize()


def plan_studies(n: int, seed: int = 18) -> list[Study]:
    """``n`` studies: ~2 per patient (the two on unrelated days), ~5 patients per family name, 20 per day."""
    import datetime as dt

    rng = random.Random(seed)
    patients = max(1, n // 2)
    families = max(1, patients // 5)
    order = list(range(n))
    rng.shuffle(order)  # study i belongs to patient order[i] // 2: a patient's studies on unrelated days
    fam_of = [rng.randrange(families) for _ in range(patients)]
    day0 = dt.date(2000, 1, 1)
    out = []
    for i in range(n):
        p = min(order[i] // 2, patients - 1)
        day = day0 + dt.timedelta(days=i // STUDIES_PER_DAY)
        out.append(
            Study(
                f"P{p:07d}",
                _family_name(fam_of[p] * 7919 % (len(SYLLABLES) ** 4)),
                day.strftime("%Y%m%d"),
                f"{UID_ROOT}{n}.{i + 1}.1",
            )
        )
    return out


def write_studies(out: Path, n: int) -> list[Study]:
    """Write the ``n`` one-instance studies as Explicit VR Little Endian files into folders of PER_FOLDER,
    one process per CPU (100,000 files take minutes with pydicom in one)."""
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, len(os.sched_getaffinity(0)))
    folders = -(-n // PER_FOLDER)
    bounds = [
        (k * folders // workers * PER_FOLDER, min(n, (k + 1) * folders // workers * PER_FOLDER)) for k in range(workers)
    ]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for _ in pool.map(_write_range, [out] * workers, [n] * workers, *zip(*bounds, strict=True)):
            pass
    return plan_studies(n)


def _write_range(out: Path, n: int, start: int, stop: int) -> None:
    """Write studies ``start`` to ``stop`` - 1 of ``n`` (a worker process of write_studies)."""
    import numpy as np
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    studies = plan_studies(n)
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.Modality = "CT"
    ds.Manufacturer = "dicom-node-bench"
    ds.BodyPartExamined = "CHEST"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.StudyID = "1"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0.0, 0.0, 0.0]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1.0, 1.0]
    ds.SliceThickness = 1.0
    set_ct_pixel_module(ds, 8, 8)
    ds.PixelData = np.arange(64, dtype="<u2").reshape(8, 8).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    t0 = time.perf_counter()
    for i in range(start, stop):
        s = studies[i]
        folder = out / f"{i // PER_FOLDER:05d}"
        if i % PER_FOLDER == 0 or i == start:
            folder.mkdir(parents=True, exist_ok=True)
        p = int(s.patient_id[1:])
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID = f"{UID_ROOT}{n}.{i + 1}.3"
        ds.StudyInstanceUID = s.study_uid
        ds.SeriesInstanceUID = f"{UID_ROOT}{n}.{i + 1}.2"
        ds.FrameOfReferenceUID = f"{UID_ROOT}{n}.{i + 1}.4"
        ds.PatientID = s.patient_id
        ds.PatientName = f"{s.family}^{GIVEN[p % len(GIVEN)]}"
        ds.PatientBirthDate = f"{1930 + p % 80}0{1 + p % 9}15"
        ds.PatientSex = "MF"[p % 2]
        ds.StudyDate = ds.SeriesDate = s.date
        ds.StudyTime = f"{8 + i % 10:02d}{i * 7 % 60:02d}00"
        ds.AccessionNumber = f"A{i + 1:09d}"
        ds.StudyDescription = "CT " + ("Chest", "Abdomen", "Head", "Pelvis")[i * 13 % 4]
        ds.ReferringPhysicianName = "Referrer^Doctor"
        ds.SeriesDescription = "tiny"
        ds.save_as(folder / f"{i:07d}.dcm", enforce_file_format=True)
        done = i + 1 - start
        if done % 20000 == 0:
            log(
                f"  {done:,}/{stop - start:,} studies written by one process ({done / (time.perf_counter() - t0):,.0f}/s)"
            )


def cached_studies(cache: Path, n: int, rebuild: bool) -> tuple[Path, list[Study]]:
    """The folder of the ``n`` generated studies (written once; a ``done`` marker says it is complete)."""
    folder = cache / f"studies-{n}-v{DATA_VERSION}"
    marker = folder / "done"
    if marker.exists() and not rebuild:
        log(f"using the cached {n:,} studies in {folder}")
        return folder, plan_studies(n)
    rmtree_quiet(folder)
    log(f"writing {n:,} one-instance studies into {folder} ...")
    t0 = time.perf_counter()
    studies = write_studies(folder, n)
    marker.write_text(f"{n}\n")
    log(f"wrote {n:,} studies in {time.perf_counter() - t0:.0f} s")
    return folder, studies


# --------------------------------------------------------------------------
# Filling a server by C-STORE
# --------------------------------------------------------------------------


def fill(pg: ProcessGroup, data: Path, recv: Receiver, streams: int, log_dir: Path, timeout: float) -> float:
    """C-STORE every generated file into ``recv`` with ``streams`` storescu processes; seconds taken.

    Each storescu gets every ``streams``-th folder and scans it (``+sd +r``: the command line stays short
    whatever the size). Raises RuntimeError when a storescu fails or times out.
    """
    folders = sorted(p for p in data.iterdir() if p.is_dir())
    shares = [folders[k::streams] for k in range(min(streams, len(folders)))]
    log_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    t0 = time.perf_counter()
    for k, share in enumerate(shares):
        cmd = [STORESCU, "-ll", "error", "-aec", recv.ae_title, "-to", "30", "-ta", "600", "+sd", "+r"]
        cmd += [LOOPBACK, str(recv.port), *map(str, share)]
        procs.append(
            (pg.start(cmd, log_path=log_dir / f"storescu-{k}.log", env=dcmtk_env()), log_dir / f"storescu-{k}.log")
        )
    deadline = time.monotonic() + timeout
    errors = []
    for proc, log_path in procs:
        try:
            rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:  # noqa: BLE001 - TimeoutExpired: stopped below
            rc = -999
        pg.stop(proc)
        if rc != 0:
            errors.append(f"storescu rc={rc}: {tail(log_path, 5)}")
    elapsed = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"filling {recv.name} failed: " + "; ".join(errors))
    return elapsed


# --------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------


class QrNode(NodeReceiver):
    """The node answering C-FIND ([qr] defaults), on SQLite or on a new PostgreSQL database."""

    def __init__(self, pg: ProcessGroup, database: Callable[[], str] | None) -> None:
        super().__init__(pg)
        self.database = database
        self.name = "node-pg" if database is not None else "node"
        self.start_timeout = 120.0

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        """The node runs on the config written here alone: DICOM_NODE_* variables (a test run's) are dropped."""
        cmd, env, cwd = super()._command(workdir)
        return cmd, {k: v for k, v in env.items() if not k.startswith("DICOM_NODE_")}, cwd

    def extra_config(self) -> str:
        text = f"\n[web]\nport = {free_port()}\n"
        if self.database is not None:
            text += f'\n[database]\nurl = "{self.database()}"\n'
        return text

    def stored_count(self) -> int:
        if self.database is None:
            return int(self.query("select count(*) from instance")[0][0])
        return super().stored_count()

    def describe(self) -> str:
        db = "PostgreSQL on loopback (fsync on)" if self.database is not None else "SQLite in data_dir"
        return f"python -m node run ([qr] defaults, {db})"


class QrOrthanc(OrthancReceiver):
    """Orthanc with its defaults (SQLite index, plain files) answering C-FIND from the benchmark's AE."""

    def config(self, workdir: Path) -> dict[str, object]:
        cfg = super().config(workdir)
        cfg["DicomModalities"] = {"bench": [CALLING_AE, LOOPBACK, 104]}
        cfg["DicomAlwaysAllowFind"] = True  # Orthanc >= 1.10: C-FIND from any AE (the modality above too)
        return cfg


# --------------------------------------------------------------------------
# The queries
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class FindQuery:
    kind: str
    level: str
    keys: tuple[tuple[str, str], ...]
    #: How many studies (series) match, from the generated data: every server must return that many.
    expected: int


def make_queries(studies: Sequence[Study], per_kind: int, seed: int = 1818) -> list[FindQuery]:
    """``per_kind`` queries of each kind, targets drawn at random from the data (interleaved by kind)."""
    from collections import Counter

    rng = random.Random(seed)
    dates = sorted({s.date for s in studies})
    per_patient = Counter(s.patient_id for s in studies)
    per_family = Counter(s.family for s in studies)
    per_date = Counter(s.date for s in studies)
    out: list[FindQuery] = []
    for _ in range(per_kind):
        s = rng.choice(studies)
        out.append(FindQuery("patient-id", "STUDY", (("PatientID", s.patient_id),), per_patient[s.patient_id]))
        s = rng.choice(studies)
        out.append(FindQuery("name-wildcard", "STUDY", (("PatientName", f"{s.family}*"),), per_family[s.family]))
        k = rng.randrange(len(dates))
        first, last = dates[k], dates[min(k + 1, len(dates) - 1)]
        in_range = per_date[first] + (per_date[last] if last != first else 0)
        out.append(FindQuery("date-range", "STUDY", (("StudyDate", f"{first}-{last}"),), in_range))
        s = rng.choice(studies)
        out.append(FindQuery("series", "SERIES", (("StudyInstanceUID", s.study_uid),), 1))
    return out


def identifier(q: FindQuery) -> Any:
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.QueryRetrieveLevel = q.level
    keys = STUDY_RETURN_KEYS if q.level == "STUDY" else SERIES_RETURN_KEYS
    for kw in ("StudyInstanceUID", *keys) if q.level == "STUDY" else ("StudyInstanceUID", "SeriesInstanceUID", *keys):
        setattr(ds, kw, "")
    for kw, value in q.keys:
        setattr(ds, kw, value)
    return ds


class FindClient:
    """One pynetdicom association (Study Root FIND) to one server, kept open for every query."""

    def __init__(self, recv: Receiver) -> None:
        from pynetdicom import AE

        self.recv = recv
        ae = AE(ae_title=CALLING_AE)
        ae.add_requested_context(STUDY_ROOT_FIND)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
        self.ae = ae
        self.assoc = ae.associate(LOOPBACK, recv.port, ae_title=recv.ae_title)
        if not self.assoc.is_established:
            raise ReceiverUnavailable(f"{recv.name}: association for C-FIND refused or aborted")
        # pynetdicom leaves Nagle on: its command and identifier PDUs would then wait ~40 ms for the
        # server's delayed ACK, and every query would measure that instead of the server.
        self.assoc.dul.socket.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not any(c.abstract_syntax == STUDY_ROOT_FIND for c in self.assoc.accepted_contexts):
            self.close()
            raise ReceiverUnavailable(f"{recv.name}: Study Root C-FIND not accepted (no Q/R SCP?)")

    def _park_reactor(self) -> None:
        """Keep pynetdicom's reactor thread out of the next query's responses.

        send_c_find() pauses that thread while it sends, but the thread may have passed its checkpoint just
        before (it resumed after the previous query) and then takes a response off the queue and drops it
        as unexpected: a match goes missing now and then (seen with both servers). Parked here, outside
        the timed part, it stays parked until the query has ended.
        """
        assoc = self.assoc
        assoc._reactor_checkpoint.clear()
        wait_until(lambda: bool(assoc._is_paused), 2.0, interval=0.001)
        time.sleep(0.005)  # a thread that had passed the checkpoint has come round to it again by now

    def find(self, q: FindQuery) -> tuple[float, int, int]:
        """(seconds to the final response, matches, final status)."""
        if not self.assoc.is_established:
            raise RuntimeError(f"{self.recv.name}: the C-FIND association ended (see the server's log)")
        ds = identifier(q)
        matches, status = 0, -1
        self._park_reactor()
        t0 = time.perf_counter()
        for st, _ident in self.assoc.send_c_find(ds, STUDY_ROOT_FIND):
            if not st or "Status" not in st:
                status = -2  # no response within the DIMSE timeout, or the association broke
                break
            status = int(st.Status)
            if status in (0xFF00, 0xFF01):
                matches += 1
        return time.perf_counter() - t0, matches, status

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.assoc.release()
        self.ae.shutdown()


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@dataclass
class ServerResult:
    name: str
    describe: str
    fill_s: float = 0.0
    fill_inst_per_s: float = 0.0
    stored: int = 0
    latencies_ms: dict[str, list[float]] = field(default_factory=dict)
    matches: dict[str, list[int]] = field(default_factory=dict)
    error: str = ""


def p95(values: Sequence[float]) -> float | None:
    if not values:
        return None
    if len(values) < 2:
        return values[0]
    return statistics.quantiles(values, n=20, method="inclusive")[18]


def make_server(name: str, pg: ProcessGroup, args: argparse.Namespace) -> Receiver:
    if name == "node":
        return QrNode(pg, None)
    if name == "node-pg":
        return QrNode(pg, args.new_database)
    if name == "orthanc":
        return QrOrthanc(pg)
    raise ValueError(name)


def run_size(n: int, args: argparse.Namespace, workdir: Path) -> tuple[dict[str, ServerResult], list[str]]:
    """One size: generate (or reuse) the data, fill every server, run the queries; results and problems."""
    data, studies = cached_studies(args.cache, n, args.rebuild)
    queries = make_queries(studies, args.queries)
    warmup = make_queries(studies, 3, seed=7)
    results: dict[str, ServerResult] = {}
    problems: list[str] = []
    with ProcessGroup() as pg:
        servers: dict[str, Receiver] = {}
        clients: dict[str, FindClient] = {}
        try:
            for name in args.server_list:
                recv = make_server(name, pg, args)
                res = results[name] = ServerResult(name, "")
                try:
                    recv.start(workdir / f"{n}-{name}")
                except ReceiverUnavailable as exc:
                    res.error = f"did not start: {exc}"
                    problems.append(f"{n:,} studies, {name}: {res.error}")
                    continue
                res.describe = recv.describe()
                servers[name] = recv
                log(f"{n:,} studies: filling {name} with {args.streams} storescu stream(s) ...")
                try:
                    res.fill_s = fill(pg, data, recv, args.streams, workdir / f"{n}-{name}-logs", args.fill_timeout)
                except RuntimeError as exc:
                    res.error = str(exc)
                    problems.append(f"{n:,} studies, {name}: {exc}")
                    continue
                wait_until(lambda r=recv: _count(r) >= n, 60, interval=0.5)
                res.stored = _count(recv)
                res.fill_inst_per_s = n / res.fill_s
                log(
                    f"  {name}: {n:,} studies stored by C-STORE in {res.fill_s:.1f} s ({res.fill_inst_per_s:.0f} inst/s)"
                )
                if res.stored != n:
                    res.error = f"holds {res.stored} instances after the fill, expected {n}"
                    problems.append(f"{n:,} studies, {name}: {res.error}")
                    continue
            filled = [name for name in servers if not results[name].error]
            settle({name: servers[name] for name in filled}, args.settle)
            for name in filled:  # after settling: an association idle that long would have timed out
                try:
                    clients[name] = FindClient(servers[name])
                except ReceiverUnavailable as exc:
                    results[name].error = str(exc)
                    problems.append(f"{n:,} studies, {name}: {exc}")
            names = list(clients)
            log(f"{n:,} studies: {len(queries)} C-FIND queries on {', '.join(names) or 'no server'} ...")
            for i, q in enumerate([*warmup, *queries]):
                timed = i >= len(warmup)
                order = list(names) if i % 2 == 0 else names[::-1]
                for name in order:
                    try:
                        secs, matches, status = clients[name].find(q)
                        again = clients[name].find(q)[1:] if status != 0 or matches != q.expected else None
                    except RuntimeError as exc:
                        results[name].error = str(exc)
                        problems.append(f"{n:,} studies, {name}: {exc}; no more queries to it")
                        names.remove(name)
                        continue
                    if timed:
                        results[name].latencies_ms.setdefault(q.kind, []).append(secs * 1000)
                        results[name].matches.setdefault(q.kind, []).append(matches)
                    if again is not None:
                        problems.append(
                            f"{n:,} studies, {name}: {q.kind} {dict(q.keys)}: {matches} match(es), status "
                            f"0x{status & 0xFFFF:04X}; {q.expected} expected; asked again: (matches, status) {again}"
                        )
        finally:
            for c in clients.values():
                c.close()
            for recv in servers.values():
                recv.stop()
    if not args.keep:
        for name in args.server_list:
            rmtree_quiet(workdir / f"{n}-{name}")
    return results, problems


def session_cpu(leader: int) -> float:
    """CPU seconds (user + system) used so far by the processes of the session ``leader`` started."""
    total = 0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # ended meanwhile
        if int(fields[3]) == leader:
            total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def settle(servers: dict[str, Receiver], wait_s: float, timeout: float = 300.0) -> None:
    """Wait ``wait_s`` seconds, then until every server is idle, before the first query.

    Both servers do deferred work after receiving: the node's series tracker and Orthanc's stable
    events fire 60 s (their defaults) after a series' last instance. Queried before that work is
    done, every server would be measured against its own and the others' background work.
    """
    procs = {name: r.proc for name, r in servers.items() if r.proc is not None}
    log(f"waiting {wait_s:.0f} s for deferred work (series stability), then until the servers are idle ...")
    time.sleep(wait_s)
    t0 = time.monotonic()

    def idle() -> bool:
        before = {n: session_cpu(p.pid) for n, p in procs.items()}
        time.sleep(2.0)
        busy = {n: session_cpu(p.pid) - before[n] for n, p in procs.items()}
        return all(v < 0.04 for v in busy.values())  # < 2 % of one core over 2 s

    if not wait_until(idle, timeout, interval=0.0):
        log(f"the servers were still busy after {timeout:.0f} s: querying anyway")
    log(f"idle after {wait_s + time.monotonic() - t0:.0f} s")


def _count(recv: Receiver) -> int:
    try:
        return recv.stored_count()
    except Exception:  # noqa: BLE001 - a REST or SQLite hiccup: asked again
        return -1


def report(sizes: dict[int, dict[str, ServerResult]], servers: Sequence[str]) -> list[str]:
    """The tables (Markdown) and the ratio lines; also returned as lines for the JSON."""
    lines: list[str] = []
    fill_rows = [
        [f"{n:,}", name, f"{r.fill_s:.1f}", f"{r.fill_inst_per_s:.0f}", r.error or "ok"]
        for n, res in sizes.items()
        for name, r in res.items()
    ]
    lines.append(table(fill_rows, ["studies", "server", "fill s (C-STORE)", "inst/s", "check"], markdown=True))
    lines.append("")
    header = ["studies", "query", "matches"] + [f"{s} median / p95 ms" for s in servers]
    header += [f"{s}/orthanc" for s in servers if s != "orthanc" and "orthanc" in servers]
    rows = []
    for n, res in sizes.items():
        for kind in KINDS:
            m = next((median(r.matches[kind]) for r in res.values() if r.matches.get(kind)), None)
            row = [f"{n:,}", kind, "-" if m is None else f"{m:g}"]
            for s in servers:
                v = res[s].latencies_ms.get(kind, []) if s in res else []
                med, p = median(v), p95(v)
                row.append("n/a" if med is None or p is None else f"{med:.1f} / {p:.1f}")
            for s in servers:
                if s == "orthanc" or "orthanc" not in servers:
                    continue
                a = median(res[s].latencies_ms.get(kind, [])) if s in res else None
                b = median(res["orthanc"].latencies_ms.get(kind, [])) if "orthanc" in res else None
                row.append("n/a" if not a or not b else f"**{a / b:.2f}**")
            rows.append(row)
    lines.append(table(rows, header, markdown=True))
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1000,100000", help="comma-separated numbers of studies in the index")
    p.add_argument("--queries", type=int, default=200, help="queries of each kind per size")
    p.add_argument("--servers", default="node,orthanc", help="comma-separated: node, node-pg, orthanc")
    p.add_argument("--streams", type=int, default=4, help="parallel storescu processes filling each server")
    p.add_argument("--cache", type=Path, default=DEFAULT_CACHE, help="generated studies, kept between runs")
    p.add_argument("--rebuild", action="store_true", help="write the generated studies again")
    p.add_argument("--workdir", type=Path, help="servers' data directories (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the servers' data directories")
    p.add_argument(
        "--settle",
        type=float,
        default=65.0,
        help="seconds to wait after the fills before querying (longer than both servers' 60 s series stability)",
    )
    p.add_argument("--fill-timeout", type=float, default=3600.0, help="max seconds to fill one server")
    p.add_argument("--json", metavar="OUT", type=Path, help="write every measurement as JSON here")
    args = p.parse_args(argv)
    args.size_list = [int(s) for s in args.sizes.split(",") if s.strip()]
    args.server_list = [s.strip() for s in args.servers.split(",") if s.strip()]
    if not args.size_list or min(args.size_list) < 10:
        p.error("--sizes needs numbers of studies >= 10")
    if set(args.server_list) - {"node", "node-pg", "orthanc"} or not args.server_list:
        p.error("--servers: node, node-pg and/or orthanc")
    if args.queries < 1 or args.streams < 1:
        p.error("--queries and --streams must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    with contextlib.ExitStack() as stack:
        args.new_database = None
        if "node-pg" in args.server_list:
            from helpers.postgres import new_database, postgres_server

            server = stack.enter_context(postgres_server())
            args.new_database = lambda: new_database(server)
        return run_all(args)


def run_all(args: argparse.Namespace) -> int:
    if missing_binaries([STORESCU, ECHOSCU, *([ORTHANC] if "orthanc" in args.server_list else [])]):
        return 2
    import logging

    logging.getLogger("pynetdicom").setLevel(logging.CRITICAL)
    workdir, own = make_workdir(args.workdir, "bench-qr-")
    machine = machine_info(workdir)
    versions = tool_versions()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    sizes: dict[int, dict[str, ServerResult]] = {}
    problems: list[str] = []
    try:
        for n in args.size_list:
            sizes[n], more = run_size(n, args, workdir)
            problems += more
    except KeyboardInterrupt:
        log("interrupted: all child processes stopped")
        return 130
    finally:
        if own and not args.keep:
            rmtree_quiet(workdir)
    print()
    print(f"Command: {command}")
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, Linux {machine['kernel']}, "
        f"{machine['workdir_fs']}, load average at start {machine['loadavg_1min_at_start']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"C-FIND client: pynetdicom, Study Root, one association per server; {args.queries} queries per kind; "
        f"fill: {args.streams} storescu stream(s)"
    )
    print()
    lines = report(sizes, args.server_list)
    print("\n".join(lines))
    for p in problems:
        print(f"!!!!! {p}")
    if args.json:
        out = {
            "command": command,
            "machine": machine,
            "versions": versions,
            "settings": {
                "sizes": args.size_list,
                "queries": args.queries,
                "servers": args.server_list,
                "streams": args.streams,
                "client": "pynetdicom " + versions["pynetdicom"],
            },
            "results": {str(n): {k: asdict(v) for k, v in res.items()} for n, res in sizes.items()},
            "problems": problems,
            "tables": lines,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2) + "\n")
        log(f"wrote {args.json}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
