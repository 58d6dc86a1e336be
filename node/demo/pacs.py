"""The demo's downstream PACS: a private Orthanc when one is installed, else a small storage SCP of our own.

Both keep what they receive under the demo's data directory and can say what they hold, so the
demo can show that the SEG and SC really arrived (and a test can read the files afterwards).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from node.demo.peers import Orthanc, PeerError
from node.dicom.dimse import VERIFICATION

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


class OrthancPacs(Orthanc):
    """Orthanc as the demo's PACS (see node.demo.peers.Orthanc): C-STORE only from the node's AE title, which
    it also calls back for storage commitment; HTTP only from this host; nothing of it outlives the demo."""

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
        super().__init__(
            root,
            aet=ae_title,
            senders=(node_ae,),
            dicom_port=dicom_port,
            http_port=http_port,
            sender_ports={node_ae: node_port},
            name="dicom-node demo PACS",
            binary=binary,
            detached=True,
        )

    @property
    def explorer(self) -> str:
        return f"{self.url}/app/explorer.html"

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
            raise PeerError(f"the built-in storage SCP cannot listen on port {self.dicom_port}: {e}") from None

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
