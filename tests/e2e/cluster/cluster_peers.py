"""Several ``dicom-node run`` processes on one index and one data directory (issue 16, scale-out).

The cluster tests start real node processes (each with its own DICOM and web port and its own config
and log) that share one PostgreSQL database (or one SQLite file) and one data directory, send with DCMTK
storescu, and forward to a DCMTK storescp that keeps every copy it receives (``+uf``), so that a SOP
Instance UID sent twice shows up as two files. What the tests assert is read from the shared index and
from what the destination received, never from the node's logs.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pydicom
import pytest
from helpers import PEER_ENV, TEST_PLUGINS, NodeProcess, StoreSCP, dcmtk, free_port, storescu, wait_for, wait_for_echo
from sqlalchemy import Engine, create_engine, text

#: Every test here starts three node processes and more peers: its module puts it in this xdist group, so
#: that they run one after another in one worker and one test's nodes do not compete with another's.
CLUSTER_GROUP = pytest.mark.xdist_group("cluster")

T = TypeVar("T")
HERE = Path(__file__).resolve().parent


@dataclass
class ClusterNode(NodeProcess):
    """A node process whose data directory is the cluster's, not one of its own (config and log stay its own)."""

    shared_dir: Path = Path()

    @property
    def data_dir(self) -> Path:  # type: ignore[override]
        return self.shared_dir


@dataclass
class Cluster:
    """``count`` node processes on one database URL (empty: SQLite in the shared data directory)."""

    root: Path
    url: str
    count: int = 3
    extra_config: str = ""
    env: dict[str, str] = field(default_factory=dict)
    nodes: list[ClusterNode] = field(default_factory=list)
    _engine: Engine | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    def make(self) -> None:
        env = {
            # The test plugins (cluster_plugins, faulty_plugins) importable by the nodes and their plugin processes.
            "PYTHONPATH": os.pathsep.join(
                [str(HERE), str(TEST_PLUGINS), *filter(None, [os.environ.get("PYTHONPATH")])]
            ),
            **({"DICOM_NODE_DATABASE__URL": self.url} if self.url else {}),
            **self.env,
        }
        self.nodes = [
            ClusterNode(self.root / f"node{i}", extra_config=self.extra_config, env=env, shared_dir=self.data_dir)
            for i in range(self.count)
        ]

    def add_node(self, timeout: float = 60.0) -> ClusterNode:
        """One more node process like the others, started and answering C-ECHO."""
        first = self.nodes[0]
        n = ClusterNode(
            self.root / f"node{len(self.nodes)}",
            extra_config=first.extra_config,
            env=first.env,
            shared_dir=self.data_dir,
        )
        self.nodes.append(n)
        n.start(wait=False)
        assert n.run is not None
        n.run.wait_ready(timeout)
        return n

    def start(self, timeout: float = 60.0) -> Cluster:
        """Start every node at the same time, then wait until each answers C-ECHO."""
        if not self.nodes:
            self.make()
        for n in self.nodes:
            n.start(wait=False)
        for n in self.nodes:
            assert n.run is not None
            n.run.wait_ready(timeout)
        return self

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            self._engine = create_engine(self.url or f"sqlite:///{self.data_dir / 'index.sqlite'}")
        return self._engine

    def rows(self, sql: str, **params: Any) -> list[tuple[Any, ...]]:
        with self.engine.connect() as c:
            return [tuple(r) for r in c.execute(text(sql), params).all()]

    def value(self, sql: str, **params: Any) -> Any:
        with self.engine.connect() as c:
            return c.execute(text(sql), params).scalar()

    def process_id(self, n: ClusterNode) -> str:
        """The ``node_process`` id the running process ``n`` registered under (found by its pid)."""
        assert n.proc is not None
        pid = n.proc.pid
        return str(
            wait_for(
                lambda: self.value("select id from node_process where pid = :p and stopped_at is null", p=pid),
                20,
                f"node process {pid} to register",
            )
        )

    def stop(self) -> list[str]:
        """Stop every node; the problems found in their logs and exit codes."""
        problems = []
        codes: dict[int, int | None] = {}

        def stop(i: int, n: ClusterNode) -> None:
            codes[i] = n.stop()

        # All at once: each may take seconds to finish what it holds.
        threads = [threading.Thread(target=stop, args=(i, n)) for i, n in enumerate(self.nodes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i, n in enumerate(self.nodes):
            code = codes.get(i)
            log = n.log()
            if "Traceback" in log:
                problems.append(f"{n.root.name} logged a traceback:\n{log[-4000:]}")
            if code not in (0, -9, None):
                problems.append(f"{n.root.name} exited with {code}:\n{log[-4000:]}")
        if self._engine is not None:
            self._engine.dispose()
        return problems


@dataclass
class CountingSCP(StoreSCP):
    """DCMTK storescp keeping every copy it receives (``+uf``: unique file names), so resends can be counted;
    ``--fork``: a process per association, as a PACS takes several nodes' associations at once."""

    def start(self) -> CountingSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "--fork", "+uf", "-aet", self.ae_title, "-od", str(self.out), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=PEER_ENV,
        )
        wait_for_echo(self.port, self.ae_title, proc=self.proc)
        return self

    def copies(self) -> Counter[str]:
        """How many copies of each SOP Instance UID arrived."""
        return Counter(
            str(pydicom.dcmread(p, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            for p in self.received()
        )


class GatedProxy:
    """A TCP relay to a peer that holds every connection until :meth:`open` (a destination that hangs).

    While closed it accepts connections and reads nothing from them, so a node's association waits there
    (its deliveries stay ``sending``); once opened, every held and new connection is relayed both ways.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = free_port()
        self._gate = threading.Event()
        self._stopped = threading.Event()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._server.settimeout(0.2)
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self) -> None:
        self._gate.set()

    def stop(self) -> None:
        self._stopped.set()
        self._gate.set()
        self._server.close()
        with self._lock:
            for s in self._sockets:
                _close(s)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._sockets.append(client)
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        self._gate.wait()
        if self._stopped.is_set():
            return
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:
            _close(client)
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets.append(upstream)
        threading.Thread(target=_pump, args=(upstream, client), daemon=True).start()
        _pump(client, upstream)


def _pump(src: socket.socket, dst: socket.socket) -> None:
    try:
        while data := src.recv(65536):
            dst.sendall(data)
    except OSError:
        pass
    finally:
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


_RESPONSE = re.compile(r"^I: Received Store Response \((.+?)\)", re.M)


@dataclass
class Sent:
    """One storescu run: its files and the C-STORE responses it got (storescu exits 0 even when the peer
    answered a failure status, so its responses are what tells a refusal)."""

    port: int
    files: list[Path]
    returncode: int
    responses: Counter[str]
    output: str

    @property
    def refused(self) -> int:
        """Files not answered Success (a failure status, or no answer at all)."""
        return len(self.files) - self.responses["Success"]


def send(port: int, files: list[Path], aet: str = "STORESCU") -> Sent:
    r = storescu(port, files, "-v", aet=aet)
    return Sent(port, files, r.returncode, Counter(_RESPONSE.findall(r.stderr)), r.stderr)


def send_concurrently(jobs: list[tuple[int, list[Path]]], aet: str = "STORESCU") -> list[Sent]:
    """One storescu per (port, files), all at the same time; their results in the same order."""
    results: list[Any] = [None] * len(jobs)

    def one(i: int, port: int, files: list[Path]) -> None:
        results[i] = send(port, files, aet=aet)

    threads = [threading.Thread(target=one, args=(i, p, f)) for i, (p, f) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def wait_until(probe: Callable[[], T], ok: Callable[[T], bool], timeout: float, what: str) -> T:
    """Poll ``probe`` until ``ok`` holds for its value (returned); on time-out, fail naming the last value seen."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if ok(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}; last seen: {value!r}")
        time.sleep(0.1)


def assert_stored(sent: list[Sent]) -> None:
    """Every file of every run answered Success; else an AssertionError saying what was refused."""
    bad = [s for s in sent if s.returncode or s.refused]
    assert not bad, "\n".join(
        f"storescu to port {s.port} (rc {s.returncode}): {s.refused} of {len(s.files)} not stored, responses {dict(s.responses)}\n"
        + "\n".join(line for line in s.output.splitlines() if not line.startswith("I: "))[-1500:]
        for s in bad
    )
