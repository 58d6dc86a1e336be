"""Negotiation between node.dicom's requestor side and acceptor side, over a real socket pair."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

import pytest

from node.dicom import association, pdu
from node.dicom.pdu import ContextResult, PduType, RoleSelection

CT = "1.2.840.10008.5.1.4.1.1.2"
COMMITMENT = "1.2.840.10008.1.20.1"
EXPLICIT, IMPLICIT, JPEG2000 = "1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.4.90"
SUPPORTED = {CT: frozenset({EXPLICIT, IMPLICIT}), COMMITMENT: frozenset({EXPLICIT, IMPLICIT})}


def acceptor(sock: socket.socket, scp_role_classes: frozenset[str] = frozenset({COMMITMENT})) -> None:
    """What an acceptor does with node.dicom: read the request, check it, answer every context and role."""
    reader = pdu.PduReader(sock, 1 << 16)
    kind, body = reader.read_pdu(pdu.MAX_CONTROL_PDU)
    assert kind == PduType.A_ASSOCIATE_RQ
    rq = pdu.AssociateRQ.decode(body)
    invalid = association.check_request(rq)
    if invalid is not None:
        sock.sendall(pdu.a_associate_rj(invalid[0]))
        return
    answers = [association.answer_context(cx, SUPPORTED.get(cx.abstract_syntax)) for cx in rq.contexts]
    accepted = {
        cx.abstract_syntax for cx, a in zip(rq.contexts, answers, strict=True) if a.result == ContextResult.ACCEPTANCE
    }
    roles = association.answer_roles(rq.user.roles, scp_role_classes, accepted)
    ac = association.build_accept(
        rq, answers, max_pdu=32768, implementation_class_uid="1.2.3.9", implementation_version_name="ACC", roles=roles
    )
    sock.sendall(ac.encode())


def negotiate(
    rq: pdu.AssociateRQ, corrupt: Callable[[bytes], bytes] = lambda b: b
) -> association.Accepted | pdu.Rejection:
    a, b = socket.socketpair()
    with a, b:
        a.settimeout(5)
        b.settimeout(5)
        t = threading.Thread(target=acceptor, args=(b,))
        t.start()
        a.sendall(corrupt(rq.encode()))
        kind, body = pdu.PduReader(a).read_pdu(pdu.MAX_CONTROL_PDU)
        t.join(5)
    if kind == PduType.A_ASSOCIATE_RJ:
        return pdu.decode_a_associate_rj(body)
    assert kind == PduType.A_ASSOCIATE_AC
    return association.read_accept(rq, pdu.AssociateAC.decode(body))


def request(contexts, **kw) -> pdu.AssociateRQ:
    return association.build_request(
        "SCU", "NODE", contexts, implementation_class_uid="1.2.3.4", implementation_version_name="REQ", **kw
    )


def test_contexts_get_the_senders_first_supported_syntax_or_the_reason_they_are_refused():
    got = negotiate(
        request(
            [
                (CT, [JPEG2000, IMPLICIT, EXPLICIT]),  # 1: implicit, the first one supported
                (CT, [JPEG2000]),  # 3: no supported transfer syntax
                ("1.2.3.999", [EXPLICIT]),  # 5: unknown abstract syntax
            ],
            max_pdu=65536,
        )
    )
    assert isinstance(got, association.Accepted)
    assert got.contexts == {1: (CT, IMPLICIT)}
    assert got.refused == {
        3: (CT, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED),
        5: ("1.2.3.999", ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED),
    }
    assert got.peer_max_pdu == 32768
    assert got.find(CT, IMPLICIT) == 1 and got.find(CT, EXPLICIT) is None


def test_scp_role_is_granted_only_for_the_allowed_classes_with_an_accepted_context():
    roles = [RoleSelection(COMMITMENT, scu_role=True, scp_role=True), RoleSelection(CT, scu_role=True, scp_role=True)]
    got = negotiate(request([(COMMITMENT, [EXPLICIT]), (CT, [EXPLICIT])], roles=roles))
    assert isinstance(got, association.Accepted)
    assert got.roles == {COMMITMENT: (False, True)}  # CT's proposal unanswered: default roles


def test_request_ids_defaults_and_limits():
    rq = request([(CT, [EXPLICIT]), (COMMITMENT, [IMPLICIT])])
    assert [cx.id for cx in rq.contexts] == [1, 3]
    assert rq.user.max_pdu == association.DEFAULT_MAX_PDU
    with pytest.raises(ValueError, match="1 to 128"):
        request([])
    with pytest.raises(ValueError, match="1 to 128"):
        request([(CT, [EXPLICIT])] * 129)


def test_wrong_protocol_version_is_rejected_by_acse():
    # byte 6-7 of the PDU: the protocol version bit field
    got = negotiate(request([(CT, [EXPLICIT])]), lambda b: b[:6] + b"\x00\x02" + b[8:])
    assert got == pdu.PROTOCOL_VERSION_NOT_SUPPORTED


def test_foreign_application_context_is_rejected_by_the_service_user():
    rq = request([(CT, [EXPLICIT])])
    rq.application_context = "1.2.840.10008.3.1.1.9"
    assert negotiate(rq) == pdu.APPLICATION_CONTEXT_NOT_SUPPORTED
