"""Association negotiation for both roles (PS3.8 7.1, PS3.7 Annex D.3.3), on parsed PDUs.

The requestor builds its A-ASSOCIATE-RQ with :func:`build_request` and reads the answer with
:func:`read_accept`; the acceptor checks a request (:func:`check_request`), answers each presentation
context (:func:`answer_context`) and role selection (:func:`answer_roles`), and builds its
A-ASSOCIATE-AC (:func:`build_accept`) or A-ASSOCIATE-RJ (:data:`node.dicom.pdu.Rejection`). What to
accept (which SOP classes, which calling AE titles) is the application's; how to say it is here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from node.dicom.pdu import (
    APPLICATION_CONTEXT,
    APPLICATION_CONTEXT_NOT_SUPPORTED,
    PROTOCOL_VERSION,
    PROTOCOL_VERSION_NOT_SUPPORTED,
    AssociateAC,
    AssociateRQ,
    ContextAnswer,
    ContextProposal,
    ContextResult,
    Rejection,
    RoleSelection,
    UserInformation,
)

#: Our largest accepted PDU when the caller gives none (what we tell the peer).
DEFAULT_MAX_PDU = 1 << 20
#: PS3.8 9.3.2.2: presentation context ids are odd numbers 1-255.
MAX_CONTEXTS = 128


# --- requestor ---------------------------------------------------------------------------------------


def build_request(
    calling_ae: str,
    called_ae: str,
    contexts: Sequence[tuple[str, Sequence[str]]],
    *,
    implementation_class_uid: str,
    implementation_version_name: str | None,
    max_pdu: int = 0,
    roles: Iterable[RoleSelection] = (),
) -> AssociateRQ:
    """An A-ASSOCIATE-RQ proposing ``contexts`` ([(abstract syntax, [transfer syntaxes])]) as ids 1, 3, 5..."""
    if not contexts or len(contexts) > MAX_CONTEXTS:
        raise ValueError(f"an association proposes 1 to {MAX_CONTEXTS} presentation contexts, not {len(contexts)}")
    return AssociateRQ(
        called_ae=called_ae,
        calling_ae=calling_ae,
        contexts=[ContextProposal(2 * n + 1, abstract, list(ts)) for n, (abstract, ts) in enumerate(contexts)],
        user=UserInformation(
            max_pdu=max_pdu or DEFAULT_MAX_PDU,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
            roles=list(roles),
        ),
    )


@dataclass
class Accepted:
    """What the acceptor agreed to: presentation contexts id -> (abstract syntax, transfer syntax)."""

    contexts: dict[int, tuple[str, str]] = field(default_factory=dict)
    #: Refused ones: id -> (abstract syntax, result: 3 abstract syntax, 4 transfer syntaxes not supported).
    refused: dict[int, tuple[str, int]] = field(default_factory=dict)
    #: The largest PDU the acceptor takes (0: unlimited).
    peer_max_pdu: int = 0
    #: SOP class -> (we may be SCU, we may be SCP), for the classes whose roles were negotiated.
    roles: dict[str, tuple[bool, bool]] = field(default_factory=dict)

    def find(self, abstract: str, transfer: str) -> int | None:
        for cx_id, (a, t) in self.contexts.items():
            if a == abstract and t == transfer:
                return cx_id
        return None


def read_accept(rq: AssociateRQ, ac: AssociateAC) -> Accepted:
    """The contexts and limits an A-ASSOCIATE-AC agreed to, matched with what ``rq`` proposed."""
    proposed = {cx.id: cx.abstract_syntax for cx in rq.contexts}
    out = Accepted(peer_max_pdu=ac.user.max_pdu or 0)
    for cx in ac.contexts:
        abstract = proposed.get(cx.id, "")
        if cx.result == ContextResult.ACCEPTANCE and cx.transfer_syntax:
            out.contexts[cx.id] = (abstract, cx.transfer_syntax)
        else:
            out.refused[cx.id] = (abstract, cx.result)
    # PS3.7 D.3.3.4: an acceptor that does not answer a proposal leaves the default roles.
    out.roles = {r.sop_class_uid: (r.scu_role, r.scp_role) for r in ac.user.roles}
    return out


# --- acceptor ----------------------------------------------------------------------------------------


def check_request(rq: AssociateRQ) -> tuple[Rejection, str] | None:
    """The rejection (and why, for the log) of a request no DICOM acceptor can take, else ``None``."""
    if rq.protocol_version != PROTOCOL_VERSION:
        return PROTOCOL_VERSION_NOT_SUPPORTED, f"protocol version {rq.protocol_version} is not supported"
    if rq.application_context != APPLICATION_CONTEXT:
        return APPLICATION_CONTEXT_NOT_SUPPORTED, f"application context {rq.application_context} is not DICOM's"
    return None


def answer_context(proposal: ContextProposal, accepted: frozenset[str] | None) -> ContextAnswer:
    """Answer one proposed context, given the transfer syntaxes taken for its abstract syntax (None: none).

    The sender's first choice that we take wins: PS3.8 leaves the choice to the acceptor, and a
    store-as-sent node takes the sender's. A refused context echoes a proposed transfer syntax,
    which PS3.8 9.3.3.2 says the requestor does not test.
    """
    if accepted is None:
        return ContextAnswer(proposal.id, ContextResult.ABSTRACT_SYNTAX_NOT_SUPPORTED, proposal.transfer_syntaxes[0])
    chosen = next((ts for ts in proposal.transfer_syntaxes if ts in accepted), None)
    if chosen is None:
        return ContextAnswer(proposal.id, ContextResult.TRANSFER_SYNTAXES_NOT_SUPPORTED, proposal.transfer_syntaxes[0])
    return ContextAnswer(proposal.id, ContextResult.ACCEPTANCE, chosen)


def answer_roles(
    proposed: Iterable[RoleSelection],
    scp_role_classes: frozenset[str],
    accepted_abstracts: Iterable[str],
    storage_classes: Iterable[str] = (),
) -> list[RoleSelection]:
    """Answers to SCP/SCU role selection (PS3.7 D.3.3.4): the requestor may take the SCP role for the
    classes in ``scp_role_classes`` that have an accepted context (so it can send us, say, N-EVENT-REPORTs);
    for ``storage_classes`` (accepted storage contexts, when the node answers C-GET) the roles are granted
    as proposed, so that a C-GET requestor receives the C-STORE sub-operations and may still store to us.
    Other proposals get no answer, which leaves the default roles."""
    abstracts = set(accepted_abstracts)
    storage = set(storage_classes)
    out = []
    for r in proposed:
        if r.sop_class_uid in storage:
            out.append(RoleSelection(r.sop_class_uid, scu_role=r.scu_role, scp_role=r.scp_role))
        elif r.sop_class_uid in scp_role_classes and r.sop_class_uid in abstracts:
            out.append(RoleSelection(r.sop_class_uid, scu_role=False, scp_role=r.scp_role))
    return out


def build_accept(
    rq: AssociateRQ,
    answers: list[ContextAnswer],
    *,
    max_pdu: int,
    implementation_class_uid: str,
    implementation_version_name: str | None,
    roles: list[RoleSelection] | None = None,
) -> AssociateAC:
    """The A-ASSOCIATE-AC for ``rq``. No asynchronous operations window is answered: one operation at a
    time, the default (PS3.7 D.3.3.3)."""
    return AssociateAC(
        called_ae=rq.called_ae,
        calling_ae=rq.calling_ae,
        contexts=answers,
        user=UserInformation(
            max_pdu=max_pdu,
            implementation_class_uid=implementation_class_uid,
            implementation_version_name=implementation_version_name,
            roles=roles or [],
        ),
    )
