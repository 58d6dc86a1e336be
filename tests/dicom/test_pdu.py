"""PDUs: real peers' bytes decode to what they mean and encode back to the same bytes; broken ones are errors."""

from __future__ import annotations

import socket
import struct

import pytest
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import build_context

from node.dicom import pdu
from node.dicom.pdu import AbortReason, AbortSource, PduType

# Captured once from DCMTK 3.6.7 (a socket server that read the first PDU): `storescu -R -aec DICOM_NODE`
# with an MR image (two contexts, DCMTK's reserved byte 0xFF in each), `echoscu -aec DICOM_NODE`, and
# storescp's A-ASSOCIATE-AC to that echoscu request.
STORESCU_RQ = bytes.fromhex(
    "010000000128000100004449434f4d5f4e4f444520202020202053544f5245534355202020202020202000000000000000000000"
    "0000000000000000000000000000000000000000000010000015312e322e3834302e31303030382e332e312e312e312000003801"
    "00ff0030000019312e322e3834302e31303030382e352e312e342e312e312e3440000013312e322e3834302e31303030382e312e"
    "322e312000004d0300ff0030000019312e322e3834302e31303030382e352e312e342e312e312e3440000013312e322e3834302e"
    "31303030382e312e322e3240000011312e322e3834302e31303030382e312e325000003a51000004000040005200001b312e322e"
    "3237362e302e373233303031302e332e302e332e362e375500000f4f464649535f44434d544b5f333637"
)
ECHOSCU_RQ = bytes.fromhex(
    "0100000000cd000100004449434f4d5f4e4f44452020202020204543484f53435520202020202020202000000000000000000000"
    "0000000000000000000000000000000000000000000010000015312e322e3834302e31303030382e332e312e312e312000002e01"
    "00ff0030000011312e322e3834302e31303030382e312e3140000011312e322e3834302e31303030382e312e325000003a510000"
    "04000040005200001b312e322e3237362e302e373233303031302e332e302e332e362e375500000f4f464649535f44434d544b5f"
    "333637"
)
STORESCP_AC = bytes.fromhex(
    "0200000000b8000100004449434f4d5f4e4f44452020202020204543484f53435520202020202020202000000000000000000000"
    "0000000000000000000000000000000000000000000010000015312e322e3834302e31303030382e332e312e312e312100001901"
    "00000040000011312e322e3834302e31303030382e312e325000003a51000004000040005200001b312e322e3237362e302e3732"
    "33303031302e332e302e332e362e375500000f4f464649535f44434d544b5f333637"
)
DCMTK_UID = "1.2.276.0.7230010.3.0.3.6.7"
MR = "1.2.840.10008.5.1.4.1.1.4"


def body(raw: bytes) -> bytes:
    kind, length = pdu.PDU_HEAD.unpack_from(raw)
    assert len(raw) == 6 + length
    return raw[6:]


def test_storescu_request_decodes_and_encodes_byte_identically():
    rq = pdu.AssociateRQ.decode(body(STORESCU_RQ))
    assert (rq.called_ae, rq.calling_ae, rq.protocol_version) == ("DICOM_NODE", "STORESCU", 1)
    assert rq.application_context == pdu.APPLICATION_CONTEXT
    assert [(c.id, c.abstract_syntax, c.transfer_syntaxes) for c in rq.contexts] == [
        (1, MR, ["1.2.840.10008.1.2.1"]),
        (3, MR, ["1.2.840.10008.1.2.2", "1.2.840.10008.1.2"]),
    ]
    assert rq.user.max_pdu == 16384 and rq.user.implementation_class_uid == DCMTK_UID
    assert rq.user.implementation_version_name == "OFFIS_DCMTK_367"
    assert rq.user.async_ops is None and rq.user.roles == []
    assert rq.encode() == STORESCU_RQ


def test_echoscu_request_and_storescp_accept_round_trip():
    rq = pdu.AssociateRQ.decode(body(ECHOSCU_RQ))
    assert rq.contexts[0].abstract_syntax == "1.2.840.10008.1.1" and rq.encode() == ECHOSCU_RQ
    ac = pdu.AssociateAC.decode(body(STORESCP_AC))
    assert (ac.called_ae, ac.calling_ae) == ("DICOM_NODE", "ECHOSCU")
    assert ac.contexts == [pdu.ContextAnswer(1, pdu.ContextResult.ACCEPTANCE, "1.2.840.10008.1.2")]
    assert ac.user.max_pdu == 16384 and ac.user.implementation_class_uid == DCMTK_UID
    assert ac.encode() == STORESCP_AC


def pynetdicom_request() -> bytes:
    """pynetdicom's encoding of a request with every user information sub-item we interpret, in its order."""
    prim = A_ASSOCIATE()
    prim.application_context_name = pdu.APPLICATION_CONTEXT
    prim.calling_ae_title, prim.called_ae_title = "PACS", "DICOM_NODE"
    cx = build_context("1.2.840.10008.1.20.1", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"])
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    ml = MaximumLengthNotification()
    ml.maximum_length_received = 0
    impl = ImplementationClassUIDNotification()
    impl.implementation_class_uid = "1.2.3.4"
    ver = ImplementationVersionNameNotification()
    ver.implementation_version_name = "PYNETDICOM_304"
    window = AsynchronousOperationsWindowNegotiation()
    window.maximum_number_operations_invoked, window.maximum_number_operations_performed = 2, 3
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid, role.scu_role, role.scp_role = "1.2.840.10008.1.20.1", False, True
    prim.user_information = [ml, impl, ver, window, role]
    rq = A_ASSOCIATE_RQ()
    rq.from_primitive(prim)
    return rq.encode()


def test_async_window_and_role_selection_from_pynetdicom():
    raw = pynetdicom_request()
    rq = pdu.AssociateRQ.decode(body(raw))
    assert rq.user.max_pdu == 0  # unlimited
    assert rq.user.async_ops == (2, 3)
    assert rq.user.roles == [pdu.RoleSelection("1.2.840.10008.1.20.1", scu_role=False, scp_role=True)]
    assert rq.encode() == raw  # pynetdicom's sub-item order (55 before 53, 54) is kept


def test_our_request_is_what_pynetdicom_reads():
    ours = pdu.AssociateRQ.decode(body(pynetdicom_request()))
    ours.user.order = []  # our canonical order this time
    decoded = A_ASSOCIATE_RQ()
    decoded.decode(ours.encode())
    prim = decoded.to_primitive()
    assert str(prim.called_ae_title).strip() == "DICOM_NODE" and str(prim.calling_ae_title).strip() == "PACS"
    (cx,) = prim.presentation_context_definition_list
    assert [str(t) for t in cx.transfer_syntax] == ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]
    kinds = {type(i).__name__: i for i in prim.user_information}
    assert kinds["AsynchronousOperationsWindowNegotiation"].maximum_number_operations_performed == 3
    assert kinds["SCP_SCU_RoleSelectionNegotiation"].scp_role is True


def test_control_pdus():
    assert pdu.A_RELEASE_RQ == b"\x05\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    assert pdu.A_RELEASE_RP == b"\x06\x00\x00\x00\x00\x04\x00\x00\x00\x00"
    abort = pdu.a_abort(AbortSource.SERVICE_PROVIDER, AbortReason.INVALID_PDU_PARAMETER)
    assert abort == b"\x07\x00\x00\x00\x00\x04\x00\x00\x02\x06"
    assert pdu.decode_a_abort(body(abort)) == (2, 6) and pdu.decode_a_abort(b"") == (0, 0)
    rj = pdu.a_associate_rj(pdu.CALLED_AE_NOT_RECOGNIZED)
    assert rj == b"\x03\x00\x00\x00\x00\x04\x00\x01\x01\x07"
    assert pdu.decode_a_associate_rj(body(rj)) == pdu.CALLED_AE_NOT_RECOGNIZED
    assert pdu.LOCAL_LIMIT_EXCEEDED.text == "transient, service provider (presentation): local limit exceeded"
    assert pdu.Rejection(1, 1, 9).text == "permanent, service user: reason 9"


def test_p_data_and_pdvs():
    command = pdu.p_data(5, b"CMD!")
    assert command == b"\x04\x00\x00\x00\x00\x0a" + b"\x00\x00\x00\x06\x05\x03" + b"CMD!"
    assert pdu.p_data_header(3, 100, pdu.Pdv.LAST) == struct.pack(">BxLLBB", 4, 106, 102, 3, 2)
    two = body(pdu.p_data(1, b"ab", pdu.Pdv.DATA)) + body(pdu.p_data(1, b"c", pdu.Pdv.LAST))
    assert [(cx, h, bytes(d)) for cx, h, d in pdu.iter_pdvs(two)] == [(1, 0, b"ab"), (1, 2, b"c")]
    with pytest.raises(pdu.PduError, match="truncated"):
        list(pdu.iter_pdvs(two + b"\x00\x00"))
    with pytest.raises(pdu.PduError, match="does not fit"):
        list(pdu.iter_pdvs(b"\x00\x00\x00\x40\x01\x03abc"))


@pytest.mark.parametrize(
    "cut, match",
    [
        (lambda b: b[:40], "shorter than its fixed fields"),
        (lambda b: b[:-5], "overruns its PDU"),
        (lambda b: b[:68] + b[68 + 25 :], "without an application context"),  # the 0x10 item cut out
        (lambda b: b[:68] + b[68:70] + b"\xff\xff" + b[72:], "overruns"),
        # AE titles (PS3.5 6.2): pynetdicom refused these too; they would reach the index and File Meta.
        (
            lambda b: b[:4] + b"NODE\x00\x00" + b" " * 10 + b[20:],
            "the called AE title 'NODE.x00.x00' holds a backslash or a control",
        ),
        (lambda b: b[:20] + b"A\\B" + b" " * 13 + b[36:], "the calling AE title 'A\\\\\\\\B' holds a backslash"),
        (lambda b: b[:20] + b" " * 16 + b[36:], "the calling AE title is empty"),
    ],
)
def test_malformed_requests_are_errors(cut, match):
    with pytest.raises(pdu.PduError, match=match):
        pdu.AssociateRQ.decode(cut(body(ECHOSCU_RQ)))


def test_reader_streams_fragments_as_views_and_reports_timeouts():
    a, b = socket.socketpair()
    with a, b:
        reader = pdu.PduReader(a, 64)
        payload = bytes(range(200))
        b.sendall(pdu.p_data_header(1, len(payload), pdu.Pdv.LAST) + payload + pdu.A_RELEASE_RQ)
        assert reader.read_header() == (PduType.P_DATA_TF, len(payload) + 6)
        assert pdu.PDV_HEAD.unpack(reader.read_exact(6)) == (len(payload) + 2, 1, 2)
        pieces: list[bytes] = []
        reader.read_into_chunks(len(payload), lambda v: pieces.append(bytes(v)))
        assert b"".join(pieces) == payload and max(map(len, pieces)) <= 64
        assert reader.read_pdu(pdu.MAX_CONTROL_PDU) == (PduType.A_RELEASE_RQ, b"\x00\x00\x00\x00")
        a.settimeout(0.05)
        with pytest.raises(pdu.PeerClosed) as e:
            reader.read_header()
        assert e.value.timed_out
        b.sendall(b"\x04\x00\x7f\xff\xff\xff")
        with pytest.raises(pdu.PduError, match="larger than allowed"):
            reader.read_pdu(1 << 20)
        b.close()
        with pytest.raises(pdu.PeerClosed) as e:
            reader.read_header()
        assert not e.value.timed_out
