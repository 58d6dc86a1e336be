"""The requestor's answer to each way an acceptor can refuse or break negotiation (a scripted acceptor on loopback)."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator

import pytest

from node.dicom import association, pdu
from node.dicom.pdu import AbortReason, AbortSource, RejectResult
from node.send.requestor import Association, Lost, PeerAborted, Rejected

CT, EXPLICIT = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.1.2.1"


@pytest.fixture
def acceptor() -> Iterator[Callable[[Callable[[pdu.AssociateRQ], bytes]], int]]:
    """Start a one-connection acceptor that answers the request with ``reply(request)``; returns its port."""
    servers: list[socket.socket] = []

    def start(reply: Callable[[pdu.AssociateRQ], bytes]) -> int:
        srv = socket.create_server(("127.0.0.1", 0))
        servers.append(srv)

        def serve() -> None:
            conn, _ = srv.accept()
            with conn:
                conn.settimeout(5)
                reader = pdu.PduReader(conn, 1 << 16)
                _, body = reader.read_pdu(pdu.MAX_CONTROL_PDU)
                conn.sendall(reply(pdu.AssociateRQ.decode(body)))
                try:
                    reader.read_pdu(pdu.MAX_CONTROL_PDU)  # the requestor's A-ABORT or A-RELEASE-RQ, if any
                except (pdu.PeerClosed, pdu.PduError):
                    pass

        threading.Thread(target=serve, daemon=True).start()
        return srv.getsockname()[1]

    yield start
    for s in servers:
        s.close()


def request(port: int) -> Association:
    return Association.request(
        "127.0.0.1", port, calling_ae="NODE", called_ae="PACS", contexts=[(CT, [EXPLICIT])], timeout=5
    )


def test_rejection_carries_result_source_reason_and_says_them(acceptor):
    port = acceptor(lambda rq: pdu.a_associate_rj(pdu.CALLING_AE_NOT_RECOGNIZED))
    with pytest.raises(Rejected) as e:
        request(port)
    assert (e.value.result, e.value.source, e.value.reason) == (RejectResult.PERMANENT, 1, 3)
    assert str(e.value) == "permanent, service user: calling AE title not recognised"


def test_abort_instead_of_an_answer_names_who_aborted(acceptor):
    port = acceptor(lambda rq: pdu.a_abort(AbortSource.SERVICE_USER, AbortReason.NOT_SPECIFIED))
    with pytest.raises(PeerAborted, match="the peer's application") as e:
        request(port)
    assert e.value.source == AbortSource.SERVICE_USER


def test_malformed_accept_is_lost_not_a_crash(acceptor):
    port = acceptor(lambda rq: pdu.PDU_HEAD.pack(pdu.PduType.A_ASSOCIATE_AC, 10) + b"\x00\x01" + b"\x00" * 8)
    with pytest.raises(Lost, match="malformed"):
        request(port)


def test_accept_with_the_peers_limits(acceptor):
    def accept(rq: pdu.AssociateRQ) -> bytes:
        answers = [association.answer_context(cx, frozenset({EXPLICIT})) for cx in rq.contexts]
        return association.build_accept(
            rq, answers, max_pdu=4096, implementation_class_uid="1.2.3", implementation_version_name=None
        ).encode()

    assoc = request(acceptor(accept))
    try:
        assert assoc.accepted.contexts == {1: (CT, EXPLICIT)} and assoc.peer_max_pdu == 4096
    finally:
        assoc.abort()
