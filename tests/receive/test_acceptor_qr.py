"""The acceptor's Query/Retrieve transport, driven by real clients (DCMTK findscu, movescu, getscu; pynetdicom
where DCMTK cannot produce the case). The Q/R logic is a small test double: what is pinned here is the
transport (pending responses, finals, C-CANCEL, C-GET sub-operations with role selection, limits)."""

from __future__ import annotations

import logging
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pynetdicom import AE, build_role, evt
from pynetdicom.dsutils import encode
from pynetdicom.sop_class import (
    CTImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from node.dicom import association, dimse, pdu
from node.dicom.status import QRStatus
from node.receive import sop_classes
from node.receive.acceptor import Acceptor, AcceptorSettings, AssociationInfo, QRChannel, QRFinal
from tests.helpers import PEER_ENV, dataset_bytes, dcmtk, make_cert, read_sop_uid, series_files, wait_for

VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT, IMPLICIT, DEFLATED = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99"
CT = "1.2.840.10008.5.1.4.1.1.2"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT_SERIES = "ct-head-philips-5mm"


@dataclass
class Instance:
    path: Path
    sop_instance: str
    sop_class: str = CT
    transfer_syntax: str = EXPLICIT


@dataclass
class FakeQR:
    """A QRService test double: answers from a fixed list and records what it was asked."""

    matches: int = 3
    #: find: after this many matches, wait (bounded) for the requestor's C-CANCEL.
    wait_for_cancel_after: int | None = None
    instances: list[Instance] = field(default_factory=list)
    final: QRFinal | None = None
    asked: list[tuple[str, str, Dataset, str]] = field(default_factory=list)
    #: What each operation saw: "cancelled after N", "completed", or the exception that ended it.
    outcome: list[str] = field(default_factory=list)
    store_results: list[tuple[int, str]] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)

    def _wait_cancel(self, channel: QRChannel) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if channel.cancelled():
                return True
            time.sleep(0.01)
        return False

    def find(self, assoc: AssociationInfo, abstract: str, identifier: Dataset, channel: QRChannel) -> QRFinal:
        self.asked.append(("find", abstract, identifier, ""))
        try:
            if self.final is not None:
                return self.final
            for i in range(self.matches):
                if channel.cancelled():
                    self.outcome.append(f"cancelled after {i}")
                    return QRFinal(QRStatus.CANCEL)
                if i % 2:  # as node.qr answers: elements encoded by the acceptor, Unicode in ISO_IR 192
                    channel.pending(
                        [
                            (0x00080005, "CS", "ISO_IR 192"),
                            (0x00080052, "CS", str(identifier.QueryRetrieveLevel)),
                            (0x00100010, "PN", f"Döe^{i}"),
                            (0x00100020, "LO", f"P{i}"),
                        ]
                    )
                else:
                    ds = Dataset()
                    ds.QueryRetrieveLevel = identifier.QueryRetrieveLevel
                    ds.PatientID = f"P{i}"
                    ds.PatientName = f"Doe^{i}"
                    channel.pending(ds)
                if self.wait_for_cancel_after == i + 1 and self._wait_cancel(channel):
                    self.outcome.append(f"cancelled after {i + 1}")
                    return QRFinal(QRStatus.CANCEL)
            self.outcome.append("completed")
            return QRFinal(QRStatus.SUCCESS)
        except BaseException as e:
            self.outcome.append(type(e).__name__)
            raise
        finally:
            self.done.set()

    def move(
        self, assoc: AssociationInfo, abstract: str, identifier: Dataset, destination: str, channel: QRChannel
    ) -> QRFinal:
        self.asked.append(("move", abstract, identifier, destination))
        self.done.set()
        channel.pending(remaining=3, completed=0, failed=0, warning=0)
        channel.pending(remaining=1, completed=1, failed=1, warning=0)
        return self.final or QRFinal(QRStatus.SUCCESS, remaining=0, completed=3, failed=0, warning=0)

    def get(self, assoc: AssociationInfo, abstract: str, identifier: Dataset, channel: QRChannel) -> QRFinal:
        self.asked.append(("get", abstract, identifier, ""))
        try:
            completed, failed = 0, []
            for i, inst in enumerate(self.instances):
                if channel.cancelled():
                    self.outcome.append(f"cancelled after {i}")
                    return QRFinal(
                        QRStatus.CANCEL,
                        remaining=len(self.instances) - i,
                        completed=completed,
                        failed=len(failed),
                        warning=0,
                    )
                status, comment = channel.store(inst.path, inst.sop_class, inst.sop_instance, inst.transfer_syntax)
                self.store_results.append((status, comment))
                if status == 0:
                    completed += 1
                else:
                    failed.append(inst.sop_instance)
                channel.pending(
                    remaining=len(self.instances) - i - 1, completed=completed, failed=len(failed), warning=0
                )
            self.outcome.append("completed")
            if failed:
                status = QRStatus.SUBOPS_WARNING if completed else QRStatus.OUT_OF_RESOURCES_SUBOPS
                return QRFinal(
                    status,
                    f"{len(failed)} failed",
                    completed=completed,
                    failed=len(failed),
                    warning=0,
                    remaining=0,
                    failed_uids=tuple(failed),
                )
            return QRFinal(QRStatus.SUCCESS, remaining=0, completed=completed, failed=0, warning=0)
        except BaseException as e:
            self.outcome.append(type(e).__name__)
            raise
        finally:
            self.done.set()


class Handlers:
    def __init__(self) -> None:
        self.ended: list[str] = []
        self.stored: list[str] = []

    def check_association(self, calling_ae, called_ae, address):
        return None

    def store(self, assoc, request):
        self.stored.append(request.command.affected_sop_instance_uid)
        request.file.discard()
        return 0, ""

    def association_accepted(self, assoc):
        self.contexts = dict(assoc.contexts)

    def association_rejected(self, assoc, reason, text):
        pass

    def association_ended(self, assoc, how):
        self.ended.append(how)

    def event_report(self, assoc, command, transfer_syntax, data):
        return 0


def settings(tmp_path: Path, qr: bool) -> AcceptorSettings:
    little = frozenset({EXPLICIT, IMPLICIT})
    storage = frozenset({EXPLICIT, IMPLICIT, "1.2.840.10008.1.2.4.70"})
    supported = {VERIFICATION: little, CT: storage, SECONDARY_CAPTURE: storage}
    if qr:
        supported.update(dict.fromkeys(sop_classes.QR_CLASSES, little | {DEFLATED}))
    return AcceptorSettings(
        ae_title="NODE",
        max_pdu=16384,
        max_associations=4,
        acse_timeout=5,
        network_timeout=10,
        implementation_class_uid="1.2.3.9",
        implementation_version="TEST",
        supported=supported,
        receive_dir=tmp_path,
    )


@dataclass
class Running:
    acceptor: Acceptor
    qr: FakeQR
    handlers: Handlers

    @property
    def port(self) -> int:
        return self.acceptor.port


@pytest.fixture
def scp(tmp_path) -> Iterator[Running]:
    qr, handlers = FakeQR(), Handlers()
    a = Acceptor(settings(tmp_path, qr=True), handlers, "127.0.0.1", 0, qr)
    a.start()
    yield Running(a, qr, handlers)
    a.stop(1)


def run(tool: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [dcmtk(tool), *args], capture_output=True, text=True, env=PEER_ENV, timeout=timeout, check=False
    )


def wait_ended(handlers: Handlers, n: int = 1) -> list[str]:
    deadline = time.monotonic() + 10
    while len(handlers.ended) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return handlers.ended


# --- C-FIND ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "syntax, negotiated",
    [("-xe", EXPLICIT), ("-xi", IMPLICIT), ("-xd", DEFLATED)],
    ids=["explicit", "implicit", "deflated"],
)
def test_findscu_gets_every_match_and_the_final(scp, tmp_path, syntax, negotiated):
    scp.qr.matches = 40  # more than one PDU's worth of responses
    out = run(
        "findscu",
        syntax,
        "-aec",
        "NODE",
        "-P",
        "-k",
        "QueryRetrieveLevel=PATIENT",
        "-k",
        "PatientName=Do*",
        "-k",
        "PatientID",
        "-X",
        "-od",
        str(tmp_path),
        "127.0.0.1",
        str(scp.port),
    )
    assert out.returncode == 0, out.stderr
    assert scp.handlers.contexts == {1: (sop_classes.PATIENT_ROOT_FIND, negotiated)}
    files = sorted(tmp_path.glob("rsp*.dcm"))
    assert len(files) == 40
    assert [str(dcmread(f).PatientID) for f in files] == [f"P{i}" for i in range(40)]
    assert [str(dcmread(f).PatientName) for f in files[:2]] == ["Doe^0", "Döe^1"]
    ((kind, abstract, identifier, _),) = scp.qr.asked
    assert (kind, abstract) == ("find", sop_classes.PATIENT_ROOT_FIND)
    assert (identifier.QueryRetrieveLevel, str(identifier.PatientName)) == ("PATIENT", "Do*")
    assert scp.qr.outcome == ["completed"]
    assert wait_ended(scp.handlers) == ["released"]


def test_findscu_cancel_ends_the_find(scp, tmp_path):
    scp.qr.matches, scp.qr.wait_for_cancel_after = 10, 2
    out = run(
        "findscu",
        "-v",
        "-aec",
        "NODE",
        "-S",
        "--cancel",
        "2",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID",
        "127.0.0.1",
        str(scp.port),
    )
    assert out.returncode == 0, out.stderr
    assert scp.qr.outcome == ["cancelled after 2"]
    log = out.stdout + out.stderr
    assert log.count("Find Response:") == 2, log  # two matches ...
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in log  # ... then the final
    assert wait_ended(scp.handlers) == ["released"]


def test_a_failure_final_carries_offending_element_and_comment(scp):
    scp.qr.final = QRFinal(
        QRStatus.IDENTIFIER_DOES_NOT_MATCH, "NotAKeyword is not an attribute", offending=(0x00101234, 0x00080050)
    )
    ae = AE(ae_title="SCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = ""
    ((status, ident),) = list(assoc.send_c_find(q, PatientRootQueryRetrieveInformationModelFind))
    assoc.release()
    assert status.Status == 0xA900
    assert status.ErrorComment == "NotAKeyword is not an attribute"
    assert list(status.OffendingElement) == [Tag(0x00101234), Tag(0x00080050)]
    assert ident is None


def test_an_oversize_identifier_aborts_with_a_log_line(scp, caplog):
    ae = AE(ae_title="SCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    ae.maximum_pdu_size = 16384
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientComments = "x" * (1 << 20)  # 1 MiB + the rest: over the limit
    with caplog.at_level(logging.ERROR, logger="node.receive.acceptor"):
        responses = list(assoc.send_c_find(q, PatientRootQueryRetrieveInformationModelFind))
        assert wait_ended(scp.handlers) == ["aborted"]
    wait_for(lambda: not assoc.is_established, 10, "pynetdicom to see the abort")
    assert all(not s for s, _ in responses)  # no status: the association was aborted
    assert scp.qr.asked == []
    assert "C-FIND data set larger than 1 MiB; aborting" in caplog.text


def test_peer_abort_during_a_find_ends_the_association(scp):
    scp.qr.matches, scp.qr.wait_for_cancel_after = 5, 1
    ae = AE(ae_title="SCU")
    ae.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    responses = assoc.send_c_find(q, PatientRootQueryRetrieveInformationModelFind)
    status, _ = next(responses)
    assert status.Status == 0xFF00
    assoc.abort()
    assert scp.qr.done.wait(10)
    assert wait_ended(scp.handlers) == ["aborted"]
    assert scp.qr.outcome == ["_PeerAborted"]


def test_without_a_service_qr_contexts_are_refused_with_a_clear_log(tmp_path, caplog):
    a = Acceptor(settings(tmp_path, qr=False), Handlers(), "127.0.0.1", 0)
    a.start()
    try:
        with caplog.at_level(logging.INFO, logger="node.receive.acceptor"):
            out = run("findscu", "-aec", "NODE", "-S", "-k", "QueryRetrieveLevel=STUDY", "127.0.0.1", str(a.port))
    finally:
        a.stop(1)
    assert out.returncode != 0
    assert re.search(
        r"refused presentation context 1.2.840.10008.5.1.4.1.2.2.1 \(Study Root Query/Retrieve Information Model - "
        r"FIND\).*: not a storage service, and Query/Retrieve is not enabled on this node \(\[qr\] enabled = false\)",
        caplog.text,
    ), caplog.text


def test_store_and_echo_still_work_beside_qr(scp, shared_data):
    path = series_files(CT_SERIES)[0]
    out = run("storescu", "-aec", "NODE", "127.0.0.1", str(scp.port), str(path))
    assert out.returncode == 0, out.stderr
    assert scp.handlers.stored == [read_sop_uid(path)]
    assert run("echoscu", "-aec", "NODE", "127.0.0.1", str(scp.port)).returncode == 0


# --- C-MOVE ------------------------------------------------------------------------------------------


def test_movescu_reads_pending_counts_and_the_final(scp):
    scp.qr.final = QRFinal(
        QRStatus.SUBOPS_WARNING, "1 failed", remaining=0, completed=2, failed=1, warning=0, failed_uids=("1.2.3.4",)
    )
    out = run(
        "movescu",
        "-v",
        "-aec",
        "NODE",
        "-aem",
        "STORESCP",
        "-S",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        "StudyInstanceUID=1.2.3",
        "127.0.0.1",
        str(scp.port),
    )
    log = out.stdout + out.stderr
    assert out.returncode == 68, log  # DCMTK's exit code for a final warning
    ((kind, abstract, identifier, destination),) = scp.qr.asked
    assert (kind, abstract, destination) == ("move", sop_classes.STUDY_ROOT_MOVE, "STORESCP")
    assert identifier.StudyInstanceUID == "1.2.3"
    assert "Received Move Response 2 (Pending)" in log and "Move Response 3" not in log, log
    assert "Received Final Move Response (Warning: SubOperationsCompleteOneOrMoreFailures)" in log, log


def test_move_counts_and_failed_uid_list_as_pynetdicom_reads_them(scp):
    scp.qr.final = QRFinal(
        QRStatus.SUBOPS_WARNING, "1 failed", remaining=0, completed=2, failed=1, warning=0, failed_uids=("1.2.3.4",)
    )
    ae = AE(ae_title="SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove, [IMPLICIT])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = "1.2.3"
    responses = list(assoc.send_c_move(q, "STORESCP", StudyRootQueryRetrieveInformationModelMove))
    assoc.release()
    counts = [
        (
            s.Status,
            s.NumberOfRemainingSuboperations,
            s.NumberOfCompletedSuboperations,
            s.NumberOfFailedSuboperations,
        )
        for s, _ in responses
    ]
    assert counts == [(0xFF00, 3, 0, 0), (0xFF00, 1, 1, 1), (0xB000, 0, 2, 1)]
    final_status, final_identifier = responses[-1]
    assert final_status.ErrorComment == "1 failed"
    assert final_identifier.FailedSOPInstanceUIDList == "1.2.3.4"


def test_a_failed_uid_list_over_64_kib_is_cut_to_what_fits_and_the_counts_stay_true(scp, caplog):
    """A longer UI value would go out as UN in Explicit VR, which requestors do not read as the list."""
    uids = tuple(f"1.2.826.0.1.3680043.8.498.{10**20 + i}" for i in range(3000))
    scp.qr.final = QRFinal(
        QRStatus.OUT_OF_RESOURCES_SUBOPS,
        "none sent",
        remaining=0,
        completed=0,
        failed=3000,
        warning=0,
        failed_uids=uids,
    )
    ae = AE(ae_title="SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelMove, [EXPLICIT])
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = "1.2.3"
    with caplog.at_level(logging.WARNING, logger="node.receive.acceptor"):
        final_status, final_identifier = list(
            assoc.send_c_move(q, "STORESCP", StudyRootQueryRetrieveInformationModelMove)
        )[-1]
    assoc.release()
    assert (final_status.Status, final_status.NumberOfFailedSuboperations) == (0xA702, 3000)
    listed = list(final_identifier.FailedSOPInstanceUIDList)
    assert listed == list(uids[: len(listed)]) and len("\\".join(listed)) <= 0xFFFE
    assert len(listed) == (0xFFFE + 1) // (len(uids[0]) + 1)  # as many as fit
    assert f"{len(listed)} of 3000 UID(s) fit in the response" in caplog.text and uids[-1] in caplog.text


# --- C-GET -------------------------------------------------------------------------------------------


def ct_instances() -> list[Instance]:
    return [Instance(p, read_sop_uid(p)) for p in series_files(CT_SERIES)]


def getscu_series(scp, out_dir):
    """DCMTK getscu of the test series (Study Root, SERIES level) into ``out_dir``."""
    return run(
        "getscu",
        "-v",
        "-aec",
        "NODE",
        "-S",
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        "SeriesInstanceUID=1.2.3",
        "-od",
        str(out_dir),
        "127.0.0.1",
        str(scp.port),
    )


def test_getscu_receives_every_instance(scp, tmp_path, shared_data):
    """getscu writes sequences with undefined length, so its files are compared as data sets; the bytes on
    the wire are compared in test_cancel_in_the_middle_of_a_get."""
    scp.qr.instances = ct_instances()
    out_dir = tmp_path / "got"
    out_dir.mkdir()
    out = getscu_series(scp, out_dir)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert scp.qr.outcome == ["completed"]
    assert scp.qr.store_results == [(0, "")] * len(scp.qr.instances)
    got = {read_sop_uid(p): dcmread(p) for p in out_dir.iterdir()}
    assert got == {i.sop_instance: dcmread(i.path) for i in scp.qr.instances}
    assert "Received C-GET Response (Success)" in log, log
    assert f"Number of Completed Suboperations : {len(scp.qr.instances)}" in log, log
    assert wait_ended(scp.handlers) == ["released"]


def test_an_instance_without_a_context_in_its_syntax_fails_and_is_listed(scp, tmp_path, shared_data):
    """getscu proposes uncompressed syntaxes only: a JPEG-stored instance has no context to go on (its
    Secondary Capture class is accepted, in Explicit VR Little Endian)."""
    jpeg = shared_data / "transfer-syntaxes" / "misc" / "JPEG-LL.dcm"  # JPEG Lossless, SV1
    meta = dcmread(jpeg, stop_before_pixels=True)
    bad = Instance(jpeg, str(meta.SOPInstanceUID), str(meta.SOPClassUID), str(meta.file_meta.TransferSyntaxUID))
    assert (bad.sop_class, bad.transfer_syntax) == (SECONDARY_CAPTURE, "1.2.840.10008.1.2.4.70")
    good = ct_instances()[:2]
    scp.qr.instances = [good[0], bad, good[1]]
    out_dir = tmp_path / "got"
    out_dir.mkdir()
    out = getscu_series(scp, out_dir)
    log = out.stdout + out.stderr
    assert [s for s, _ in scp.qr.store_results] == [0, 0x0122, 0]
    assert f"no presentation context for {bad.sop_class} in {bad.transfer_syntax}" in scp.qr.store_results[1][1]
    assert sorted(read_sop_uid(p) for p in out_dir.iterdir()) == sorted(i.sop_instance for i in good)
    assert "Number of Failed Suboperations    : 1" in log, log
    assert wait_ended(scp.handlers) == ["released"]


def get_ae() -> AE:
    ae = AE(ae_title="SCU")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet, [EXPLICIT])
    ae.add_requested_context(CTImageStorage, [EXPLICIT])
    return ae


def test_cancel_in_the_middle_of_a_get(scp, shared_data):
    scp.qr.instances = ct_instances()
    received: list[str] = []
    wire: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        received.append(uid)
        wire[uid] = event.request.DataSet.getvalue()
        return 0x0000

    ae = get_ae()
    assoc = ae.associate(
        "127.0.0.1",
        scp.port,
        ae_title="NODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
    )
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.SeriesInstanceUID = "1.2.3"
    statuses = []
    for status, _identifier in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet, msg_id=7):
        statuses.append(status)
        if len(statuses) == 3:
            assoc.send_c_cancel(7, query_model=StudyRootQueryRetrieveInformationModelGet)
    assoc.release()
    final = statuses[-1]
    assert final.Status == 0xFE00
    n = len(received)
    assert 3 <= n < len(scp.qr.instances)
    assert scp.qr.outcome == [f"cancelled after {n}"]
    assert (final.NumberOfCompletedSuboperations, final.NumberOfRemainingSuboperations) == (
        n,
        len(scp.qr.instances) - n,
    )
    assert received == [i.sop_instance for i in scp.qr.instances[:n]]
    assert wire == {i.sop_instance: dataset_bytes(i.path) for i in scp.qr.instances[:n]}  # as stored, byte for byte


def test_without_role_selection_no_instance_is_sent(scp, shared_data):
    """PS3.7 D.3.3.4: without the SCP role for a storage class, the requestor cannot receive C-STOREs."""
    scp.qr.instances = ct_instances()[:2]
    ae = get_ae()
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="NODE")
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.SeriesInstanceUID = "1.2.3"
    responses = list(assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet))
    assoc.release()
    final, identifier = responses[-1]
    assert (final.Status, final.NumberOfFailedSuboperations, final.NumberOfCompletedSuboperations) == (0xA702, 2, 0)
    assert list(identifier.FailedSOPInstanceUIDList) == [i.sop_instance for i in scp.qr.instances]
    assert all("with the SCP role for the requestor" in comment for _, comment in scp.qr.store_results)


# --- what DCMTK and pynetdicom do not send ------------------------------------------------------------


def raw_find(scp: Running) -> tuple[socket.socket, pdu.PduReader, bytes, bytes]:
    """An association proposing Patient Root FIND, and a C-FIND-RQ (message 9) command and identifier."""
    rq = association.build_request(
        "RAWSCU",
        "NODE",
        [(sop_classes.PATIENT_ROOT_FIND, [EXPLICIT])],
        implementation_class_uid="1.2.3.4",
        implementation_version_name=None,
    )
    s = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
    reader = pdu.PduReader(s, 1 << 16)
    s.sendall(rq.encode())
    assert reader.read_pdu(pdu.MAX_CONTROL_PDU)[0] == pdu.PduType.A_ASSOCIATE_AC
    cmd = Dataset()
    cmd.AffectedSOPClassUID = sop_classes.PATIENT_ROOT_FIND
    cmd.CommandField = 0x0020
    cmd.MessageID = 9
    cmd.Priority = 0
    cmd.CommandDataSetType = 0x0000
    q = Dataset()
    q.QueryRetrieveLevel = "PATIENT"
    q.PatientID = ""
    return s, reader, encode(cmd, True, True), encode(q, False, True)


def responses(reader: pdu.PduReader) -> Iterator[dimse.Command]:
    """The response command sets until the final one (data set PDVs skipped)."""
    while True:
        kind, body = reader.read_pdu(1 << 20)
        assert kind == pdu.PduType.P_DATA_TF, kind
        for _cx, header, data in pdu.iter_pdvs(body):
            if header & pdu.Pdv.COMMAND:
                rsp = dimse.decode_command(data)
                yield rsp
                if rsp.status not in (0xFF00, 0xFF01):
                    return


def test_a_cancel_in_the_same_pdu_as_the_identifier_is_seen(scp):
    s, reader, command, identifier = raw_find(scp)
    with s:
        both = pdu.PDV_HEAD.pack(len(identifier) + 2, 1, pdu.Pdv.LAST) + identifier
        cancel = dimse.encode_c_cancel_rq(9)
        both += pdu.PDV_HEAD.pack(len(cancel) + 2, 1, pdu.Pdv.COMMAND | pdu.Pdv.LAST) + cancel
        s.sendall(pdu.p_data(1, command) + pdu.PDU_HEAD.pack(pdu.PduType.P_DATA_TF, len(both)) + both)
        got = [(r.command_field, r.responding_to, r.status) for r in responses(reader)]
        s.sendall(pdu.A_RELEASE_RQ)
    assert got == [(dimse.C_FIND_RSP, 9, 0xFE00)]
    assert scp.qr.outcome == ["cancelled after 0"]


def test_another_request_during_a_find_aborts_with_a_log_line(scp, caplog):
    scp.qr.matches, scp.qr.wait_for_cancel_after = 5, 1
    s, reader, command, identifier = raw_find(scp)
    with s, caplog.at_level(logging.ERROR, logger="node.receive.acceptor"):
        s.sendall(pdu.p_data(1, command) + pdu.p_data(1, identifier, pdu.Pdv.LAST))
        first = next(responses(reader))
        assert first.status == 0xFF00
        s.sendall(pdu.p_data(1, dimse.encode_c_echo_rq(10)))
        kinds = []
        while kinds[-1:] != [pdu.PduType.A_ABORT]:
            kinds.append(reader.read_pdu(1 << 20)[0])
        assert wait_ended(scp.handlers) == ["aborted"]
    assert scp.qr.outcome == ["ProtocolError"]
    assert "command 0x0030 while a C-FIND was being answered (asynchronous operations are not negotiated)" in (
        caplog.text
    )


def test_a_find_without_an_identifier_gets_c000_and_the_association_goes_on(scp):
    s, reader, _command, _identifier = raw_find(scp)
    no_data = Dataset()
    no_data.AffectedSOPClassUID = sop_classes.PATIENT_ROOT_FIND
    no_data.CommandField, no_data.MessageID, no_data.Priority, no_data.CommandDataSetType = 0x0020, 9, 0, 0x0101
    with s:
        s.sendall(pdu.p_data(1, encode(no_data, True, True)))
        [final] = list(responses(reader))
        assert (final.status, final.responding_to) == (0xC000, 9)
        assert final.error_comment == "a C-FIND needs an identifier (the keys to match)"
        s.sendall(pdu.p_data(1, dimse.encode_c_echo_rq(10)))  # the association is still there
        [echo] = list(responses(reader))
        assert echo.status == 0x0000
    assert scp.qr.asked == []


# --- over TLS ----------------------------------------------------------------------------------------


@pytest.fixture
def tls_scp(tmp_path) -> Iterator[tuple[Running, Path]]:
    key, cert = make_cert(tmp_path, "node")
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert), str(key))
    qr, handlers = FakeQR(), Handlers()
    s = settings(tmp_path, qr=True)
    s.ssl_context = ctx
    a = Acceptor(s, handlers, "127.0.0.1", 0, qr)
    a.start()
    yield Running(a, qr, handlers), cert
    a.stop(1)


def test_findscu_cancel_over_tls(tls_scp):
    scp, cert = tls_scp
    scp.qr.matches, scp.qr.wait_for_cancel_after = 10, 2
    out = run(
        "findscu",
        "-v",
        "+tla",
        "+cf",
        str(cert),
        "-aec",
        "NODE",
        "-S",
        "--cancel",
        "2",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "127.0.0.1",
        str(scp.port),
    )
    log = out.stdout + out.stderr
    assert out.returncode == 0, log
    assert scp.qr.outcome == ["cancelled after 2"]
    assert "Received Final Find Response (Cancel: MatchingTerminatedDueToCancelRequest)" in log, log


def test_get_over_tls_sends_the_data_sets_as_stored(tls_scp, shared_data):
    scp, cert = tls_scp
    scp.qr.instances = ct_instances()[:4]
    wire: dict[str, bytes] = {}

    def on_store(event: evt.Event) -> int:
        wire[str(event.request.AffectedSOPInstanceUID)] = event.request.DataSet.getvalue()
        return 0x0000

    client = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(cert))
    client.check_hostname = False
    assoc = get_ae().associate(
        "127.0.0.1",
        scp.port,
        ae_title="NODE",
        ext_neg=[build_role(CTImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, on_store)],
        tls_args=(client, None),
    )
    assert assoc.is_established
    q = Dataset()
    q.QueryRetrieveLevel = "SERIES"
    q.SeriesInstanceUID = "1.2.3"
    final, _ = list(assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet))[-1]
    assoc.release()
    assert (final.Status, final.NumberOfCompletedSuboperations) == (0x0000, 4)
    assert wire == {i.sop_instance: dataset_bytes(i.path) for i in scp.qr.instances}
