"""The peers the demo, the tests and the benchmarks start: a node, a private Orthanc and a synthetic CT series.

One place for each, so that the demo's PACS, the tests' PACS and the benchmarks' inputs cannot drift apart:
the Orthanc configuration (loopback HTTP, C-STORE only from known AE titles), how its readiness is
checked, and what a synthetic CT holds. It lives in the package (not under tests/) because
``dicom-node demo`` uses it on an installed node.

    with Orthanc(tmp_path / "orthanc") as pacs:
        files = make_ct_series(tmp_path / "ct", 10)
        ...  # send files to pacs.dicom_port, then pacs.has_instance(uid)
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from node.demo.procs import child_preexec
from node.dicom.dimse import VERIFICATION

ORTHANC_PATHS = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")
#: Where Debian's orthanc-dicomweb package (and Orthanc's own builds) put the DICOMweb plugin.
DICOMWEB_PLUGIN_PATHS = (
    "/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
    "/usr/lib/orthanc/libOrthancDicomWeb.so",
    "/usr/local/share/orthanc/plugins/libOrthancDicomWeb.so",
)


class PeerError(RuntimeError):
    """A peer could not be started; the message says what happened and where its log is."""


def free_port() -> int:
    """A TCP port nobody listens on right now (on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def terminate(proc: subprocess.Popen[bytes] | None, timeout: float) -> int | None:
    """Stop a peer: SIGTERM, up to ``timeout`` s to finish, then SIGKILL; its exit code (None: never started)."""
    if proc is None or proc.poll() is not None:
        return proc.returncode if proc else None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait(10)


def peer_env() -> dict[str, str]:
    """The environment for DCMTK-based peers: their acceptor waits ~40 ms per message (Nagle and
    delayed ACK) without TCP_NODELAY."""
    return {**os.environ, "TCP_NODELAY": "1"}


def find_orthanc() -> str | None:
    """Orthanc's binary (Debian's package first), or None when it is not installed."""
    for p in ORTHANC_PATHS:
        if Path(p).is_file() and os.access(p, os.X_OK):
            return p
    return shutil.which("Orthanc")


def find_dicomweb_plugin() -> str | None:
    """Orthanc's DICOMweb plugin (``orthanc-dicomweb``), or None when it is not installed."""
    return next((p for p in DICOMWEB_PLUGIN_PATHS if Path(p).is_file()), None)


def orthanc_config(
    root: Path,
    *,
    name: str,
    ae_title: str,
    dicom_port: int,
    http_port: int,
    modalities: dict[str, list[Any]],
    unknown_sop_class_accepted: bool = True,
    dicomweb_plugin: str | None = None,
    dicomweb_servers: dict[str, dict[str, Any]] | None = None,
    users: dict[str, str] | None = None,
) -> dict[str, Any]:
    """A private Orthanc on loopback (the demo's PACS, the tests' PACS): storage under ``root``, plain DICOM
    files, HTTP for this host only, and C-STORE only from ``modalities`` ({name: [AE, host, port]}).

    ``dicomweb_plugin``: load the DICOMweb plugin from this path, serving ``/dicom-web/`` (STOW-RS, QIDO-RS,
    WADO-RS) and calling ``dicomweb_servers`` ({name: {Url, Username, Password, HttpHeaders}}) as a client.
    ``users`` ({user: password}): HTTP basic authentication is required on every request.
    """
    config: dict[str, Any] = {
        "Name": name,
        "StorageDirectory": str(root / "storage"),
        "IndexDirectory": str(root / "index"),
        # Plain DICOM files on disk: what arrived can be read back with any DICOM tool.
        "StorageCompression": False,
        "Plugins": [],
        "HttpServerEnabled": True,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "SslEnabled": False,
        "DicomServerEnabled": True,
        "DicomAet": ae_title,
        "DicomPort": dicom_port,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": False,
        "DicomCheckModalityHost": True,
        "DicomModalities": modalities,
        "UnknownSopClassAccepted": unknown_sop_class_accepted,
        "DicomScpTimeout": 30,
        "StableAge": 1,
        "SaveJobs": False,
        "HttpDescribeErrors": True,
    }
    if dicomweb_plugin:
        config["Plugins"] = [dicomweb_plugin]
        config["DicomWeb"] = {
            "Enable": True,
            "Root": "/dicom-web/",
            "EnableWado": True,
            "Ssl": False,
            "Servers": dict(dicomweb_servers or {}),
        }
    if users:
        config["AuthenticationEnabled"] = True
        config["RegisteredUsers"] = dict(users)
    return config


@dataclass
class Orthanc:
    """One Orthanc in its own folder (config, storage, index, logs); ``start()`` returns once DICOM and HTTP
    both answer.

    Orthanc 1.10 cannot bind its DICOM port to loopback only, so C-STORE is limited to the AE titles of
    ``senders`` calling from 127.0.0.1 (``DicomAlwaysAllowStore`` false, ``DicomCheckModalityHost`` true).
    """

    root: Path
    aet: str = "ORTHANC"
    #: Calling AE titles allowed to C-STORE (from 127.0.0.1).
    senders: tuple[str, ...] = ("STORESCU", "DICOM_NODE")
    dicom_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    #: Orthanc's DCMTK may not know every newer storage SOP class (e.g. Label Map Segmentation, 2024).
    unknown_sop_class_accepted: bool = True
    #: DICOM ports of senders Orthanc calls back (Storage Commitment results); others get 104.
    sender_ports: dict[str, int] = field(default_factory=dict)
    #: Orthanc's name (default: "dicom-node tests <aet>").
    name: str = ""
    #: The binary; found with find_orthanc() when empty.
    binary: str = ""
    #: Own session, and SIGTERM when the starting process dies (the demo: nothing outlives it).
    detached: bool = False
    #: Load the DICOMweb plugin (``orthanc-dicomweb``): Orthanc serves STOW-RS/QIDO-RS/WADO-RS at ``dicomweb_url``.
    dicomweb: bool = False
    #: DICOMweb servers Orthanc's plugin can call: {name: {"Url": ..., "Username": ..., "Password": ...,
    #: "HttpHeaders": {...}}} (``/dicom-web/servers/<name>/...``); needs ``dicomweb``.
    dicomweb_servers: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: {user: password}: Orthanc requires HTTP basic authentication (REST and DICOMweb); this object's own
    #: REST calls use the first user.
    users: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def verbose_log_path(self) -> Path:
        return self.root / "orthanc-verbose.log"

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def dicomweb_url(self) -> str:
        """The DICOMweb base URL (with ``dicomweb``): what a ``type = "dicomweb"`` destination's ``url`` is."""
        return f"{self.url}/dicom-web"

    def config(self) -> dict[str, Any]:
        modalities = {ae.lower(): [ae, "127.0.0.1", self.sender_ports.get(ae, 104)] for ae in self.senders}
        plugin = None
        if self.dicomweb:
            plugin = find_dicomweb_plugin()
            if plugin is None:
                raise PeerError(
                    "Orthanc's DICOMweb plugin is not installed (e.g. apt-get install orthanc-dicomweb); looked in "
                    + ", ".join(DICOMWEB_PLUGIN_PATHS)
                )
        elif self.dicomweb_servers:
            raise PeerError("dicomweb_servers needs dicomweb=True (the servers are the DICOMweb plugin's)")
        return orthanc_config(
            self.root,
            name=self.name or f"dicom-node tests {self.aet}",
            ae_title=self.aet,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            modalities=modalities,
            unknown_sop_class_accepted=self.unknown_sop_class_accepted,
            dicomweb_plugin=plugin,
            dicomweb_servers=self.dicomweb_servers,
            users=self.users,
        )

    def start(self, timeout: float = 30.0, port_attempts: int = 3) -> Orthanc:
        """Start it; a port another process took since it was picked (free_port) is picked again."""
        for attempt in range(1, port_attempts + 1):
            try:
                return self._start(timeout)
            except PeerError as e:
                if "already in use" not in str(e) or attempt == port_attempts:
                    raise
                self.dicom_port, self.http_port = free_port(), free_port()
        raise AssertionError("unreachable")

    def _start(self, timeout: float) -> Orthanc:
        binary = self.binary or find_orthanc()
        if binary is None:
            raise PeerError("Orthanc is not installed (e.g. apt-get install orthanc)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [binary, f"--logfile={self.verbose_log_path}", str(self.config_path)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=peer_env(),
                start_new_session=self.detached,
                preexec_fn=child_preexec if self.detached else None,
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise PeerError(
                    f"Orthanc exited with status {self.proc.returncode} while starting; see {self.log_path}:\n"
                    f"{self.log()[-3000:]}"
                )
            try:
                self.get("/system", timeout=2)
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                    return
            except (OSError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.1)
        raise PeerError(
            f"Orthanc did not answer on HTTP port {self.http_port} and DICOM port {self.dicom_port} within "
            f"{timeout:g} s ({last}); see {self.log_path}:\n{self.log()[-3000:]}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int | None:
        return terminate(self.proc, timeout)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return "".join(p.read_text(errors="replace") for p in (self.log_path, self.verbose_log_path) if p.exists())

    # -- REST ------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if self.users:
            user, password = next(iter(self.users.items()))
            req.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
        with urllib.request.urlopen(req, timeout=timeout) as rsp:
            raw = rsp.read()
            if "json" in rsp.headers.get("Content-Type", ""):
                return json.loads(raw)
            return raw

    def get(self, path: str, timeout: float = 30.0) -> Any:
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body: Any, timeout: float = 30.0) -> Any:
        return self.request("POST", path, body, timeout=timeout)

    def instances(self) -> list[str]:
        """Orthanc's identifiers of every stored instance."""
        return list(self.get("/instances"))

    def find_instance(self, sop_instance_uid: str) -> str | None:
        """Orthanc's identifier of the instance with this SOP Instance UID, if stored."""
        found = self.post("/tools/find", {"Level": "Instance", "Query": {"SOPInstanceUID": sop_instance_uid}})
        return str(found[0]) if found else None

    def has_instance(self, sop_instance_uid: str) -> bool:
        return self.find_instance(sop_instance_uid) is not None

    def tags(self, sop_instance_uid: str) -> dict[str, Any]:
        """The stored instance's main tags (``/instances/{id}/simplified-tags``)."""
        oid = self.find_instance(sop_instance_uid)
        if oid is None:
            raise KeyError(sop_instance_uid)
        return dict(self.get(f"/instances/{oid}/simplified-tags"))

    def file(self, sop_instance_uid: str) -> bytes:
        """The stored DICOM file, as Orthanc keeps it."""
        oid = self.find_instance(sop_instance_uid)
        if oid is None:
            raise KeyError(sop_instance_uid)
        return bytes(self.get(f"/instances/{oid}/file"))

    def count(self) -> int:
        """How many instances Orthanc holds."""
        return int(self.get("/statistics")["CountInstances"])

    def new_instance_events(self) -> int:
        """How many times an instance was stored as new (a re-sent copy of a stored one is not new)."""
        changes = self.get("/changes?limit=100000")["Changes"]
        return sum(1 for c in changes if c["ChangeType"] == "NewInstance")

    def destination(self, name: str = "orthanc", **extra: str) -> str:
        """A [[destinations]] table for the node's config; ``extra`` values are TOML as written."""
        more = "".join(f"{k} = {v}\n" for k, v in extra.items())
        return (
            f'[[destinations]]\nname = "{name}"\nae_title = "{self.aet}"\nhost = "127.0.0.1"\n'
            f"port = {self.dicom_port}\n{more}"
        )

    def dicomweb_destination(self, name: str = "orthanc-web", **extra: str) -> str:
        """A ``type = "dicomweb"`` [[destinations]] table (STOW-RS to ``dicomweb_url``); ``extra`` is TOML as written."""
        more = "".join(f"{k} = {v}\n" for k, v in extra.items())
        return f'[[destinations]]\nname = "{name}"\ntype = "dicomweb"\nurl = "{self.dicomweb_url}"\n{more}'


@dataclass
class NodeRun:
    """``python -m node run --config FILE`` in a subprocess: started, ready once it answers C-ECHO, stopped.

    The one way the demo, the tests and the benchmarks run a node, so their start-up checks and shutdown
    (SIGTERM, a bounded wait, then SIGKILL) cannot drift apart; each keeps its own config and narration.
    """

    config: Path
    port: int
    log_path: Path
    ae_title: str = "DICOM_NODE"
    #: The AE title the readiness C-ECHO calls from.
    calling_ae: str = "ECHOSCU"
    cwd: Path | None = None
    #: The node's environment (default: this process's).
    env: dict[str, str] | None = None
    #: More Popen arguments (preexec_fn, start_new_session...).
    popen: dict[str, Any] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def command(config: Path) -> list[str]:
        """The command line that runs a node on ``config``."""
        return [sys.executable, "-m", "node", "run", "--config", str(config)]

    def start(self, timeout: float | None = 30.0) -> NodeRun:
        """Start the node; unless ``timeout`` is None, wait that long for C-ECHO (else stop it, PeerError)."""
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(self.config),
                cwd=self.cwd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                **self.popen,
            )
        if timeout is not None:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.stop()
                raise
        return self

    def answers_echo(self) -> bool:
        """True when the node answers C-ECHO, or refuses the association (an allowlist may refuse us)."""
        from node.send.requestor import Rejected
        from node.send.scu import Peer

        peer = Peer("127.0.0.1", self.port, called_ae=self.ae_title, calling_ae=self.calling_ae, timeout=2.0)
        try:
            assoc = peer.associate([(VERIFICATION, ["1.2.840.10008.1.2"])])  # Implicit VR Little Endian
        except Rejected:
            return True
        except Exception:  # not listening yet, or the association broke: still starting
            return False
        try:
            return bool(assoc.accepted.contexts) and not assoc.echo(next(iter(assoc.accepted.contexts))).status
        except Exception:
            return False
        finally:
            with contextlib.suppress(Exception):
                assoc.release()

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Return once the node answers C-ECHO; PeerError (with the end of its log) if it exits or is late."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise PeerError(
                    f"the node exited with status {self.proc.returncode} while starting; see {self.log_path}:\n"
                    f"{self.log()[-3000:]}"
                )
            if self.answers_echo():
                return
            if time.monotonic() > deadline:
                raise PeerError(
                    f"the node did not answer C-ECHO on port {self.port} within {timeout:g} s; see "
                    f"{self.log_path}:\n{self.log()[-3000:]}"
                )
            time.sleep(0.2)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30.0) -> int | None:
        """SIGTERM, wait up to ``timeout`` s for the node to finish what it holds, then SIGKILL; the exit code."""
        return terminate(self.proc, timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


#: Pixel values of one slice, given its index (stored values, int16 or uint16).
SlicePixels = Callable[[int], NDArray[Any]]


def make_ct_series(
    out: Path,
    count: int,
    rows: int = 64,
    cols: int = 64,
    *,
    seed: int = 0,
    study_uid: str | None = None,
    series_uid: str | None = None,
    patient_name: str = "TEST^SYNTHETIC",
    patient_id: str = "SYN-0001",
    images_in_acquisition: int | None = None,
    pixels: SlicePixels | None = None,
    spacing: Sequence[float] = (0.5, 0.5),
    slice_step: float = 2.5,
    extra: dict[str, Any] | None = None,
) -> list[Path]:
    """A CT series with real geometry (one slice every ``slice_step`` mm), as Explicit VR Little Endian files
    ``out/0001.dcm``...; returned in slice order.

    ``pixels`` gives each slice's stored values (default: seeded noise, signed 16-bit, rescaled to HU);
    unsigned values are stored as 12 bits in 16 (pixel representation 0). ``extra`` sets or overrides
    attributes by keyword.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)

    def noise(_: int) -> NDArray[Any]:
        return rng.integers(-1000, 2000, size=(rows, cols), dtype=np.int16)

    slice_pixels = pixels or noise
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_uid = generate_uid()
    paths = []
    for i in range(count):
        values = slice_pixels(i)
        signed = values.dtype.kind == "i"
        ds = Dataset()
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = generate_uid()
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = "19700101"
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20260101"
        ds.StudyTime = "120000"
        ds.AccessionNumber = "ACC0001"
        ds.StudyID = "1"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = "synthetic study"
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = 1
        ds.SeriesDescription = "synthetic CT"
        ds.Modality = "CT"
        ds.BodyPartExamined = "HEAD"
        ds.Manufacturer = "dicom-node tests"
        ds.FrameOfReferenceUID = frame_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-100.0, -100.0, float(i) * slice_step]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [round(v, 6) for v in spacing]  # a DS holds 16 characters
        ds.SliceThickness = abs(slice_step)
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        if images_in_acquisition is not None:
            ds.ImagesInAcquisition = images_in_acquisition
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = rows
        ds.Columns = cols
        ds.BitsAllocated = 16
        ds.BitsStored = 16 if signed else 12
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if signed else 0
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.PixelData = values.astype("<i2" if signed else "<u2").tobytes()
        for keyword, value in (extra or {}).items():
            setattr(ds, keyword, value)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta = meta
        p = out / f"{i + 1:04d}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths
