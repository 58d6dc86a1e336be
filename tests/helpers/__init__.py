"""Shared test helpers: real peers (DCMTK), a node in a subprocess, synthetic data."""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydicom

from node.demo.peers import NodeRun, peer_env

# One place for the peers the demo, the tests and the benchmarks start (re-exported for the tests).
from node.demo.peers import free_port as free_port
from node.demo.peers import make_ct_series as make_ct_series

REPO = Path(__file__).resolve().parents[2]
SHARED = REPO.parent / "shared" / "data"
if not SHARED.is_dir():  # CI: shared/ beside the clone
    SHARED = Path(os.environ.get("DICOM_NODE_SHARED_DATA", "/work/shared/data"))

#: The test plugins (faulty_plugins.py, env_plugins.py), importable by a node given this folder on PYTHONPATH.
TEST_PLUGINS = REPO / "tests" / "plugins"
#: The command plugins' test scripts (their templated metainfo.json is in TEST_PLUGINS, beside faulty_plugins.py).
COMMAND_PLUGINS = REPO / "tests" / "data" / "command-plugins"

#: DCMTK acceptors stall ~40 ms per message without TCP_NODELAY (Nagle + delayed ACK).
PEER_ENV = peer_env()


def dcmtk(tool: str) -> str:
    """The Debian DCMTK binary (a pyenv shim of the same name may shadow it on PATH)."""
    for d in ("/usr/bin", "/bin", "/usr/local/bin"):
        p = Path(d) / tool
        if p.is_file() and os.access(p, os.X_OK):
            return str(p)
    raise FileNotFoundError(f"DCMTK tool {tool} is not installed (apt-get install dcmtk)")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll ``predicate`` until it returns something truthy (returned), for at most ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def alive_cmdline(proc: Any) -> str | None:
    """The command line of a ``psutil.Process`` that still runs (not a zombie), else None.

    A process may end between being listed and being asked (more so with tests running in parallel):
    that counts as ended, never as an error.
    """
    import psutil

    try:
        if proc.status() == psutil.STATUS_ZOMBIE:
            return None
        return " ".join(proc.cmdline())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None


def wait_for_echo(
    port: int, ae: str = "DICOM_NODE", timeout: float = 30.0, proc: subprocess.Popen | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before answering C-ECHO")
        r = subprocess.run(
            [dcmtk("echoscu"), "-to", "2", "-aec", ae, "127.0.0.1", str(port)],
            capture_output=True,
            env=PEER_ENV,
            text=True,
        )
        if r.returncode == 0 or "Association Rejected" in r.stderr:  # answering (an allowlist may refuse us)
            return
        time.sleep(0.2)
    raise TimeoutError(f"nothing answered C-ECHO on port {port} within {timeout} s")


@dataclass
class NodeProcess:
    """``dicom-node run`` in a subprocess, as an administrator would start it."""

    root: Path
    extra_config: str = ""
    port: int = field(default_factory=free_port)
    #: The dashboard / REST API / metrics port.
    web_port: int = field(default_factory=free_port)
    ae_title: str = "DICOM_NODE"
    proc: subprocess.Popen | None = None
    env: dict[str, str] = field(default_factory=dict)
    #: The running node (started, readiness, stopping: node.demo.peers.NodeRun, shared with demo and benchmarks).
    run: NodeRun | None = None

    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def config_path(self) -> Path:
        return self.root / "node.toml"

    @property
    def log_path(self) -> Path:
        return self.root / "node.log"

    def write_config(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(
            f"""
[node]
ae_title = "{self.ae_title}"
host = "127.0.0.1"
port = {self.port}
data_dir = "{self.data_dir}"
min_free_mb = 0
{self.extra_config}
"""
        )

    def start(self, wait: bool = True) -> NodeProcess:
        self.write_config()
        self.run = NodeRun(
            self.config_path,
            self.port,
            self.log_path,
            ae_title=self.ae_title,
            cwd=REPO,
            env={**os.environ, "DICOM_NODE_WEB__PORT": str(self.web_port), **self.env},
        )
        self.run.start(timeout=30.0 if wait else None)
        self.proc = self.run.proc
        return self

    def stop(self, timeout: float = 30) -> int:
        return self.run.stop(timeout) if self.run else 0

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def db(self) -> sqlite3.Connection:
        return sqlite3.connect(self.data_dir / "index.sqlite")

    def query(self, sql: str, *args: Any) -> list[tuple]:
        with self.db() as c:
            return c.execute(sql, args).fetchall()

    def stored_files(self) -> list[Path]:
        return sorted((self.data_dir / "storage").rglob("*.dcm"))

    def deliveries(self) -> dict[str, int]:
        """{state: count} of the forward queue."""
        return dict(self.query("select state, count(*) from delivery group by state"))

    def wait_delivered(self, count: int | None = None, timeout: float = 60.0) -> dict[str, int]:
        """Wait until nothing is queued or being sent (and, if given, ``count`` are delivered)."""

        def done() -> bool:
            d = self.deliveries()
            if d.get("queued") or d.get("sending"):
                return False
            return count is None or d.get("delivered", 0) == count

        wait_for(done, timeout, f"deliveries to finish ({count} delivered)", interval=0.1)
        return self.deliveries()

    def temp_files(self, wait: float = 5.0) -> list[Path]:
        """What is left in tmp/, after giving association threads ``wait`` s to clean up.

        An association's thread tidies its temp directory just after sending
        A-RELEASE-RP, so a sender can exit a few milliseconds before that. Each
        node process's own temp directory (``tmp/<process>/``) is not a leftover.
        """
        deadline = time.monotonic() + wait
        tmp = self.data_dir / "tmp"
        while True:
            left = sorted(p for p in tmp.rglob("*") if not (p.parent == tmp and p.is_dir()))
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.05)


def storescu(
    port: int,
    files: list[Path] | list[str],
    *args: str,
    ae: str = "DICOM_NODE",
    aet: str = "STORESCU",
    timeout: float = 300,
) -> subprocess.CompletedProcess:
    """Send with DCMTK storescu, proposing only what the files need, not halting on failures."""
    cmd = [dcmtk("storescu"), "-nh", "-R", "-aet", aet, "-aec", ae, *args, "127.0.0.1", str(port), *map(str, files)]
    return subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=timeout)


def storescu_exact(
    port: int, files: list[Path], workdir: Path, *, ae: str, aet: str = "STORESCU", timeout: float = 300
) -> list[subprocess.CompletedProcess]:
    """Send with DCMTK storescu proposing exactly each file's (SOP class, transfer syntax), 400 files per run.

    A config profile (``-xf``) also lets storescu send SOP classes its DCMTK (3.6.7) does not know, such
    as Label Map Segmentation Storage, which ``-R`` alone would not.
    """
    metas = [pydicom.filereader.read_file_meta_info(f) for f in files]
    contexts = sorted({(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in metas})
    syntaxes = sorted({ts for _, ts in contexts})
    cfg = ["[[TransferSyntaxes]]"]
    cfg += [f"[TS{i}]\nTransferSyntax1 = {ts}" for i, ts in enumerate(syntaxes)]
    cfg += ["[[PresentationContexts]]", "[Contexts]"]
    cfg += [f"PresentationContext{i + 1} = {sop}\\TS{syntaxes.index(ts)}" for i, (sop, ts) in enumerate(contexts)]
    cfg += ["[[Profiles]]", "[Exact]", "PresentationContexts = Contexts"]
    config = workdir / "storescu-exact.cfg"
    config.write_text("\n".join(cfg) + "\n")
    return [
        subprocess.run(
            [
                dcmtk("storescu"),
                "-nh",
                "-xf",
                str(config),
                "Exact",
                "-aet",
                aet,
                "-aec",
                ae,
                "127.0.0.1",
                str(port),
                *map(str, files[k : k + 400]),
            ],
            capture_output=True,
            text=True,
            env=PEER_ENV,
            timeout=timeout,
        )
        for k in range(0, len(files), 400)
    ]


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta: what travels in the C-STORE data set."""
    raw = path.read_bytes()
    if raw[128:132] != b"DICM":
        return raw
    meta_len = int.from_bytes(raw[140:144], "little")
    return raw[144 + meta_len :]


def read_sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


# --- a raw C-STORE client -------------------------------------------------------
#
# DCMTK storescu (rightly) refuses to send many broken files; a node must
# still answer correctly when a less careful sender sends them. This client
# sends the data set bytes exactly as given, on the presentation context the
# test chooses, and returns what the SCP answered.


@dataclass
class RawStoreResult:
    context_accepted: bool
    status: int | None = None
    error_comment: str = ""
    association_rejected: bool = False


def raw_c_store(
    port: int,
    abstract_syntax: str,
    transfer_syntax: str,
    dataset: bytes,
    *,
    sop_class_uid: str | None = None,
    sop_instance_uid: str = "1.2.3.4",
    called_ae: str = "DICOM_NODE",
    calling_ae: str = "RAWSCU",
    fragment: int = 16000,
    timeout: float = 30,
) -> RawStoreResult:
    from node.dicom import association, dimse, pdu

    rq = association.build_request(
        calling_ae,
        called_ae,
        [(abstract_syntax, [transfer_syntax])],
        implementation_class_uid="1.2.826.0.1.3680043.10.1431.99",
        implementation_version_name=None,
        max_pdu=16384,
    )
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reader = pdu.PduReader(sock, 1 << 16)
        sock.sendall(rq.encode())
        kind, body = reader.read_pdu(pdu.MAX_CONTROL_PDU)
        if kind == pdu.PduType.A_ASSOCIATE_RJ:
            return RawStoreResult(False, association_rejected=True)
        accepted = association.read_accept(rq, pdu.AssociateAC.decode(body))
        if 1 not in accepted.contexts:
            sock.sendall(pdu.A_RELEASE_RQ)
            reader.read_pdu(pdu.MAX_CONTROL_PDU)
            return RawStoreResult(False)
        # The command as given (its SOP class may differ from the context's; the instance UID goes on the
        # wire as its Latin-1 bytes, even where the encoder would not write them), the data set as it is.
        uid, placeholder = sop_instance_uid.encode("latin-1"), b"8" * len(sop_instance_uid)
        command = dimse.encode_c_store_rq(1, sop_class_uid or abstract_syntax, placeholder.decode())
        sock.sendall(pdu.p_data(1, command.replace(placeholder, uid)))
        chunks = [dataset[i : i + fragment] for i in range(0, len(dataset), fragment)] or [b""]
        for i, chunk in enumerate(chunks):
            flags = pdu.Pdv.LAST if i == len(chunks) - 1 else pdu.Pdv.DATA
            sock.sendall(pdu.p_data(1, chunk, flags))
        kind, body = reader.read_pdu(pdu.MAX_CONTROL_PDU)
        if kind != pdu.PduType.P_DATA_TF:
            return RawStoreResult(True, None, f"PDU type {kind} instead of P-DATA")
        ((_cx, _header, command),) = pdu.iter_pdvs(body)  # one PDV holding the whole response command set
        rsp = dimse.decode_command(command)
        sock.sendall(pdu.A_RELEASE_RQ)
        try:
            reader.read_pdu(pdu.MAX_CONTROL_PDU)
        except pdu.PeerClosed:
            pass
        return RawStoreResult(True, rsp.status, rsp.error_comment)


def series_files(name: str) -> list[Path]:
    """The image files of a real series in shared/data/series (without its DICOMDIR)."""
    return sorted(p for p in (SHARED / "series" / name).iterdir() if p.is_file() and p.name != "DIRFILE")


@dataclass
class StoreSCP:
    """DCMTK ``storescp`` as a downstream peer: one file per received instance in ``out``."""

    out: Path
    ae_title: str = "STORESCP"
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    def start(self) -> StoreSCP:
        self.out.mkdir(parents=True, exist_ok=True)
        # Files are named <modality>.<SOP Instance UID>: a re-sent instance overwrites its file,
        # as a PACS keeps one copy per SOP Instance UID.
        self.proc = subprocess.Popen(
            [dcmtk("storescp"), "-aet", self.ae_title, "-od", str(self.out), str(self.port)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=PEER_ENV,
        )
        wait_for_echo(self.port, self.ae_title, proc=self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def received(self) -> list[Path]:
        return sorted(p for p in self.out.iterdir() if p.is_file())

    def destination(self, name: str = "scp", **extra: str) -> str:
        """A [[destinations]] table for the node's config; ``extra`` values are TOML as written."""
        more = "".join(f"{k} = {v}\n" for k, v in extra.items())
        return f'[[destinations]]\nname = "{name}"\nae_title = "{self.ae_title}"\nhost = "127.0.0.1"\nport = {self.port}\n{more}'


def make_cert(folder: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate (CN = name) and its key, for TLS tests: (key, certificate)."""
    key, cert = folder / f"{name}.key", folder / f"{name}.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "2",
            "-subj",
            f"/CN={name}",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return key, cert
