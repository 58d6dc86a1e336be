"""Shared helpers for the dicom-node benchmark scripts.

The benchmarks compare this node against established DICOM receivers
(DCMTK ``storescp``, Orthanc, pynetdicom's ``storescp``) on loopback, always
driving them with the same sender (DCMTK ``storescu``) and the same files, so
that the only variable is the receiver.  This module holds the pieces that
every benchmark needs:

* synthetic DICOM generation (:func:`generate_series`),
* child-process management that never leaks receivers (:class:`ProcessGroup`),
* one :class:`Receiver` class per peer, each knowing how to start on a fresh
  storage directory, wait until it answers C-ECHO and count what it stored,
* a parallel ``storescu`` driver (:func:`send_with_storescu`),
* machine and tool-version discovery for the report.

Only the standard library, numpy, pydicom and pynetdicom are used.
"""

from __future__ import annotations

import abc
import contextlib
import datetime as _dt
import json
import os
import platform
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from node.demo.peers import NodeRun, PeerError, free_port, make_ct_series
from node.demo.peers import peer_env as dcmtk_env  # DCMTK (and Orthanc) acceptors need TCP_NODELAY

# Absolute paths on purpose: a pyenv shim called ``storescu``/``storescp``
# (from pynetdicom's console scripts) shadows the DCMTK binaries on PATH.
STORESCU = "/usr/bin/storescu"
STORESCP = "/usr/bin/storescp"
ECHOSCU = "/usr/bin/echoscu"
ORTHANC = "/usr/sbin/Orthanc"

LOOPBACK = "127.0.0.1"
REPO_ROOT = Path(__file__).resolve().parents[2]

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"  # CT Image Storage SOP Class


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------


def log(msg: str) -> None:
    """Print a progress line to stderr (stdout is kept for the results)."""
    stamp = _dt.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] {msg}", file=sys.stderr, flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.2) -> bool:
    """Poll ``predicate`` until it returns True or ``timeout`` seconds pass.

    Every wait in the benchmarks goes through here so that nothing can hang
    forever on a broken peer.
    """
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def echo_ok(port: int, called_ae: str, timeout: int = 3) -> bool:
    """True if an SCP on ``port`` accepts an association and answers C-ECHO.

    DCMTK ``echoscu`` is used rather than pynetdicom so that the readiness
    probe is identical for all receivers and costs no Python start-up.
    """
    cmd = [
        ECHOSCU,
        "-to",
        str(timeout),
        "-ta",
        str(timeout),
        "-ts",
        str(timeout),
        "-aec",
        called_ae,
        LOOPBACK,
        str(port),
    ]
    try:
        res = subprocess.run(
            cmd,
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=timeout * 3 + 2,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return False
    return res.returncode == 0


def count_files(directory: Path, pattern: str = "*") -> int:
    """Count regular files below ``directory`` matching ``pattern`` (recursive)."""
    if not directory.exists():
        return 0
    return sum(1 for p in directory.rglob(pattern) if p.is_file())


def tail(path: Path, lines: int = 15) -> str:
    """Last lines of a log file, for error messages."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:]) or "(empty log)"


# --------------------------------------------------------------------------
# Process management
# --------------------------------------------------------------------------


class ProcessGroup:
    """Tracks every child process a benchmark starts and kills them on exit.

    Children are started in their own session (``start_new_session=True``):
    a Ctrl-C in the terminal then reaches only the benchmark, which stops the
    children in an orderly way from ``finally``/``__exit__`` instead of
    racing them; and because each child leads its own process group, stopping
    it with ``killpg(child.pid)`` also reaps anything it forked (for example
    ``storescp --fork`` workers) and nothing else.
    """

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen[bytes]] = []

    def __enter__(self) -> ProcessGroup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_all()

    def start(
        self,
        cmd: Sequence[str],
        *,
        log_path: Path | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``cmd`` with stdout+stderr to ``log_path`` (or /dev/null).

        Output goes to a file, never a pipe, so a chatty receiver can never
        block on a full pipe buffer and distort the timing.
        """
        out = open(log_path, "ab") if log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            proc = subprocess.Popen(
                list(cmd),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(cwd) if cwd else None,
                start_new_session=True,
            )
        finally:
            if log_path:
                out.close()  # type: ignore[union-attr]
        self._procs.append(proc)
        return proc

    def track(self, proc: subprocess.Popen[bytes]) -> None:
        """Stop ``proc`` with the others on exit (a child started elsewhere, in its own session)."""
        self._procs.append(proc)

    def forget(self, proc: subprocess.Popen[bytes]) -> None:
        """No longer stop ``proc`` on exit (it was stopped elsewhere)."""
        if proc in self._procs:
            self._procs.remove(proc)

    def stop(self, proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
        """SIGTERM the child's process group, then SIGKILL after ``grace`` s.

        A child that has already exited (and been reaped) is not signalled:
        its id may have been reused by an unrelated process.
        """
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            if proc.poll() is not None:
                break
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=wait)
                break
            except subprocess.TimeoutExpired:
                continue
        if proc in self._procs:
            self._procs.remove(proc)

    def stop_all(self, grace: float = 10.0) -> None:
        """Stop every child still tracked: SIGTERM all, wait, SIGKILL the rest.

        Signals go to all children at once so shutdown time does not add up;
        a second Ctrl-C/SIGTERM while waiting skips straight to SIGKILL, so
        cleanup can be hurried but never skipped.
        """
        procs = list(self._procs)

        def signal_all(sig: int) -> None:
            for proc in procs:
                if proc.poll() is None:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(proc.pid, sig)

        signal_all(signal.SIGTERM)
        try:
            deadline = time.monotonic() + grace
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except KeyboardInterrupt:
            pass
        finally:
            signal_all(signal.SIGKILL)
            for proc in procs:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5.0)
            self._procs.clear()


def install_sigterm_handler() -> None:
    """Turn SIGTERM into KeyboardInterrupt so ``finally`` cleanup runs."""

    def _handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, _handler)


# --------------------------------------------------------------------------
# Synthetic data
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesSpec:
    """Shape of a synthetic CT series."""

    key: str  # short id used in results, e.g. "ct512"
    label: str  # human label for tables
    rows: int
    cols: int
    count: int


def _phantom(rows: int, cols: int) -> np.ndarray:
    """A body-like ellipse phantom in stored values (HU + 1024).

    The image content does not matter for an uncompressed transfer, but a
    plausible image makes the files useful for eyeballing and for later
    benchmarks (e.g. compressed transfer syntaxes) that do care.
    """
    y, x = np.mgrid[0:rows, 0:cols]
    cy, cx = rows / 2.0, cols / 2.0
    img = np.full((rows, cols), 0, dtype=np.float32)  # air: -1024 HU
    body = ((x - cx) / (0.42 * cols)) ** 2 + ((y - cy) / (0.35 * rows)) ** 2 <= 1
    img[body] = 1024 + 40  # soft tissue
    spine = ((x - cx) / (0.06 * cols)) ** 2 + ((y - 1.45 * cy) / (0.06 * rows)) ** 2 <= 1
    img[spine] = 1024 + 700  # bone
    return img


def generate_series(spec: SeriesSpec, out_dir: Path, seed: int = 1234, patient_id: str = "BENCH001") -> list[Path]:
    """Write ``spec.count`` CT Image Storage files (explicit VR LE) to ``out_dir``, in slice order.

    The synthetic CT of the tests and the demo (node.demo.peers.make_ct_series: one patient, study and
    series, real geometry, a UID per slice) with a body-like phantom plus per-slice noise as 12-bit pixels
    in 16-bit words, 350 mm across, one slice per mm.
    """
    rng = np.random.default_rng(seed)
    base = _phantom(spec.rows, spec.cols)

    def pixels(i: int) -> np.ndarray:
        noise = rng.normal(0.0, 20.0, size=(spec.rows, spec.cols)).astype(np.float32)
        return np.clip(base + noise + 5.0 * np.sin(i / 7.0), 0, 4095).astype("<u2")

    spacing = 350.0 / spec.cols
    return make_ct_series(
        out_dir,
        spec.count,
        spec.rows,
        spec.cols,
        patient_name="Bench^Synthetic",
        patient_id=patient_id,
        pixels=pixels,
        spacing=(spacing, spacing),
        slice_step=-1.0,
        extra={
            "SeriesDescription": f"Synthetic {spec.label}",
            "StudyDescription": "Synthetic benchmark study",
            "Manufacturer": "dicom-node-bench",
            "BodyPartExamined": "CHEST",
            "RescaleType": "HU",
            "WindowCenter": "40",
            "WindowWidth": "400",
        },
    )


# --------------------------------------------------------------------------
# Sending
# --------------------------------------------------------------------------


@dataclass
class SendResult:
    """Outcome of one (possibly parallel) storescu transfer."""

    elapsed_s: float
    files: int
    streams: int
    returncodes: list[int]
    errors: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors and all(rc == 0 for rc in self.returncodes)


def split_evenly(items: Sequence[Path], parts: int) -> list[list[Path]]:
    """Split into ``parts`` contiguous chunks whose sizes differ by at most 1."""
    parts = max(1, min(parts, len(items)))
    q, r = divmod(len(items), parts)
    out: list[list[Path]] = []
    start = 0
    for k in range(parts):
        end = start + q + (1 if k < r else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def send_with_storescu(
    pg: ProcessGroup,
    files: Sequence[Path],
    port: int,
    called_ae: str,
    streams: int,
    log_dir: Path,
    timeout: float = 900.0,
) -> SendResult:
    """Send ``files`` with ``streams`` parallel DCMTK storescu associations.

    The file list is split into contiguous parts, one storescu process (hence
    one association) per part, all started back to back.  The measured time
    runs from just before the first process is spawned until the last one has
    exited, so it includes association set-up and release: that is what a
    modality or PACS pushing a series experiences.

    storescu options: ``-aec`` for the called AE; ``-ll error`` instead of
    ``-q`` so real failures are still logged (to a file); ``-ta``/``-to``
    raised so a receiver that serialises associations (single-process
    storescp) does not make the waiting clients time out.  Transfer syntax
    proposal is storescu's default (all uncompressed, explicit VR LE first),
    which every receiver accepts as explicit VR little endian.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    chunks = split_evenly(files, streams)
    env = dcmtk_env()
    procs: list[tuple[subprocess.Popen[bytes], Path]] = []
    t0 = time.perf_counter()
    for k, chunk in enumerate(chunks):
        log_path = log_dir / f"storescu-{k}.log"
        cmd = [
            STORESCU,
            "-ll",
            "error",
            "-aec",
            called_ae,
            "-to",
            "30",
            "-ta",
            "600",
            LOOPBACK,
            str(port),
            *[str(p) for p in chunk],
        ]
        procs.append((pg.start(cmd, log_path=log_path, env=env), log_path))
    deadline = time.monotonic() + timeout
    errors: list[str] = []
    rcs: list[int] = []
    for proc, _log in procs:
        try:
            rcs.append(proc.wait(timeout=max(0.1, deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            pg.stop(proc)
            rcs.append(-999)
            errors.append(f"storescu timed out after {timeout:.0f}s")
    elapsed = time.perf_counter() - t0
    for (proc, log_path), rc in zip(procs, rcs, strict=True):
        pg.stop(proc)  # already exited; just forget it
        if rc != 0:
            errors.append(f"storescu rc={rc}: {tail(log_path, 5)}")
    return SendResult(elapsed, len(files), len(chunks), rcs, errors)


# --------------------------------------------------------------------------
# Receivers
# --------------------------------------------------------------------------


class ReceiverUnavailable(RuntimeError):
    """The receiver could not be started; the benchmark skips it."""


class Receiver(abc.ABC):
    """A DICOM storage SCP under test.

    Each instance is started on a fresh working directory (new storage and,
    where relevant, a new database) so duplicates from earlier cells cannot
    change its behaviour, and stopped again after the cell.
    """

    name: str = "?"
    ae_title: str = "ANY-SCP"
    start_timeout: float = 30.0

    def __init__(self, pg: ProcessGroup) -> None:
        self.pg = pg
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        self.workdir: Path | None = None
        self.log_path: Path | None = None

    # -- to implement ----------------------------------------------------
    @abc.abstractmethod
    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        """Prepare ``workdir`` and return (argv, env, cwd) to launch the SCP."""

    @abc.abstractmethod
    def stored_count(self) -> int:
        """Number of instances the receiver has persisted so far."""

    @abc.abstractmethod
    def describe(self) -> str:
        """One line saying how the receiver is run (for the report)."""

    # -- shared ----------------------------------------------------------
    def _ready(self) -> bool:
        return echo_ok(self.port, self.ae_title)

    def start(self, workdir: Path) -> None:
        """Launch on ``workdir`` and wait (bounded) until C-ECHO succeeds."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        cmd, env, cwd = self._command(workdir)
        self.proc = self.pg.start(cmd, log_path=self.log_path, env=env, cwd=cwd)

        def probe() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                return True  # exited: stop waiting, reported below
            return self._ready()

        ok = wait_until(probe, self.start_timeout, interval=0.25)
        if self.proc.poll() is not None or not ok:
            rc = self.proc.poll()
            self.stop()
            why = f"exited with rc={rc}" if rc is not None else f"not answering C-ECHO after {self.start_timeout:.0f}s"
            raise ReceiverUnavailable(
                f"{self.name} {why}; command: {' '.join(cmd)}\n--- log tail ---\n{tail(self.log_path)}"
            )

    def stop(self) -> None:
        if self.proc is not None:
            self.pg.stop(self.proc)
            self.proc = None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class NodeReceiver(Receiver):
    """This project's node: ``python -m node run --config CFG`` from the repo root."""

    name = "node"
    ae_title = "DICOM_NODE"
    run: NodeRun | None = None

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        if not (REPO_ROOT / "node").is_dir():
            raise ReceiverUnavailable(f"no package directory {REPO_ROOT / 'node'} (node not written yet?)")
        self.data_dir = workdir / "node-data"
        cfg = workdir / "node.toml"
        cfg.write_text(
            "[node]\n"
            f'ae_title = "{self.ae_title}"\n'
            f'host = "{LOOPBACK}"\n'
            f"port = {self.port}\n"
            f'data_dir = "{self.data_dir}"\n' + self.extra_config()
        )
        self.config_path = cfg
        return NodeRun.command(cfg), dict(os.environ), REPO_ROOT

    def start(self, workdir: Path) -> None:
        """Launch on ``workdir`` with NodeRun (the tests' and the demo's starter) and wait until C-ECHO works."""
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.port = free_port()
        self.log_path = workdir / f"{self.name}.log"
        cmd, env, cwd = self._command(workdir)
        # Own session, as ProcessGroup starts every child; tracked there so stop_all() reaches it.
        self.run = NodeRun(
            self.config_path,
            self.port,
            self.log_path,
            ae_title=self.ae_title,
            cwd=cwd,
            env=env,
            popen={"start_new_session": True},
        )
        try:
            self.run.start(timeout=self.start_timeout)
        except PeerError as e:
            raise ReceiverUnavailable(f"{self.name}: {e}; command: {' '.join(cmd)}") from None
        assert self.run.proc is not None
        self.proc = self.run.proc
        self.pg.track(self.proc)

    def stop(self) -> None:
        if self.run is not None and self.proc is not None:
            self.run.stop(timeout=10.0)
            self.pg.forget(self.proc)
        self.proc = None

    def extra_config(self) -> str:
        """TOML appended after the [node] keys (a subclass's tracker, rules, destinations)."""
        return ""

    def query(self, sql: str, *params: object) -> list[tuple]:
        """Read the node's SQLite index (the times a benchmark reports are the node's own)."""
        con = sqlite3.connect(self.data_dir / "index.sqlite", timeout=10)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def stored_count(self) -> int:
        return count_files(self.data_dir, "*.dcm")

    def describe(self) -> str:
        return "python -m node run --config node.toml (SQLite in data_dir, defaults)"


class StorescpReceiver(Receiver):
    """DCMTK storescp writing one file per instance into a directory.

    Options: ``-od DIR`` (write received objects there, file format with meta
    header, filename from the SOP Instance UID: all defaults), ``-aet``,
    ``-dhl`` (skip reverse DNS of the peer), and, only with ``fork=True``,
    ``--fork``.  The default ``--single-process`` mode handles one association
    at a time, so with several parallel senders the later ones queue; that is
    how storescp is most commonly run and is reported as such.
    ``--bit-preserving`` is not used: default mode writes what it received
    with the same transfer syntax, which for these files is the same bytes.
    """

    name = "storescp"
    ae_title = "STORESCP"

    def __init__(self, pg: ProcessGroup, fork: bool = False) -> None:
        super().__init__(pg)
        self.fork = fork

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        self.out_dir = workdir / "storescp-out"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [STORESCP, *self._options(), "-od", str(self.out_dir), str(self.port)]
        return cmd, dcmtk_env(), workdir

    def _options(self) -> list[str]:
        return ["-aet", self.ae_title, "-dhl", *(["--fork"] if self.fork else [])]

    def stored_count(self) -> int:
        return count_files(self.out_dir)

    def describe(self) -> str:
        return f"storescp {' '.join(self._options())} -od DIR PORT (TCP_NODELAY=1)"


class PynetdicomReceiver(Receiver):
    """pynetdicom's bundled storescp app (threaded, one thread per association)."""

    name = "pynetdicom"
    ae_title = "STORESCP"

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        self.out_dir = workdir / "pynetdicom-out"
        self.out_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            sys.executable,
            "-m",
            "pynetdicom",
            "storescp",
            *self._options(),
            "-od",
            str(self.out_dir),
            str(self.port),
        ]
        return cmd, dict(os.environ), workdir

    def _options(self) -> list[str]:
        return ["-aet", self.ae_title, "-ba", LOOPBACK]

    def stored_count(self) -> int:
        return count_files(self.out_dir)

    def describe(self) -> str:
        return f"python -m pynetdicom storescp {' '.join(self._options())} -od DIR PORT"


class OrthancReceiver(Receiver):
    """Orthanc with a throw-away SQLite index and filesystem storage.

    The configuration is Orthanc's defaults except for what isolates it
    (ports, directories, no plugins, no remote access/auth) and what lets any
    SCU store (``DicomAlwaysAllowStore``, ``DicomCheckCalledAet`` false).
    Notably ``SyncStorageArea`` stays at its default (true: fsync per file)
    unless overridden with ``extra``.  Readiness is checked on both the REST
    API (``/system``) and C-ECHO; counting uses ``/statistics``.
    """

    name = "orthanc"
    ae_title = "ORTHANC"
    start_timeout = 60.0

    def __init__(self, pg: ProcessGroup, extra: dict[str, object] | None = None) -> None:
        super().__init__(pg)
        self.extra = dict(extra or {})
        self.http_port = 0

    def config(self, workdir: Path) -> dict[str, object]:
        cfg: dict[str, object] = {
            "Name": "bench-orthanc",
            "StorageDirectory": str(workdir / "orthanc-storage"),
            "IndexDirectory": str(workdir / "orthanc-index"),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowEcho": True,
            "DicomAlwaysAllowStore": True,
        }
        cfg.update(self.extra)
        return cfg

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        self.http_port = free_port()
        while self.http_port == self.port:
            self.http_port = free_port()
        cfg_path = workdir / "orthanc.json"
        cfg_path.write_text(json.dumps(self.config(workdir), indent=2))
        return [ORTHANC, str(cfg_path)], dcmtk_env(), workdir

    def _get(self, path: str, timeout: float = 5.0) -> object:
        url = f"http://{LOOPBACK}:{self.http_port}{path}"
        with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (loopback)
            return json.loads(resp.read().decode())

    def _ready(self) -> bool:
        try:
            self._get("/system", timeout=2.0)
        except (urllib.error.URLError, OSError, ValueError):
            return False
        return echo_ok(self.port, self.ae_title)

    def stored_count(self) -> int:
        stats = self._get("/statistics")
        assert isinstance(stats, dict)
        return int(stats["CountInstances"])

    def describe(self) -> str:
        shown = {
            k: v
            for k, v in self.config(Path("TMP")).items()
            if k not in ("StorageDirectory", "IndexDirectory", "HttpPort", "DicomPort", "Name")
        }
        return f"Orthanc CONFIG.json with {json.dumps(shown, separators=(',', ':'))} (TCP_NODELAY=1)"


RECEIVER_NAMES = ("node", "storescp", "orthanc", "pynetdicom")


# --------------------------------------------------------------------------
# Report metadata
# --------------------------------------------------------------------------


def _first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=15, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _fs_type(path: Path) -> str:
    """Filesystem type of ``path`` from /proc/mounts (storage speed matters)."""
    best, fstype = "", "unknown"
    try:
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if len(parts) >= 3 and resolved.startswith(parts[1]) and len(parts[1]) > len(best):
                best, fstype = parts[1], f"{parts[2]} on {parts[1]}"
    except OSError:
        pass
    return fstype


def machine_info(workdir: Path) -> dict[str, object]:
    """CPU, memory, kernel and storage facts that explain the numbers."""
    model = "unknown"
    mem = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
                break
    except OSError:
        pass
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "memory": mem,
        "kernel": platform.release(),
        "workdir_fs": _fs_type(workdir),
        "loadavg_1min_at_start": round(os.getloadavg()[0], 2),
    }


def tool_versions() -> dict[str, str]:
    """Versions of everything taking part in the benchmark."""
    import pydicom
    import pynetdicom

    dcmtk = _first_line([STORESCU, "--version"])
    m = re.search(r"v(\d+\.\d+\.\d+)", dcmtk)
    orthanc = _first_line([ORTHANC, "--version"])
    m2 = re.search(r"(\d+\.\d+\.\d+)", orthanc)
    commit = _first_line(["git", "-C", str(REPO_ROOT), "rev-parse", "--short", "HEAD"])
    if not re.fullmatch(r"[0-9a-f]{4,40}", commit):
        commit = "no commit"
    else:
        # Uncommitted changes to the node make the commit id misleading.
        status = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--", "node"],
            capture_output=True,
            text=True,
            timeout=15,
            check=False,
        )
        if status.stdout.strip():
            commit += "+dirty"
    return {
        "dcmtk": m.group(1) if m else dcmtk,
        "orthanc": m2.group(1) if m2 else orthanc,
        "pynetdicom": pynetdicom.__version__,
        "pydicom": pydicom.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
        "node_commit": commit,
    }


def have_binaries() -> dict[str, bool]:
    """Which external tools exist (absolute paths, see the module constants)."""
    return {p: Path(p).exists() and os.access(p, os.X_OK) for p in (STORESCU, STORESCP, ECHOSCU, ORTHANC)}


def missing_binaries(needed: Iterable[str]) -> list[str]:
    """Those of ``needed`` (absolute paths) that are not installed; logs them with the apt hint."""
    missing = sorted(p for p in needed if not (Path(p).exists() and os.access(p, os.X_OK)))
    if missing:
        log(f"missing required binaries: {missing} (apt-get install dcmtk orthanc)")
    return missing


def make_workdir(arg: Path | None, prefix: str) -> tuple[Path, bool]:
    """The work directory (a new temp dir unless given) and whether we created it."""
    own = arg is None
    workdir = Path(tempfile.mkdtemp(prefix=prefix)) if own else arg
    workdir.mkdir(parents=True, exist_ok=True)
    log(f"work dir: {workdir}")
    return workdir, own


def set_ct_pixel_module(ds: Any, rows: int, cols: int) -> None:
    """12-bit unsigned CT pixels stored in 16 bits, HU rescale and a soft-tissue window."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = cols
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"


def rmtree_quiet(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
