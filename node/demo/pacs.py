"""The demo's downstream PACS: a private Orthanc when one is installed, else a small storage SCP of our own.

Both keep what they receive under the demo's data directory and can say what they hold, so the
demo can show that the SEG and SC really arrived (and a test can read the files afterwards).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

from node.demo.procs import child_preexec

VERIFICATION = "1.2.840.10008.1.1"  # the Verification SOP Class (C-ECHO)
ORTHANC_PATHS = ("/usr/sbin/Orthanc", "/usr/bin/Orthanc", "/usr/local/bin/Orthanc")

#: Short names for the SOP classes the demo deals with (others are shown by pydicom's name).
SHORT_NAMES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT",
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",
    "1.2.840.10008.5.1.4.1.1.7": "SC",
    "1.2.840.10008.5.1.4.1.1.7.1": "SC",
    "1.2.840.10008.5.1.4.1.1.7.2": "SC",
    "1.2.840.10008.5.1.4.1.1.7.3": "SC",
    "1.2.840.10008.5.1.4.1.1.7.4": "SC",
}


def short_name(sop_class: str) -> str:
    if sop_class in SHORT_NAMES:
        return SHORT_NAMES[sop_class]
    from pydicom.uid import UID

    return UID(sop_class).name


def free_port() -> int:
    """A TCP port nobody listens on right now (on loopback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_orthanc() -> str | None:
    for p in ORTHANC_PATHS:
        if Path(p).is_file() and os.access(p, os.X_OK):
            return p
    return shutil.which("Orthanc")


def orthanc_config(
    root: Path,
    *,
    name: str,
    ae_title: str,
    dicom_port: int,
    http_port: int,
    modalities: dict[str, list[Any]],
    unknown_sop_class_accepted: bool = True,
) -> dict[str, Any]:
    """A private Orthanc on loopback (the demo's PACS, the tests' PACS): storage under ``root``, plain DICOM
    files, HTTP for this host only, and C-STORE only from ``modalities`` ({name: [AE, host, port]})."""
    return {
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


class PacsError(RuntimeError):
    pass


class OrthancPacs:
    """Orthanc in ``root``: its config, storage, index and log; HTTP only from this host.

    Orthanc binds its DICOM port on every interface (it has no setting for loopback), so C-STORE
    is limited to the node's AE title calling from 127.0.0.1.
    """

    kind = "orthanc"
    label = "Orthanc"

    def __init__(
        self,
        root: Path,
        *,
        binary: str,
        dicom_port: int,
        http_port: int,
        node_ae: str,
        node_port: int,
        ae_title: str = "DEMO_PACS",
    ) -> None:
        self.root = root
        self.binary = binary
        self.dicom_port = dicom_port
        self.http_port = http_port
        self.ae_title = ae_title
        self.node_ae = node_ae
        self.node_port = node_port
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def storage(self) -> Path:
        return self.root / "storage"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def explorer(self) -> str:
        return f"{self.url}/app/explorer.html"

    def config(self) -> dict[str, Any]:
        return orthanc_config(
            self.root,
            name="dicom-node demo PACS",
            ae_title=self.ae_title,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            modalities={"dicom-node": [self.node_ae, "127.0.0.1", self.node_port]},
        )

    def start(self, timeout: float = 30.0) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        cfg = self.root / "orthanc.json"
        cfg.write_text(json.dumps(self.config(), indent=2))
        # DCMTK's acceptor waits ~40 ms per message for delayed ACKs without TCP_NODELAY.
        env = {**os.environ, "TCP_NODELAY": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, f"--logfile={self.root / 'orthanc-verbose.log'}", str(cfg)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                preexec_fn=child_preexec,
            )
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise PacsError(
                    f"Orthanc exited with status {self.proc.returncode} while starting; see {self.log_path}"
                )
            try:
                self.get("/system", timeout=2)
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                    return
            except (OSError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.1)
        self.stop()
        raise PacsError(
            f"Orthanc did not answer on HTTP port {self.http_port} and DICOM port {self.dicom_port} "
            f"within {timeout:g} s ({last}); see {self.log_path}"
        )

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout)

    def get(self, path: str, timeout: float = 10.0) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as rsp:
            return json.loads(rsp.read())

    def holds(self) -> Counter[str]:
        """SOP class UID -> instances, asked through Orthanc's REST API."""
        out: Counter[str] = Counter()
        for sid in self.get("/series"):
            series = self.get(f"/series/{sid}")
            instances = series.get("Instances") or []
            if not instances:
                continue
            tags = self.get(f"/instances/{instances[0]}/simplified-tags")
            out[str(tags.get("SOPClassUID", "?"))] += len(instances)
        return out

    def where(self) -> list[tuple[str, str]]:
        return [
            ("Orthanc Explorer", self.explorer),
            ("Orthanc's files", str(self.storage)),
            ("Orthanc's log", str(self.log_path)),
        ]


class BuiltinPacs:
    """A pynetdicom storage SCP in a thread of this process: one file per instance, as received.

    Files are ``<root>/received/<SOP Instance UID>.dcm``: the data set's bytes exactly as they
    arrived, behind a File Meta Information header. Nothing is decoded.
    """

    kind = "builtin"
    label = "built-in storage SCP"

    def __init__(self, root: Path, *, dicom_port: int, ae_title: str = "DEMO_PACS") -> None:
        self.root = root
        self.dicom_port = dicom_port
        self.ae_title = ae_title
        self.server: Any = None

    @property
    def storage(self) -> Path:
        return self.root / "received"

    @property
    def log_path(self) -> Path:
        return self.root / "scp.log"

    def start(self, timeout: float = 10.0) -> None:
        from pydicom.uid import ExplicitVRLittleEndian
        from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt

        self.storage.mkdir(parents=True, exist_ok=True)
        plog = logging.getLogger("pynetdicom")
        handler = logging.FileHandler(self.log_path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        plog.addHandler(handler)
        plog.setLevel(logging.INFO)
        plog.propagate = False

        store_dir = self.storage

        def on_store(event: evt.Event) -> int:
            uid = str(event.file_meta.MediaStorageSOPInstanceUID)  # the request's Affected SOP Instance UID
            if not uid or "/" in uid or uid.startswith("."):
                return 0xC000
            tmp = store_dir / f".{uid}.part"
            # Preamble, file meta information and the data set as received.
            tmp.write_bytes(event.encoded_dataset())
            tmp.replace(store_dir / f"{uid}.dcm")
            return 0x0000

        ae = AE(ae_title=self.ae_title)
        ae.maximum_pdu_size = 0
        # Explicit VR first: offered a choice, the SCP keeps the VRs rather than taking Implicit VR.
        syntaxes = [ExplicitVRLittleEndian] + [ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian]
        for cx in AllStoragePresentationContexts:
            if cx.abstract_syntax is not None:  # pynetdicom's predefined contexts all have one
                ae.add_supported_context(cx.abstract_syntax, syntaxes)
        ae.add_supported_context(VERIFICATION)
        try:
            self.server = ae.start_server(
                ("127.0.0.1", self.dicom_port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
            )
        except OSError as e:
            raise PacsError(f"the built-in storage SCP cannot listen on port {self.dicom_port}: {e}") from None

    def alive(self) -> bool:
        return self.server is not None

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def holds(self) -> Counter[str]:
        """SOP class UID -> instances, from the File Meta of the stored files."""
        from pydicom.filereader import read_file_meta_info

        out: Counter[str] = Counter()
        for p in sorted(self.storage.glob("*.dcm")):
            out[str(read_file_meta_info(p).MediaStorageSOPClassUID)] += 1
        return out

    def where(self) -> list[tuple[str, str]]:
        return [("received files", str(self.storage)), ("storage SCP log", str(self.log_path))]
