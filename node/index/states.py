"""The states a job, a delivery and a series can be in, and the named groups of them the node decides by.

The values are the strings stored in the index (``job.state``, ``delivery.state``,
``delivery.commitment``, ``series.state``), so a :class:`~enum.StrEnum` member compares equal to a
stored value and binds as one in SQL. Every question such as "is this delivery finished?" is
answered here once, as a frozenset of states and as a SQLAlchemy condition on a table (or an alias
of it), so that the job store, the forward queue, retention and the read model cannot drift apart.
This module imports nothing from the node: the models use it for their defaults.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from sqlalchemy import ColumnElement, and_, or_

__all__ = [
    "DELIVERY_IN_FLIGHT",
    "DELIVERY_RETRYABLE",
    "COMMITMENT_NOT_CONFIRMED",
    "JOB_ACTIVE",
    "JOB_RETRYABLE",
    "SERIES_TRACKING",
    "CommitmentState",
    "DeliveryState",
    "JobState",
    "SeriesState",
    "delivery_in_flight",
    "delivery_not_arrived",
    "delivery_settling",
    "job_active",
    "series_tracking",
]


class JobState(StrEnum):
    """A job: ``pending`` -> ``running`` -> ``succeeded`` | ``failed`` (| ``pending`` again for a retry)."""

    PENDING = "pending"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    #: By an operator; a running job finishes its step and its outcome is ignored.
    CANCELLED = "cancelled"


class DeliveryState(StrEnum):
    """One instance on its way to one destination: ``queued`` -> ``sending`` -> ``delivered`` | ``failed``."""

    QUEUED = "queued"
    SENDING = "sending"
    DELIVERED = "delivered"
    #: For good (permanent refusal, gave up, file gone): an operator retries or cancels it.
    FAILED = "failed"
    #: By an operator: it will not be sent.
    CANCELLED = "cancelled"


class CommitmentState(StrEnum):
    """Storage Commitment of a delivered instance (``delivery.commitment``)."""

    #: Not asked for.
    NONE = ""
    REQUESTED = "requested"
    COMMITTED = "committed"
    FAILED = "failed"


class SeriesState(StrEnum):
    """The series tracker: ``receiving`` -> ``stable`` -> ``triggered``; a new instance opens the next revision."""

    RECEIVING = "receiving"
    #: No instance for stable_after seconds (or all expected ones arrived): its rules are being evaluated.
    STABLE = "stable"
    #: Its rules were evaluated (also a series the node derived, which is never tracked).
    TRIGGERED = "triggered"


#: Jobs not finished: they still run or will (a discard waits for them; retention keeps their series).
JOB_ACTIVE = frozenset({JobState.PENDING, JobState.RUNNING})
#: Jobs an operator can run again.
JOB_RETRYABLE = frozenset({JobState.FAILED, JobState.CANCELLED})

#: Deliveries on the wire or about to be: an operator can cancel these, and their history is never pruned.
DELIVERY_IN_FLIGHT = frozenset({DeliveryState.QUEUED, DeliveryState.SENDING})
#: Deliveries an operator (or a retried job) can queue again.
DELIVERY_RETRYABLE = frozenset({DeliveryState.FAILED, DeliveryState.CANCELLED})
#: A delivered instance whose storage is not confirmed: asked and unanswered, or refused.
COMMITMENT_NOT_CONFIRMED = frozenset({CommitmentState.REQUESTED, CommitmentState.FAILED})

#: Series the tracker still follows: not yet handed to the rules.
SERIES_TRACKING = frozenset({SeriesState.RECEIVING, SeriesState.STABLE})


def _in(column: ColumnElement[str], states: frozenset[StrEnum]) -> ColumnElement[bool]:
    return column.in_(sorted(states))  # sorted: the same SQL text each time (statement cache)


def job_active(job: Any) -> ColumnElement[bool]:
    """Condition on ``job`` (the table or an alias of it): the job is pending or running."""
    return _in(job.c.state, JOB_ACTIVE)


def series_tracking(series: Any) -> ColumnElement[bool]:
    """Condition on ``series``: the tracker still follows it (receiving or stable)."""
    return _in(series.c.state, SERIES_TRACKING)


def delivery_in_flight(delivery: Any) -> ColumnElement[bool]:
    """Condition on ``delivery``: queued or being sent."""
    return _in(delivery.c.state, DELIVERY_IN_FLIGHT)


def delivery_settling(delivery: Any) -> ColumnElement[bool]:
    """Condition on ``delivery``: it will still change by itself (in flight, or its commitment is awaited).

    A discard job waits while a delivery of its series is settling; failed or cancelled ones would
    never settle, so it does not wait for those (it refuses to delete instead: see
    :func:`delivery_not_arrived`).
    """
    return or_(delivery_in_flight(delivery), delivery.c.commitment == CommitmentState.REQUESTED)


def delivery_not_arrived(delivery: Any, *, cancelled: bool = True) -> ColumnElement[bool]:
    """Condition on ``delivery``: the instance has not (yet) arrived, or its storage is not confirmed.

    With ``cancelled=False`` a cancelled delivery counts as finished: an operator decided it will not
    be sent, so retention does not keep old data for ever because of it; a discard right after a
    forward keeps the stricter reading and waits for arrival.
    """
    states = frozenset(DeliveryState) - {DeliveryState.DELIVERED}
    if not cancelled:
        states -= {DeliveryState.CANCELLED}
    return or_(
        _in(delivery.c.state, states),
        and_(delivery.c.state == DeliveryState.DELIVERED, _in(delivery.c.commitment, COMMITMENT_NOT_CONFIRMED)),
    )
