"""The acceptor on node.dicom, in-process: what malformed and out-of-place PDUs get (see its docstring)."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from node.dicom import association, dimse, pdu
from node.dicom.pdu import AbortReason, AbortSource, PduType
from node.receive.acceptor import Acceptor, AcceptorSettings

VERIFICATION, EXPLICIT = "1.2.840.10008.1.1", "1.2.840.10008.1.2.1"


class Handlers:
    def __init__(self) -> None:
        self.ended: list[str] = []

    def check_association(self, calling_ae, called_ae, address):
        return None

    def store(self, assoc, request):
        return 0, ""

    def association_accepted(self, assoc):
        pass

    def association_rejected(self, assoc, reason, text):
        pass

    def association_ended(self, assoc, how):
        self.ended.append(how)

    def event_report(self, assoc, command, transfer_syntax, data):
        return 0


@pytest.fixture
def acceptor(tmp_path) -> Iterator[Acceptor]:
    settings = AcceptorSettings(
        ae_title="NODE",
        max_pdu=16384,
        max_associations=4,
        acse_timeout=5,
        network_timeout=5,
        implementation_class_uid="1.2.3.9",
        implementation_version="TEST",
        supported={VERIFICATION: frozenset({EXPLICIT})},
        receive_dir=tmp_path,
    )
    a = Acceptor(settings, Handlers(), "127.0.0.1", 0)
    a.start()
    yield a
    a.stop(1)


def connect(acceptor: Acceptor) -> tuple[socket.socket, pdu.PduReader]:
    s = socket.create_connection(("127.0.0.1", acceptor.port), timeout=5)
    return s, pdu.PduReader(s, 1 << 16)


def associate(acceptor: Acceptor) -> tuple[socket.socket, pdu.PduReader]:
    s, reader = connect(acceptor)
    rq = association.build_request(
        "SCU",
        "NODE",
        [(VERIFICATION, [EXPLICIT])],
        implementation_class_uid="1.2.3.4",
        implementation_version_name=None,
    )
    s.sendall(rq.encode())
    kind, body = reader.read_pdu(pdu.MAX_CONTROL_PDU)
    assert kind == PduType.A_ASSOCIATE_AC
    assert association.read_accept(rq, pdu.AssociateAC.decode(body)).contexts == {1: (VERIFICATION, EXPLICIT)}
    return s, reader


def answer(reader: pdu.PduReader) -> tuple[int, bytes]:
    return reader.read_pdu(pdu.MAX_CONTROL_PDU)


def aborted(reason: AbortReason) -> tuple[int, bytes]:
    return PduType.A_ABORT, bytes((0, 0, AbortSource.SERVICE_PROVIDER, reason))


def test_echo_and_release(acceptor):
    s, reader = associate(acceptor)
    with s:
        s.sendall(pdu.p_data(1, dimse.encode_c_echo_rq(5)))
        kind, body = answer(reader)
        ((cx, header, command),) = pdu.iter_pdvs(body)
        rsp = dimse.decode_command(command)
        assert (kind, cx, rsp.command_field, rsp.responding_to, rsp.status) == (PduType.P_DATA_TF, 1, 0x8030, 5, 0)
        s.sendall(pdu.A_RELEASE_RQ)
        assert answer(reader) == (PduType.A_RELEASE_RP, b"\x00\x00\x00\x00")


def test_anything_but_a_request_first_is_an_unexpected_pdu(acceptor):
    s, reader = connect(acceptor)
    with s:
        s.sendall(pdu.p_data(1, dimse.encode_c_echo_rq(1)))
        assert answer(reader) == aborted(AbortReason.UNEXPECTED_PDU)


def echo_request() -> pdu.AssociateRQ:
    """An A-ASSOCIATE-RQ from SCU to NODE proposing Verification."""
    return association.build_request(
        "SCU",
        "NODE",
        [(VERIFICATION, [EXPLICIT])],
        implementation_class_uid="1.2.3.4",
        implementation_version_name=None,
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda rq: rq[: 6 + 68 + 2] + b"\xff\xff" + rq[6 + 68 + 4 :],  # the first item's length overruns the PDU
        lambda rq: rq[: 6 + 20] + b"SCU\x00" + rq[6 + 24 :],  # the calling AE title, NUL-padded
    ],
    ids=["item-overruns", "nul-in-calling-ae"],
)
def test_undecodable_request_is_aborted(acceptor, damage):
    s, reader = connect(acceptor)
    with s:
        s.sendall(damage(echo_request().encode()))
        assert answer(reader) == aborted(AbortReason.NOT_SPECIFIED)


def test_other_protocol_version_is_rejected(acceptor):
    s, reader = connect(acceptor)
    rq = echo_request()
    rq.protocol_version = 2
    with s:
        s.sendall(rq.encode())
        kind, body = answer(reader)
        assert (kind, pdu.decode_a_associate_rj(body)) == (PduType.A_ASSOCIATE_RJ, pdu.PROTOCOL_VERSION_NOT_SUPPORTED)


@pytest.mark.parametrize(
    "send, reason",
    [
        (pdu.p_data(7, dimse.encode_c_echo_rq(1)), AbortReason.INVALID_PDU_PARAMETER),  # context 7 not accepted
        (pdu.p_data(1, b"\x08\x00\x16\x00\x00\x00\x00\x00"), AbortReason.INVALID_PDU_PARAMETER),  # not a command
        (pdu.p_data(1, b"x", pdu.Pdv.LAST), AbortReason.INVALID_PDU_PARAMETER),  # data set without command
        (pdu.PDU_HEAD.pack(4, 6) + pdu.PDV_HEAD.pack(64, 1, 3), AbortReason.INVALID_PDU_PARAMETER),  # PDV > PDU
        (pdu.a_associate_rj(pdu.NO_REASON), AbortReason.UNEXPECTED_PDU),
        (pdu.PDU_HEAD.pack(0x09, 0), AbortReason.UNRECOGNIZED_PDU),
    ],
    ids=["unaccepted-context", "not-a-command", "data-without-command", "pdv-overruns", "rj", "unknown-type"],
)
def test_broken_or_out_of_place_pdus_after_association(acceptor, send, reason):
    s, reader = associate(acceptor)
    with s:
        s.sendall(send)
        assert answer(reader) == aborted(reason)
