"""A real Orthanc (the Debian package's /usr/sbin/Orthanc) as a peer PACS for tests.

Started with a temporary configuration: HTTP and DICOM on free ports, storage and
index in a temp folder, no plugins, no HTTP authentication but HTTP only from this
host (``RemoteAccessAllowed`` false). Orthanc 1.10 cannot bind its DICOM port to
loopback only, so C-STORE is limited to the AE titles of ``senders`` calling from
127.0.0.1 (``DicomAlwaysAllowStore`` false, ``DicomCheckModalityHost`` true).

    with Orthanc(tmp_path / "orthanc") as pacs:
        storescu(pacs.dicom_port, files, ae=pacs.aet)
        assert pacs.has_instance(sop_instance_uid)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from helpers import PEER_ENV, free_port
from node.demo.pacs import orthanc_config

ORTHANC = "/usr/sbin/Orthanc"


def orthanc_binary() -> str:
    if Path(ORTHANC).is_file() and os.access(ORTHANC, os.X_OK):
        return ORTHANC
    found = shutil.which("Orthanc")
    if found:
        return found
    raise FileNotFoundError("Orthanc is not installed (apt-get install orthanc)")


@dataclass
class Orthanc:
    """One Orthanc server in its own folder; ``start()`` waits until DICOM and HTTP both answer."""

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
    proc: subprocess.Popen | None = None

    @property
    def config_path(self) -> Path:
        return self.root / "orthanc.json"

    @property
    def log_path(self) -> Path:
        return self.root / "orthanc.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    def config(self) -> dict[str, Any]:
        modalities = {ae.lower(): [ae, "127.0.0.1", self.sender_ports.get(ae, 104)] for ae in self.senders}
        return orthanc_config(
            self.root,
            name=f"dicom-node tests {self.aet}",
            ae_title=self.aet,
            dicom_port=self.dicom_port,
            http_port=self.http_port,
            modalities=modalities,
            unknown_sop_class_accepted=self.unknown_sop_class_accepted,
        )

    def start(self, timeout: float = 30.0) -> Orthanc:
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(self.config(), indent=2))
        log = open(self.log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [orthanc_binary(), f"--logfile={self.log_path}.verbose", str(self.config_path)],
                cwd=self.root,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=PEER_ENV,
            )
        finally:
            log.close()
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
                raise RuntimeError(f"Orthanc exited with {self.proc.returncode} while starting:\n{self.log()[-3000:]}")
            try:
                self.get("/system", timeout=2)
                with socket.create_connection(("127.0.0.1", self.dicom_port), timeout=2):
                    return
            except (OSError, urllib.error.URLError) as e:
                last = e
            time.sleep(0.1)
        raise TimeoutError(
            f"Orthanc did not answer on HTTP {self.http_port} / DICOM {self.dicom_port} within "
            f"{timeout} s ({last}):\n{self.log()[-3000:]}"
        )

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)

    def __enter__(self) -> Orthanc:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log(self) -> str:
        return "".join(
            p.read_text(errors="replace") for p in (self.log_path, Path(f"{self.log_path}.verbose")) if p.exists()
        )

    # -- REST ------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, timeout: float = 30.0) -> Any:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
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
        return found[0] if found else None

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
