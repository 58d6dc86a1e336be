#!/usr/bin/env python3
"""DICOMweb speed (issue 18): STOW-RS instances/s and WADO-RS series retrieval MB/s, this node vs Orthanc's
DICOMweb plugin, with the node's own C-STORE (and Orthanc's) on the same data as the reference.

One repetition runs four cells, each on a freshly started server with an empty data directory, in an order
that rotates between repetitions:

* ``node stow``: the node (SQLite, defaults, ``[web]`` with a token) receives the series by STOW-RS;
* ``node c-store``: the node receives it from DCMTK ``storescu`` (one association);
* ``orthanc stow``: Orthanc with its DICOMweb plugin (``node.demo.peers.Orthanc(dicomweb=True)``: default
  storage, fsync per file) receives it by STOW-RS;
* ``orthanc c-store``: the same Orthanc receives it from ``storescu``.

STOW-RS client (the same for both servers): httpx, ``--batch`` instances per ``multipart/related;
type="application/dicom"`` request (0: all in one), ``--stow-streams`` requests in flight; each body is
streamed from the files with its Content-Length known in advance (no chunked encoding). Time: from the
first request to the last response; every response must be 200 and list each instance of its request in
ReferencedSOPSequence, and every server must then hold every instance (the node's index, Orthanc's
``/statistics``).

After a STOW cell, with the series in the server, WADO-RS retrieves it ``--wado-repeat`` times:
``GET {base}/studies/{study}/series/{series}`` with ``Accept: multipart/related; type="application/dicom";
transfer-syntax=*`` (the files as stored), read by httpx to the end; MB/s counts the response body. The
number of parts must equal the number of instances.

Data: the synthetic CT series of the other benchmarks (``bench_common.generate_series``: 512x512 16-bit,
Explicit VR Little Endian, ``--count`` instances), or the files of ``--data DIR`` (e.g. a real CT series).

    python scripts/bench/bench_dicomweb.py --count 50 --repeat 1        # quick check
    python scripts/bench/bench_dicomweb.py --repeat 3 --json /tmp/bench-dicomweb.json

Progress goes to stderr, results to stdout. Nothing here is a test threshold.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

import httpx

# The node of this work tree (its in-process helpers: node.demo.peers), whatever is installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import (  # noqa: E402
    ECHOSCU,
    ORTHANC,
    STORESCU,
    NodeReceiver,
    ProcessGroup,
    ReceiverUnavailable,
    SeriesSpec,
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
from report import cell, ratio, table  # noqa: E402

from node.demo.peers import Orthanc, PeerError, find_dicomweb_plugin  # noqa: E402
from node.dicom.multipart import Body, Part  # noqa: E402
from node.send.stow import StowResponse  # noqa: E402

CELLS = ("node stow", "node c-store", "orthanc stow", "orthanc c-store")
WADO_ACCEPT = 'multipart/related; type="application/dicom"; transfer-syntax=*'
CHUNK = 1 << 20


# --------------------------------------------------------------------------
# The servers
# --------------------------------------------------------------------------


class WebNode(NodeReceiver):
    """The node with its web server on a free port and a known token (DICOMweb under /dicom-web)."""

    def __init__(self, pg: ProcessGroup) -> None:
        super().__init__(pg)
        self.web_port = 0
        self.token = secrets.token_hex(16)

    def _command(self, workdir: Path) -> tuple[list[str], dict[str, str], Path | None]:
        """The node runs on the config written here alone: DICOM_NODE_* variables (a test run's) are dropped."""
        cmd, env, cwd = super()._command(workdir)
        return cmd, {k: v for k, v in env.items() if not k.startswith("DICOM_NODE_")}, cwd

    def extra_config(self) -> str:
        self.web_port = free_port()
        return f'\n[web]\nport = {self.web_port}\ntoken = "{self.token}"\n'

    def start(self, workdir: Path) -> None:
        """Started once it answers C-ECHO and its web server answers HTTP (it starts listening a little later)."""
        super().start(workdir)
        if not wait_until(self._web_up, 60, interval=0.1):
            self.stop()
            raise ReceiverUnavailable(f"node: no HTTP answer on port {self.web_port} within 60 s")

    def _web_up(self) -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{self.web_port}/healthz", timeout=2)
        except httpx.HTTPError:
            return False
        return True

    @property
    def dicomweb_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}/dicom-web"

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def stored_count(self) -> int:
        return int(self.query("select count(*) from instance")[0][0])


class Server:
    """One server of a cell: the node or Orthanc, what the clients need to reach it, and how to stop it."""

    def __init__(self, pg: ProcessGroup, kind: str, root: Path) -> None:
        self.kind = kind
        self.node: WebNode | None = None
        self.orthanc: Orthanc | None = None
        if kind == "node":
            self.node = WebNode(pg)
            self.node.start(root)
            self.url, self.headers = self.node.dicomweb_url, self.node.headers()
            self.port, self.ae_title = self.node.port, self.node.ae_title
        else:
            self.orthanc = Orthanc(root, dicomweb=True, name="bench-orthanc")
            try:
                self.orthanc.start(timeout=60)
            except PeerError as exc:
                raise ReceiverUnavailable(f"orthanc: {exc}") from None
            self.url, self.headers = self.orthanc.dicomweb_url, {}
            self.port, self.ae_title = self.orthanc.dicom_port, self.orthanc.aet

    def count(self) -> int:
        try:
            return self.node.stored_count() if self.node else self.orthanc.count()  # type: ignore[union-attr]
        except Exception:  # noqa: BLE001 - a hiccup while it settles: asked again
            return -1

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()
        if self.orthanc is not None:
            self.orthanc.stop()


# --------------------------------------------------------------------------
# The clients
# --------------------------------------------------------------------------


def stow(server: Server, files: Sequence[Path], batch: int, streams: int, timeout: float) -> tuple[float, list[str]]:
    """STOW-RS ``files`` in batches with ``streams`` requests in flight; (seconds, problems)."""
    batches = [list(files)] if batch <= 0 else [list(files[i : i + batch]) for i in range(0, len(files), batch)]
    local = threading.local()
    clients: list[httpx.Client] = []
    lock = threading.Lock()

    def client() -> httpx.Client:
        if not hasattr(local, "c"):
            local.c = httpx.Client(timeout=timeout, headers=server.headers)
            with lock:
                clients.append(local.c)
        return local.c

    def send(part: list[Path]) -> str:
        body = Body([Part.of_file(f) for f in part])
        headers = {**body.headers(), "Accept": "application/dicom+json"}
        rsp = client().post(f"{server.url}/studies", content=body, headers=headers)
        if rsp.status_code != 200:
            return f"STOW-RS of {len(part)} instances: HTTP {rsp.status_code}: {rsp.text[:300]}"
        answer = StowResponse.parse(rsp.content)
        if answer is None or len(answer.stored) != len(part):
            listed = "no STOW-RS response" if answer is None else f"{len(answer.stored)} listed as stored"
            return f"STOW-RS of {len(part)} instances: HTTP 200 but {listed}: {rsp.text[:300]}"
        return ""

    t0 = time.perf_counter()
    try:
        with ThreadPoolExecutor(max_workers=max(1, streams)) as pool:
            errors = [e for e in pool.map(send, batches) if e]
    finally:
        elapsed = time.perf_counter() - t0
        for c in clients:
            c.close()
    return elapsed, errors


def wado_series(server: Server, study: str, series: str, timeout: float) -> tuple[float, int, int]:
    """WADO-RS of one series read to the end: (seconds, body bytes, parts)."""
    url = f"{server.url}/studies/{study}/series/{series}"
    with httpx.Client(timeout=timeout, headers=server.headers) as c:
        t0 = time.perf_counter()
        with c.stream("GET", url, headers={"Accept": WADO_ACCEPT}) as rsp:
            if rsp.status_code != 200:
                rsp.read()
                raise RuntimeError(f"WADO-RS {url}: HTTP {rsp.status_code}: {rsp.text[:300]}")
            delimiter = b"--" + _boundary(rsp.headers.get("content-type", "")).encode()
            nbytes, found, carry = 0, 0, b""
            for chunk in rsp.iter_raw(CHUNK):
                nbytes += len(chunk)
                window = carry + chunk
                found += window.count(delimiter)
                carry = window[-(len(delimiter) - 1) :]
        elapsed = time.perf_counter() - t0
    return elapsed, nbytes, max(0, found - 1)  # the closing delimiter is not a part


def _boundary(content_type: str) -> str:
    for param in content_type.split(";")[1:]:
        key, _, value = param.strip().partition("=")
        if key.lower() == "boundary":
            return value.strip('"')
    raise RuntimeError(f"WADO-RS answer without a multipart boundary: Content-Type {content_type!r}")


# --------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------


@dataclass
class Results:
    store_s: dict[str, list[float]] = field(default_factory=dict)
    wado_s: dict[str, list[float]] = field(default_factory=dict)
    wado_bytes: dict[str, list[int]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def run_cell(
    pg: ProcessGroup, name: str, files: list[Path], uids: tuple[str, str], root: Path, args: argparse.Namespace
) -> tuple[float | None, list[tuple[float, int]], list[str]]:
    """One cell on a fresh server: (store seconds or None, [(WADO seconds, bytes)], problems)."""
    kind, how = name.split()
    try:
        server = Server(pg, kind, root)
    except ReceiverUnavailable as exc:
        return None, [], [f"{name}: {exc}"]
    problems: list[str] = []
    wado: list[tuple[float, int]] = []
    stored = False
    secs = 0.0
    try:
        if how == "stow":
            secs, errors = stow(server, files, args.batch, args.stow_streams, args.timeout)
            problems += [f"{name}: {e}" for e in errors]
        else:
            sent = send_with_storescu(pg, files, server.port, server.ae_title, 1, root / "storescu")
            secs = sent.elapsed_s
            problems += [f"{name}: {e}" for e in sent.errors]
        wait_until(lambda: server.count() >= len(files), 60, interval=0.1)
        held = server.count()
        if held != len(files):
            problems.append(f"{name}: the server holds {held} instances, {len(files)} were sent")
        stored = not problems
        if how == "stow" and stored:
            for _ in range(args.wado_repeat):
                w_secs, nbytes, parts = wado_series(server, *uids, args.timeout)
                if parts != len(files):
                    problems.append(f"{name}: WADO-RS returned {parts} parts for {len(files)} instances")
                    break
                wado.append((w_secs, nbytes))
    except (RuntimeError, OSError, httpx.HTTPError) as exc:
        problems.append(f"{name}: {exc!r}")
    finally:
        server.stop()
    return (secs if stored else None), wado, problems


def load_files(args: argparse.Namespace, workdir: Path) -> tuple[list[Path], tuple[str, str], str]:
    """The files, (study, series) UIDs of the series, and a label."""
    from pydicom import dcmread

    if args.data:
        files = sorted(p for p in args.data.rglob("*") if p.is_file() and not p.name.startswith("."))
        label = f"{len(files)} files of {args.data}"
    else:
        spec = SeriesSpec("ct512", "CT 512x512 16-bit", 512, 512, args.count)
        files = generate_series(spec, workdir / "data")
        label = f"synthetic CT 512x512 16-bit x{len(files)}"
    uids = {
        (str(d.StudyInstanceUID), str(d.SeriesInstanceUID))
        for d in (dcmread(f, stop_before_pixels=True) for f in files)
    }
    if len(uids) != 1:
        raise SystemExit(f"--data must hold one series (found {len(uids)} study/series pairs)")
    return files, uids.pop(), label


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--count", type=int, default=200, help="synthetic CT instances (without --data)")
    p.add_argument("--data", type=Path, help="send these files (one series) instead of the synthetic CT")
    p.add_argument("--repeat", type=int, default=3, help="repetitions; medians are reported")
    p.add_argument("--batch", type=int, default=50, help="instances per STOW-RS request (0: all in one)")
    p.add_argument("--stow-streams", type=int, default=1, help="STOW-RS requests in flight")
    p.add_argument("--wado-repeat", type=int, default=5, help="WADO-RS retrievals after each STOW cell")
    p.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells: " + ", ".join(CELLS))
    p.add_argument("--timeout", type=float, default=600.0, help="HTTP timeout per request, seconds")
    p.add_argument("--workdir", type=Path, help="data and servers' directories (default: a new temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", metavar="OUT", type=Path, help="write every measurement as JSON here")
    args = p.parse_args(argv)
    args.cell_list = [c.strip() for c in args.cells.split(",") if c.strip()]
    if not args.cell_list or set(args.cell_list) - set(CELLS):
        p.error(f"--cells: some of {', '.join(CELLS)}")
    if args.count < 1 or args.repeat < 1 or args.stow_streams < 1 or args.wado_repeat < 1:
        p.error("--count, --repeat, --stow-streams and --wado-repeat must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    install_sigterm_handler()
    if missing_binaries([STORESCU, ECHOSCU, ORTHANC]):
        return 2
    workdir, own = make_workdir(args.workdir, "bench-dicomweb-")
    machine = machine_info(workdir)
    versions = tool_versions()
    command = " ".join([Path(sys.executable).name, *sys.argv])
    res = Results()
    try:
        files, uids, label = load_files(args, workdir)
        nbytes = sum(f.stat().st_size for f in files)
        log(f"{label}: {nbytes / 1e6:.1f} MB")
        with ProcessGroup() as pg:
            for rep in range(args.repeat):
                k = rep % len(args.cell_list)
                for name in args.cell_list[k:] + args.cell_list[:k]:
                    root = workdir / f"r{rep}-{name.replace(' ', '-')}"
                    secs, wado, problems = run_cell(pg, name, files, uids, root, args)
                    res.problems += problems
                    if secs is not None:
                        res.store_s.setdefault(name, []).append(secs)
                    for w_secs, w_bytes in wado:
                        res.wado_s.setdefault(name.split()[0], []).append(w_secs)
                        res.wado_bytes.setdefault(name.split()[0], []).append(w_bytes)
                    shown = "FAILED" if secs is None else f"{len(files) / secs:.1f} inst/s"
                    more = "".join(f", WADO-RS {b / s / 1e6:.0f} MB/s" for s, b in wado)
                    log(f"rep {rep + 1}/{args.repeat} {name}: {shown}{more}")
                    if not args.keep and not problems:
                        rmtree_quiet(root)
    except KeyboardInterrupt:
        log("interrupted: all child processes stopped")
        return 130
    finally:
        if own and not args.keep:
            rmtree_quiet(workdir)

    rates = {n: [len(files) / s for s in v] for n, v in res.store_s.items()}
    mbps = {n: [b / s / 1e6 for s, b in zip(res.wado_s[n], res.wado_bytes[n], strict=True)] for n in res.wado_s}
    lines = [
        table(
            [[n, cell(rates.get(n, []), "{:.1f}"), str(len(rates.get(n, [])))] for n in args.cell_list],
            ["cell", "instances/s, median (min-max)", "runs"],
            markdown=True,
        ),
        "",
        table(
            [[n, cell(mbps.get(n, []), "{:.0f}"), str(len(mbps.get(n, [])))] for n in ("node", "orthanc")],
            ["WADO-RS series", "MB/s, median (min-max)", "retrievals"],
            markdown=True,
        ),
        "",
    ]
    for a, b, what in (
        ("node stow", "orthanc stow", "STOW-RS node/orthanc (instances/s)"),
        ("node stow", "node c-store", "node STOW-RS/C-STORE (instances/s)"),
        ("orthanc stow", "orthanc c-store", "orthanc STOW-RS/C-STORE (instances/s)"),
    ):
        r = ratio(rates.get(a, []), rates.get(b, []))
        lines.append(f"ratio {what}: {'n/a' if r is None else f'{r:.2f}'}")
    r = ratio(mbps.get("node", []), mbps.get("orthanc", []))
    lines.append(f"ratio WADO-RS node/orthanc (MB/s): {'n/a' if r is None else f'{r:.2f}'}")
    print()
    print(f"Command: {command}")
    print(
        f"Machine: {machine['nproc']} CPUs ({machine['cpu_model']}), {machine['memory']} RAM, Linux {machine['kernel']}, "
        f"{machine['workdir_fs']}, load average at start {machine['loadavg_1min_at_start']}"
    )
    print("Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(
        f"Data: {label}, {nbytes / 1e6:.1f} MB; STOW-RS: httpx, {args.batch or 'all'} instances per request, "
        f"{args.stow_streams} in flight; WADO-RS: {args.wado_repeat} retrievals per STOW cell; {args.repeat} repetition(s)"
    )
    print()
    print("\n".join(lines))
    for p in res.problems:
        print(f"!!!!! {p}")
    if args.json:
        out = {
            "command": command,
            "machine": machine,
            "versions": versions,
            "data": {"label": label, "instances": len(files), "bytes": nbytes},
            "servers": {
                "node": "python -m node run (SQLite in data_dir, defaults; [web] with a token)",
                "orthanc": "Orthanc via node.demo.peers.Orthanc(dicomweb=True): orthanc_config() defaults, plugin "
                + str(find_dicomweb_plugin()),
            },
            "settings": {k: getattr(args, k) for k in ("repeat", "batch", "stow_streams", "wado_repeat", "cell_list")},
            "results": asdict(res),
            "tables": lines,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 1 if res.problems else 0


if __name__ == "__main__":
    sys.exit(main())
