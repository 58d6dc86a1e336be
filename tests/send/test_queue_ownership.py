"""The forward queue shared by several node processes (node.send.queue, issue 16), on SQLite and PostgreSQL.

What a user relies on: every delivery is claimed by one process at a time; a process's late outcome
never overwrites what happened to the delivery since (another process took it over, an operator
cancelled it); what a process that is gone was sending is queued again, and what a live process is
sending is left alone. Processes are real registrations (node.index.cluster.Membership) in the index.
"""

from __future__ import annotations

import logging
import threading

from queue_index import Index
from sqlalchemy import func, select

from node.index.models import AuditEvent, Delivery
from node.index.states import DeliveryState
from node.send import queue


def _delivered_events(index: Index) -> list[str]:
    a = AuditEvent.__table__
    with index.engine.connect() as conn:
        return list(conn.execute(select(a.c.sop_instance_uid).where(a.c.kind == "delivered")).scalars())


def _queued(engine) -> int:  # type: ignore[no-untyped-def]
    d = Delivery.__table__
    with engine.connect() as conn:
        return conn.execute(select(func.count()).where(d.c.state == DeliveryState.QUEUED)).scalar_one()


def test_two_processes_claiming_at_once_take_each_delivery_once(index: Index) -> None:
    """Two claimers empty one queue at the same time, batch by batch: every delivery goes to exactly one.

    A claim that lost a race for rows (read them, then found them taken) would come back empty while
    more than the other claimer's batch is left: on PostgreSQL that is what ``SKIP LOCKED`` prevents.
    """
    ids = index.queue(300)
    procs = [index.process(), index.process()]
    start = threading.Barrier(len(procs))
    claimed: dict[str, list[int]] = {p.id: [] for p in procs}
    empty_while_left: list[int] = []
    errors: list[BaseException] = []

    def claim(owner: str) -> None:
        engine = index.connect()
        try:
            start.wait(10)
            for _ in range(1000):
                batch = queue.claim(engine, "pacs", 7, owner)
                claimed[owner].extend(c.id for c in batch)
                if not batch:
                    left = _queued(engine)
                    if left == 0:
                        return
                    if left > 7:  # more than the other claimer can hold locked
                        empty_while_left.append(left)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=claim, args=(p.id,)) for p in procs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    a, b = (claimed[p.id] for p in procs)
    assert not set(a) & set(b), "a delivery was claimed by both processes"
    assert sorted(a + b) == ids, "every delivery claimed once"
    assert empty_while_left == [], "a claim came back empty while deliveries were waiting"
    owners = {i: owner for i, state, owner, _, _ in index.deliveries() if state == DeliveryState.SENDING}
    assert owners == {**{i: procs[0].id for i in a}, **{i: procs[1].id for i in b}}, "each row names its claimer"


def test_the_outcome_of_a_process_that_no_longer_owns_the_delivery_is_ignored(index: Index, caplog) -> None:
    """A process thought gone (its lease ran out) comes back and reports: the new owner's row is left alone."""
    (did,) = index.queue(1)
    slow, other = index.process(), index.process()
    (item,) = queue.claim(index.engine, "pacs", 10, slow.id)
    delivered = queue.Outcome(item.id, DeliveryState.DELIVERED, 0, destination="pacs", sop_instance_uid="1.2.3")

    queue.record(index.connect(), [delivered], other.id)  # not its row
    assert index.deliveries()[0][1:3] == (DeliveryState.SENDING, slow.id), "a non-owner's outcome changed the row"

    slow.stop(clean=False)  # its lease ends: the row is taken over and claimed by the other process
    assert queue.take_over(index.engine) == {"pacs": 1}
    (again,) = queue.claim(index.engine, "pacs", 10, other.id)
    assert again.id == did
    with caplog.at_level(logging.WARNING, logger="node.send.queue"):
        queue.record(index.engine, [delivered], slow.id)
    assert index.deliveries()[0][1:3] == (DeliveryState.SENDING, other.id), "the late outcome overwrote the new owner's"
    assert _delivered_events(index) == [], "an outcome not recorded is not audited"
    assert f"delivery id(s) {did}: outcome (delivered) not recorded: no longer this process's" in caplog.text
    assert queue.release(index.engine, [did], "internal error", slow.id) == 0, "nor may it put the row back"

    queue.record(index.engine, [delivered], other.id)
    assert index.deliveries()[0][1:3] == (DeliveryState.DELIVERED, None), "the owner's outcome is recorded"
    assert _delivered_events(index) == ["1.2.3"]


def test_an_instance_delivered_after_an_operator_cancelled_it_is_recorded_as_delivered(index: Index) -> None:
    ids = index.queue(2)
    p = index.process()
    claimed = queue.claim(index.engine, "pacs", 10, p.id)
    assert queue.cancel(index.engine, ids=ids) == 2
    queue.record(
        index.engine,
        [
            queue.Outcome(claimed[0].id, DeliveryState.DELIVERED, 0),
            queue.Outcome(claimed[1].id, DeliveryState.QUEUED, None, "connection refused"),
        ],
        p.id,
    )
    assert [r[1] for r in index.deliveries()] == [DeliveryState.DELIVERED, DeliveryState.CANCELLED]
    assert queue.retry(index.engine, ids=ids) == 1
    assert index.deliveries()[1][1:3] == (DeliveryState.QUEUED, None), "queued again, owned by nobody"


def test_take_over_queues_again_only_what_processes_that_are_gone_were_sending(index: Index) -> None:
    live, dead = index.process(), index.process()
    index.queue(6)
    mine = queue.claim(index.engine, "pacs", 3, live.id)
    lost = queue.claim(index.engine, "pacs", 3, dead.id)

    assert queue.take_over(index.engine) == {}, "nothing is taken from live processes"
    assert {r[2] for r in index.deliveries()} == {live.id, dead.id}

    dead.stop(clean=False)  # killed: its lease ends without a clean stop
    assert queue.take_over(index.engine, destinations=["archive"]) == {}, "only the destinations asked for"
    assert queue.take_over(index.engine, destinations=["pacs", "archive"]) == {"pacs": 3}
    rows = {r[0]: r for r in index.deliveries()}
    for c in lost:
        _, state, owner, attempts, why = rows[c.id]
        assert (state, owner, attempts) == (DeliveryState.QUEUED, None, 1)
        assert why == f"node process {dead.id} stopped while this was being sent; sending it again"
    for c in mine:
        assert rows[c.id][1:3] == (DeliveryState.SENDING, live.id), "a live process's delivery was taken"
    assert sorted(c.id for c in queue.claim(index.engine, "pacs", 10, live.id)) == sorted(c.id for c in lost)
    assert queue.take_over(index.engine) == {}, "taken over once"


def test_two_jobs_queueing_the_same_instances_at_once_make_one_delivery_each(index: Index) -> None:
    """Two processes' jobs forward the same instances to one destination in overlapping transactions.

    Each reads the existing rows before the other has committed its own: the second INSERT must not fail
    on the (instance, destination) constraint (the job would fail and run again); one row per instance.
    """
    d = Delivery.__table__
    ids = index.queue(40, destination="other")  # instances that exist; their deliveries go elsewhere
    with index.engine.connect() as conn:
        instances = list(conn.execute(select(d.c.instance_fk).where(d.c.id.in_(ids))).scalars())
    a, b = index.connect(), index.connect()
    with a.begin() as ca:
        first = queue.enqueue(ca, instances, ["pacs"])
        results: list[queue.Enqueued] = []
        errors: list[BaseException] = []

        def second() -> None:
            try:
                with b.begin() as cb:
                    results.append(queue.enqueue(cb, instances, ["pacs"]))
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=second)
        t.start()
        t.join(1.0)  # on PostgreSQL it waits for our rows' fate; on SQLite for the write lock
    t.join(30)
    assert not errors, errors
    assert first.new == 40
    assert results and results[0].new == 0 and results[0].already == 40
    with index.engine.connect() as conn:
        n = conn.execute(select(func.count()).where(d.c.destination == "pacs")).scalar_one()
    assert n == 40
