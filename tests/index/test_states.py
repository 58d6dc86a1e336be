"""The one vocabulary of states: the values stored in the index, and the groups the node decides by.

The conditions are checked against a real (SQLite) index: each delivery state and commitment is a
row, and the test asserts which rows each named condition selects.
"""

from __future__ import annotations

import itertools

import pytest
from sqlalchemy import select

from node.index.db import make_engine, migrate
from node.index.models import Delivery, Job, Patient, Series, Study
from node.index.states import (
    DELIVERY_IN_FLIGHT,
    JOB_ACTIVE,
    SERIES_TRACKING,
    CommitmentState,
    DeliveryState,
    JobState,
    SeriesState,
    delivery_in_flight,
    delivery_not_arrived,
    delivery_settling,
    job_active,
    series_tracking,
)


def test_values_are_the_strings_stored_in_the_index():
    # Changing one of these needs a migration of the stored rows: this test says so.
    assert [str(s) for s in JobState] == ["pending", "running", "succeeded", "failed", "cancelled"]
    assert [str(s) for s in DeliveryState] == ["queued", "sending", "delivered", "failed", "cancelled"]
    assert [str(s) for s in SeriesState] == ["receiving", "stable", "triggered"]
    assert [str(s) for s in CommitmentState] == ["", "requested", "committed", "failed"]
    # A member is its stored string: it compares, formats and hashes as one.
    assert JobState.RUNNING == "running" and f"{DeliveryState.QUEUED}" == "queued"
    assert "delivered" in {DeliveryState.DELIVERED}


def test_the_models_default_to_the_first_state():
    assert Job.__table__.c.state.default.arg == JobState.PENDING
    assert Delivery.__table__.c.state.default.arg == DeliveryState.QUEUED
    assert Delivery.__table__.c.commitment.default.arg == CommitmentState.NONE
    assert Series.__table__.c.state.default.arg == SeriesState.RECEIVING


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    """One delivery per (state, commitment), one job per state, one series per state, in a migrated index."""
    engine = make_engine(f"sqlite:///{tmp_path_factory.mktemp('states') / 'index.sqlite'}")
    migrate(engine)
    d, j, s = Delivery.__table__, Job.__table__, Series.__table__
    with engine.begin() as conn:
        conn.execute(Patient.__table__.insert().values(id=1))
        conn.execute(Study.__table__.insert().values(id=1, study_instance_uid="1.2.3", patient_fk=1))
        for n, state in enumerate(SeriesState, 1):
            conn.execute(s.insert().values(id=n, series_instance_uid=f"1.2.3.{n}", study_fk=1, state=state))
        for n, state in enumerate(JobState, 1):
            conn.execute(
                j.insert().values(
                    id=n,
                    series_fk=1,
                    revision=1,
                    rule=f"r{n}",
                    action_index=0,
                    kind="forward",
                    action="{}",
                    state=state,
                )
            )
        for n, (state, commitment) in enumerate(itertools.product(DeliveryState, CommitmentState), 1):
            conn.execute(
                d.insert().values(
                    id=n,
                    series_fk=1,
                    destination="pacs",
                    sop_instance_uid=f"1.2.3.4.{n}",
                    state=state,
                    commitment=commitment,
                )
            )
    yield engine
    engine.dispose()


def _deliveries(engine, cond) -> set[tuple[str, str]]:
    d = Delivery.__table__
    with engine.connect() as conn:
        return {(r.state, r.commitment) for r in conn.execute(select(d.c.state, d.c.commitment).where(cond))}


def _every(states, commitments=tuple(CommitmentState)) -> set[tuple[str, str]]:
    return {(str(s), str(c)) for s in states for c in commitments}


def test_in_flight_is_queued_or_sending(rows):
    assert DELIVERY_IN_FLIGHT == {"queued", "sending"}
    assert _deliveries(rows, delivery_in_flight(Delivery.__table__)) == _every(DELIVERY_IN_FLIGHT)


def test_settling_is_in_flight_or_awaiting_commitment(rows):
    # What a discard waits for: what will still change without an operator.
    expected = _every(DELIVERY_IN_FLIGHT) | _every(DeliveryState, [CommitmentState.REQUESTED])
    assert _deliveries(rows, delivery_settling(Delivery.__table__)) == expected


def test_not_arrived_counts_failed_and_unconfirmed_and_cancelled_unless_told(rows):
    d = Delivery.__table__
    not_delivered = [s for s in DeliveryState if s != DeliveryState.DELIVERED]
    unconfirmed = _every([DeliveryState.DELIVERED], [CommitmentState.REQUESTED, CommitmentState.FAILED])
    # The discard's check: anything not (confirmed) delivered, a cancelled delivery too.
    assert _deliveries(rows, delivery_not_arrived(d)) == _every(not_delivered) | unconfirmed
    # Retention's: an operator's cancel releases the series.
    without_cancelled = [s for s in not_delivered if s != DeliveryState.CANCELLED]
    assert _deliveries(rows, delivery_not_arrived(d, cancelled=False)) == _every(without_cancelled) | unconfirmed
    # A delivered instance with no commitment asked for, or a confirmed one, has arrived.
    arrived = _every([DeliveryState.DELIVERED], [CommitmentState.NONE, CommitmentState.COMMITTED])
    assert not arrived & _deliveries(rows, delivery_not_arrived(d))


def test_active_jobs_and_tracked_series(rows):
    j, s = Job.__table__, Series.__table__
    with rows.connect() as conn:
        assert (
            set(conn.execute(select(j.c.state).where(job_active(j))).scalars()) == JOB_ACTIVE == {"pending", "running"}
        )
        # The condition works on an alias too (the job store compares a job with the other jobs of its series).
        other = j.alias("other")
        assert set(conn.execute(select(other.c.state).where(~job_active(other))).scalars()) == {
            "succeeded",
            "failed",
            "cancelled",
        }
        assert set(conn.execute(select(s.c.state).where(series_tracking(s))).scalars()) == SERIES_TRACKING
        assert set(conn.execute(select(s.c.state).where(~series_tracking(s))).scalars()) == {"triggered"}
