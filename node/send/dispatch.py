"""Sends the forward queue: per destination, ``max_associations`` workers, a back-off and a breaker.

Each destination has its own worker threads, so a dead PACS only ever
occupies its own. A worker claims a batch of due deliveries (in queue
order, which is series order), sends it over its association, and keeps the
association open for the next batch while the queue has more. A ``type = "dicomweb"``
destination's workers send by STOW-RS instead (:mod:`node.send.stow`, over a kept-alive
HTTP connection); everything below applies to both.

A transient failure (refused, reset, timed out, rejected as transient,
0xA7xx) opens the destination's circuit: nothing is tried until its back-off
has passed (``initial_delay * multiplier**(n-1)``, at most ``max_delay``, with
jitter); then one worker probes, and a delivery closes the circuit. The probe
is a turn (:meth:`Breaker.turn`) that is released however it ends, so a probe
whose batch is refused for good (or that crashes, or is stopped) never leaves
the destination waiting. The failed and waiting deliveries are rescheduled for
that time, which is what ``dicom-node queue`` shows. A permanent failure fails
the delivery at once with the reason, without retrying.

The circuit (failure count and next try) is kept in the index and shared by
every node process sending to the destination (see :class:`Breaker`): an
outage one process sees is respected by all, one probe goes at a time across
the cluster, and a node restarted during an outage waits out the back-off and
goes on counting from where it was, instead of sending from every association
at once. Deliveries are claimed with this process as their owner; what a
process that is gone was sending is taken over on each heartbeat.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom.uid import generate_uid
from sqlalchemy import Engine

from node import metrics
from node.config import Config, DestinationSection, RetrySection
from node.index import read
from node.index.cluster import hold_duty
from node.index.models import utcnow
from node.index.states import DeliveryState
from node.send import queue
from node.send.failures import PROCESSING_FAILURE_ATTEMPTS
from node.send.scu import Item, Peer, Result, Sender
from node.send.stow import StowSender
from node.storage import Storage

log = logging.getLogger(__name__)

POLL = 2.0
#: Deliveries claimed at once by one worker.
BATCH = 32
#: An idle association is released after this many seconds without anything to send.
LINGER = 2.0
#: Outcomes are written at least this often while a batch is sent (seconds).
FLUSH_EVERY = 0.5
#: The duty (node.index.cluster.hold_duty) of the one process that resends what was never committed.
COMMITMENT_DUTY = "commitment-watchdog"
#: How often the watchdog looks for deliveries whose commitment never came (seconds).
COMMITMENT_EVERY = POLL * 5


@dataclass(frozen=True)
class Turn:
    """A worker's turn at a destination: wait this long first (0: go); ``probe``: it tests a half-open circuit."""

    wait: float
    probe: bool = False


def backoff(policy: RetrySection, n: int, rng: random.Random) -> float:
    """The back-off after the ``n``-th consecutive transient failure (seconds, with jitter)."""
    base = min(policy.max_delay, policy.initial_delay * policy.multiplier ** max(0, n - 1))
    return min(policy.max_delay, max(0.0, base * (1 + rng.uniform(-policy.jitter, policy.jitter))))


class Breaker:
    """A destination's circuit as this process sees it; the ``destination_circuit`` row is the truth for all.

    Closed: every worker sends. Open (after a transient failure, for its back-off): none does, in any
    process. Half-open (the back-off has passed): exactly one worker in the cluster probes, and the
    others wait until that turn ends. A worker reads the row (one primary-key SELECT) at the start of
    each turn, i.e. once per batch or idle poll, so an outage one process sees is respected by every
    other process from its next turn on: only batches already under way go on. Changes are
    compare-and-set on the row's version (:class:`node.send.queue.Circuit`): of the processes whose
    batches fail in the same outage, one counts it; of those that find the circuit half-open, one
    takes the probe; a delivery anywhere closes it for all.

    A turn ends however it ends (delivered, transient or permanent failure, nothing to send, an
    exception, the node stopping): :meth:`turn` releases the probe on the way out, so no outcome can
    leave the destination waiting for a probe that never finishes. A probe whose process died is
    given up after ``hold`` seconds (longer than a live probe can take). An index that cannot be reached leaves the
    breaker working on its own copy.
    """

    def __init__(
        self,
        policy: RetrySection,
        engine: Engine,
        destination: str,
        *,
        reader: Engine | None = None,
        hold: float = 30.0,
        rng: random.Random | None = None,
    ) -> None:
        self.policy = policy
        self.engine = engine
        self.reader = reader or engine
        self.destination = destination
        self.hold = hold
        self._rng = rng or random.Random()
        self._lock = threading.Lock()
        self._c = queue.Circuit()
        #: The version this process's probe wrote (None: it is not probing).
        self._probing: dt.datetime | None = None
        #: The circuit version each worker thread's turn was admitted in: a batch that began before the
        #: circuit last changed and fails late (a hung PACS answers after the back-off ended) is the
        #: same outage, not a new failure.
        self._admitted = threading.local()

    def delay(self, n: int) -> float:
        return backoff(self.policy, n, self._rng)

    @property
    def failures(self) -> int:
        return self._c.failures

    @property
    def retry_at(self) -> dt.datetime | None:
        """The wall-clock time of the next try while the circuit is open (None when closed)."""
        return self._c.retry_at if self._c.failures else None

    @property
    def state(self) -> str:
        c = self._c
        if c.failures == 0:
            return "closed"
        return "open" if c.retry_at is not None and utcnow() < c.retry_at else "half-open"

    def restore(self, circuit: queue.Circuit) -> None:
        """Take up the circuit as read at start (an outage outlives a restart, and other processes' view)."""
        with self._lock:
            self._c = circuit

    def _refresh(self) -> None:
        """Read the shared row (under the lock); keeps this copy if the index cannot be read."""
        try:
            self._c = queue.read_circuit(self.reader, self.destination)
        except Exception as e:
            log.debug("destination %s: could not read its circuit: %s", self.destination, e)

    @contextmanager
    def turn(self) -> Iterator[Turn]:
        """A worker's turn; in a half-open circuit only one turn in the cluster goes, and it is released here."""
        t = self._admit()
        try:
            yield t
        finally:
            if t.probe:
                self._end_probe()

    def _admit(self) -> Turn:
        with self._lock:
            self._refresh()
            c, now = self._c, utcnow()
            self._admitted.version = c.updated_at
            if c.failures == 0:
                return Turn(0.0)
            left = (c.retry_at - now).total_seconds() if c.retry_at is not None else 0.0
            if left > 0:
                return Turn(left)
            wait = min(POLL, self.policy.initial_delay or POLL)
            since = c.probe_since
            if self._probing is not None or (since is not None and (now - since).total_seconds() < self.hold):
                return Turn(wait)  # a probe is under way, here or in another process
            try:
                took = queue.take_probe(self.engine, self.destination, c, now)
            except Exception as e:
                log.warning("destination %s: could not take the probe of its circuit: %s", self.destination, e)
                return Turn(wait)
            if not took:  # another process changed the circuit first (took the probe, or closed it)
                self._refresh()
                return Turn(0.0 if self._c.failures == 0 else wait)
            self._c = dataclasses.replace(c, updated_at=now)
            self._probing = self._admitted.version = now
            return Turn(0.0, probe=True)

    def _end_probe(self) -> None:
        """The probe's turn ended: if it left no verdict, the next turn (in any process) probes at once."""
        with self._lock:
            mark, self._probing = self._probing, None
            if mark is None or self._c.updated_at != mark:
                return  # a delivery closed the circuit or a failure counted: the row says what next
            try:
                queue.end_probe(self.engine, self.destination, mark)
            except Exception as e:
                log.warning("destination %s: could not release the probe of its circuit: %s", self.destination, e)
            self._refresh()

    def success(self) -> bool:
        """The destination took an instance: the circuit closes for all. Returns whether this closed it."""
        with self._lock:
            if self._c.failures == 0:
                return False
            try:
                closed = queue.close_circuit(self.engine, self.destination)
            except Exception as e:
                log.warning("destination %s: could not record its circuit closed: %s", self.destination, e)
                self._c = queue.Circuit(updated_at=utcnow())
                return True
            self._refresh()
            return closed

    def probe_now(self) -> bool:
        """End the current back-off early for all (an operator's retry): the next turn probes. False if it had ended."""
        with self._lock:
            self._refresh()
            c, now = self._c, utcnow()
            if not (c.failures and c.retry_at is not None and now < c.retry_at):
                return False
            try:
                ended = queue.end_backoff(self.engine, self.destination, c, now)
            except Exception as e:
                log.warning("destination %s: could not end the back-off: %s", self.destination, e)
                return False
            if ended:
                self._c = dataclasses.replace(c, retry_at=now, updated_at=now)
            else:
                self._refresh()
            return ended

    def failure(self, error: str = "", at_least: float = 0.0) -> tuple[bool, float, dt.datetime]:
        """Count a transient failure; returns (counted, delay, when to try again).

        ``at_least``: the wait the destination asked for (HTTP Retry-After); it lengthens the back-off, up to
        ``max_delay`` (the operator's bound on any wait).

        A failure reported while the circuit is already open, by a worker whose turn was admitted
        before the circuit last changed, or after another process counted it first, comes from an
        attempt that began before it opened (another worker's batch, here or in another process, in
        flight when the first one failed, however late it fails): the same outage, so it neither
        counts again nor lengthens the back-off.
        """
        with self._lock:
            admitted = getattr(self._admitted, "version", self._c.updated_at)
            for _ in range(3):
                c, now = self._c, utcnow()
                stale = admitted != c.updated_at
                if c.failures and c.retry_at is not None and (now < c.retry_at or stale):
                    return False, max(0.0, (c.retry_at - now).total_seconds()), c.retry_at
                n = c.failures + 1
                d = max(self.delay(n), min(at_least, self.policy.max_delay))
                at = now + dt.timedelta(seconds=d)
                try:
                    counted = queue.circuit_failed(self.engine, self.destination, c, n, at, error, now)
                except Exception as e:
                    log.warning("destination %s: could not record its circuit: %s", self.destination, e)
                    counted = True  # on its own copy until the index answers again
                if counted:
                    self._c = queue.Circuit(n, at, error, now)
                    return True, d, at
                self._refresh()  # another process changed it: is it this outage, counted?
                if not self._c.failures:  # closed meanwhile: this failure is a new outage
                    admitted = self._c.updated_at
            at = self._c.retry_at or utcnow()
            return False, max(0.0, (at - utcnow()).total_seconds()), at


class ItemSender(Protocol):
    """What a worker sends with: a connection to one destination, opened on demand, kept while there is more.

    :class:`node.send.scu.Sender` (C-STORE) and :class:`node.send.stow.StowSender` (STOW-RS) have this shape, so
    the queue, back-off, breaker, audit and metrics do not depend on the destination's type.
    """

    @property
    def open(self) -> bool:
        """Whether it holds a connection (released after LINGER without anything to send)."""
        ...

    def send(
        self,
        items: list[Item],
        on_result: Callable[[Result], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Result]: ...

    def close(self) -> None: ...

    def request_commitment(self, transaction_uid: str, refs: list[tuple[str, str]]) -> str: ...


#: The sender of each ``[[destinations]] type``, given the destination and the node's AE title.
SENDERS: dict[str, Callable[[DestinationSection, str], ItemSender]] = {
    "dimse": lambda d, node_ae: Sender(Peer.from_destination(d, node_ae)),
    "dicomweb": lambda d, node_ae: StowSender(d),
}


@dataclass
class _Worker:
    """One sender thread's connection and how long it has had nothing to send."""

    sender: ItemSender
    idle_since: float | None = None


def _claimed(item: Item) -> queue.Item:
    """The claimed delivery an item to send was made for (the sender's key; see _send_batch)."""
    c = item.key
    if not isinstance(c, queue.Item):
        raise TypeError(f"an item to send without its claimed delivery: {item}")
    return c


class DestinationSender:
    """The workers, back-off and wake-up of one destination."""

    def __init__(
        self,
        cfg: Config,
        d: DestinationSection,
        engine: Engine,
        storage: Storage,
        reader: Engine,
        stop: threading.Event,
        owner: str,
    ) -> None:
        self.cfg = cfg
        self.dest = d
        self.engine = engine
        self.reader = reader
        self.storage = storage
        #: This node process (node.index.cluster): the owner of the deliveries it claims.
        self.owner = owner
        # A probe that delivers closes the circuit at its first instance; one that fails mostly does so
        # within the destination's timeout. Past that and the lease, its process is taken to be gone (a
        # probe still waiting for a hung PACS then has company: one more try, not a wedged destination).
        self.breaker = Breaker(d.retry, engine, d.name, reader=reader, hold=max(cfg.node.lease, d.timeout))
        self._stop = stop
        self._wake = threading.Condition()
        self._woken = False
        self._claim_lock = threading.Lock()
        self.threads = [
            threading.Thread(target=self._work, name=f"send-{d.name}-{i}", daemon=True)
            for i in range(d.max_associations)
        ]

    def wake(self) -> None:
        with self._wake:
            self._woken = True
            self._wake.notify_all()

    def _sleep(self, seconds: float) -> None:
        with self._wake:
            if not self._woken and not self._stop.is_set():
                self._wake.wait(max(0.01, seconds))
            self._woken = False

    def _postpone(self) -> None:
        """Deliveries queued while the circuit is open show (in ``dicom-node queue``) when they will go.

        (Those queued before the failure were postponed with it: node.send.queue.circuit_failed.)
        """
        until = self.breaker.retry_at
        if until is not None:
            try:
                queue.postpone(self.engine, self.dest.name, until)
            except Exception as e:
                log.debug("destination %s: could not postpone queued deliveries: %s", self.dest.name, e)

    def _forced(self) -> bool:
        """Whether an operator made deliveries due at once (``dicom-node queue retry``)."""
        try:
            due = queue.next_due(self.reader, self.dest.name)
        except Exception:
            return False
        return due is not None and due <= queue.FORCED

    def _idle_wait(self) -> float:
        try:
            due = queue.next_due(self.reader, self.dest.name)
        except Exception:
            return POLL
        if due is None:
            return POLL
        return min(POLL, max(0.01, (due - utcnow()).total_seconds()))

    def restore(self, circuit: queue.Circuit) -> None:
        """Take up the circuit as it is: a destination that was down is not hammered after a restart."""
        self.breaker.restore(circuit)
        if circuit.failures:
            log.warning(
                "destination %s: %d consecutive failure(s) before the node stopped (last: %s); next try at "
                "%s, then backing off from there",
                self.dest.name,
                circuit.failures,
                circuit.last_error,
                circuit.retry_at.isoformat(timespec="seconds") if circuit.retry_at else "once started",
                extra={"destination": self.dest.name},
            )

    def _work(self) -> None:
        w = _Worker(SENDERS[self.dest.type](self.dest, self.cfg.node.ae_title))
        try:
            while not self._stop.is_set():
                if self.breaker.state == "open" and self._forced() and self.breaker.probe_now():
                    log.info(
                        "destination %s: an operator asked to retry now; trying before the back-off ends",
                        self.dest.name,
                    )
                with self.breaker.turn() as turn:
                    if turn.wait > 0:
                        w.sender.close()
                        if threading.current_thread() is self.threads[0]:
                            self._postpone()
                        pause = min(turn.wait, POLL)
                    else:
                        pause = self._round(w, turn.probe)
                if pause:  # outside the turn: a probe that found nothing to send does not hold the others back
                    self._sleep(pause)
        finally:
            w.sender.close()

    def _round(self, w: _Worker, probe: bool = False) -> float:
        """Claim a batch and send it (``probe``: it tests a half-open circuit); returns the pause before the next."""
        try:
            with self._claim_lock:
                items = queue.claim(self.engine, self.dest.name, BATCH, self.owner)
        except Exception as e:
            log.error("destination %s: cannot read the delivery queue: %s", self.dest.name, e)
            return POLL
        if not items:
            now = time.monotonic()
            w.idle_since = w.idle_since or now
            if w.sender.open and now - w.idle_since >= LINGER:
                w.sender.close()
            return min(self._idle_wait(), LINGER if w.sender.open else POLL)
        w.idle_since = None
        if probe:
            log.info(
                "destination %s: trying again after %d consecutive failure(s) with %d instance(s); the other "
                "associations wait for this one",
                self.dest.name,
                self.breaker.failures,
                len(items),
                extra={"destination": self.dest.name},
            )
        try:
            self._send_batch(w.sender, items)
        except Exception as e:  # a bug must not kill the worker, nor leave rows "sending"
            log.exception("destination %s: unexpected error while sending", self.dest.name)
            w.sender.close()
            try:
                queue.release(self.engine, [c.id for c in items], f"internal error while sending: {e}", self.owner)
            except Exception:
                log.exception(
                    "destination %s: could not put the batch back (it is taken over once this process is gone)",
                    self.dest.name,
                )
            return POLL
        return 0.0

    def _send_batch(self, sender: ItemSender, claimed: list[queue.Item]) -> None:
        t0 = time.monotonic()
        items: list[Item] = []
        outcomes: list[queue.Outcome] = []
        for c in claimed:
            path = self.storage.absolute(c.file_path) if c.file_path else None
            if c.instance_id is None or path is None or not path.is_file():
                outcomes.append(
                    queue.Outcome(
                        c.id,
                        DeliveryState.FAILED,
                        error="the instance is no longer stored on this node (deleted or discarded before it was sent)",
                        **self._who(c),
                    )
                )
                metrics.DELIVERY_RESULTS.labels(self.dest.name, "permanent").inc()
                continue
            items.append(Item(Path(path), c.sop_class_uid, c.transfer_syntax_uid, c.sop_instance_uid, key=c))
        commit = self.dest.storage_commitment
        last_flush = [time.monotonic()]
        delivered = 0
        retry_at: list[dt.datetime] = []
        on_wire = [time.monotonic()]

        def on_result(r: Result) -> None:
            nonlocal delivered
            now = time.monotonic()
            if r.attempted:
                metrics.DELIVERY_SECONDS.labels(self.dest.name).observe(now - on_wire[0])
            on_wire[0] = now
            outcomes.append(self._outcome(r, retry_at))
            delivered += r.outcome == "delivered"
            if not commit and time.monotonic() - last_flush[0] >= FLUSH_EVERY:
                queue.record(self.engine, outcomes, self.owner)
                outcomes.clear()
                last_flush[0] = time.monotonic()

        results = sender.send(items, on_result, cancelled=self._stop.is_set)
        if len(results) < len(items):  # stopping: what was not sent goes back, not counted as an attempt
            sent = {id(r.item) for r in results}
            outcomes.extend(
                queue.Outcome(_claimed(it).id, DeliveryState.QUEUED, error="", attempted=False)
                for it in items
                if id(it) not in sent
            )
        if commit:
            self._request_commitment(sender, outcomes, items)
        queue.record(self.engine, outcomes, self.owner)
        failed = [r for r in results if r.outcome == "permanent"]
        waiting = [r for r in results if r.outcome == "transient"]
        took = time.monotonic() - t0
        if delivered:
            log.info(
                "destination %s: %d instance(s) delivered in %.2f s%s",
                self.dest.name,
                delivered,
                took,
                f", {len(failed)} failed, {len(waiting)} waiting" if failed or waiting else "",
                extra={"destination": self.dest.name, "delivered": delivered},
            )
        for r in failed:
            log.error(
                "destination %s: %s not delivered, not retried: %s",
                self.dest.name,
                r.item.sop_instance,
                r.text,
                extra={"destination": self.dest.name, "sop_instance_uid": r.item.sop_instance},
            )

    def _who(self, c: queue.Item) -> dict[str, Any]:
        """An outcome's fields for the audit trail."""
        return {"destination": self.dest.name, "sop_instance_uid": c.sop_instance_uid, "job_id": c.job_id}

    def _outcome(self, r: Result, retry_at: list[dt.datetime]) -> queue.Outcome:
        c = _claimed(r.item)
        if r.attempted:
            metrics.DELIVERY_RESULTS.labels(self.dest.name, r.outcome).inc()
        if r.outcome == "delivered":
            if self.breaker.success():
                log.info(
                    "destination %s: delivering again; circuit closed",
                    self.dest.name,
                    extra={"destination": self.dest.name},
                )
            metrics.INSTANCES_SENT.labels(self.dest.name).inc()
            metrics.BYTES_SENT.labels(self.dest.name).inc(c.file_size)
            metrics.DELIVERY_LATENCY.labels(self.dest.name).observe(max(0.0, (utcnow() - c.created_at).total_seconds()))
            if r.warning:
                log.warning(
                    "destination %s: %s stored with a warning: %s",
                    self.dest.name,
                    c.sop_instance_uid,
                    r.warning,
                    extra={"destination": self.dest.name},
                )
            return queue.Outcome(
                c.id, DeliveryState.DELIVERED, r.status, warning=r.warning, sent_syntax=r.sent_syntax, **self._who(c)
            )
        if r.outcome == "permanent":
            return queue.Outcome(c.id, DeliveryState.FAILED, r.status, r.text, **self._who(c))
        # Transient: the first such result of a batch counts as one failure of the destination.
        if not retry_at:
            counted, delay, when = self.breaker.failure(r.text, r.retry_after or 0.0)
            retry_at.append(when)
            if counted:
                log.warning(
                    "destination %s: %s; %d consecutive failure(s), next try in %.0f s (at %s)",
                    self.dest.name,
                    r.text,
                    self.breaker.failures,
                    delay,
                    when.isoformat(timespec="seconds"),
                    extra={"destination": self.dest.name},
                )
        give_up = self.dest.retry.give_up_after
        age = (utcnow() - c.created_at).total_seconds()
        if give_up and age >= give_up:
            return queue.Outcome(
                c.id,
                DeliveryState.FAILED,
                r.status,
                f"gave up after {c.attempts} attempt(s) over {age / 3600:.1f} h (retry.give_up_after): {r.text}",
                **self._who(c),
            )
        if r.status == 0x0110 and c.attempts >= PROCESSING_FAILURE_ATTEMPTS:
            return queue.Outcome(c.id, DeliveryState.FAILED, r.status, f"{r.text} ({c.attempts} times)", **self._who(c))
        return queue.Outcome(c.id, DeliveryState.QUEUED, r.status, r.text, retry_at=retry_at[0], attempted=r.attempted)

    def _request_commitment(self, sender: ItemSender, outcomes: list[queue.Outcome], items: list[Item]) -> None:
        by_id = {_claimed(it).id: it for it in items}
        delivered = [o for o in outcomes if o.state == DeliveryState.DELIVERED and o.id in by_id]
        if not delivered:
            return
        uid = str(generate_uid())
        refs = [(by_id[o.id].sop_class, by_id[o.id].sop_instance) for o in delivered]
        problem = sender.request_commitment(uid, refs)
        for n, o in enumerate(outcomes):
            if o.state == DeliveryState.DELIVERED and o.id in by_id:
                outcomes[n] = dataclasses.replace(o, error=problem, commitment_uid="" if problem else uid)
        if problem:
            log.error(
                "destination %s: %d instance(s) delivered but not committed: %s", self.dest.name, len(refs), problem
            )
        else:
            log.info(
                "destination %s: storage commitment requested for %d instance(s) (transaction %s)",
                self.dest.name,
                len(refs),
                uid,
            )


class Dispatcher:
    """All destinations' senders; ``wake()`` after queuing, ``stop()`` to finish the batches in flight.

    ``owner`` is this node process (node.index.cluster); :meth:`take_over` (at start and on every
    heartbeat) queues again what processes that are gone left being sent. The Storage Commitment
    watchdog runs in one process of the cluster at a time (duty ``commitment-watchdog``).
    """

    def __init__(
        self, cfg: Config, engine: Engine, storage: Storage, reader: Engine | None = None, *, owner: str
    ) -> None:
        self.cfg = cfg
        self.engine = engine
        self.owner = owner
        self._stop = threading.Event()
        self.senders = {
            d.name: DestinationSender(cfg, d, engine, storage, reader or engine, self._stop, owner)
            for d in cfg.destinations
        }
        self._watchdog = threading.Thread(target=self._commitments, name="commitment-watchdog", daemon=True)

    def start(self) -> None:
        self._take_over(None)  # every destination: also those no longer configured
        known = set(self.senders)
        for dest, states in read.delivery_counts(self.engine).items():
            waiting = states.get(DeliveryState.QUEUED, 0)
            if dest not in known and waiting:
                log.warning(
                    "%d deliveries are queued for destination %r, which is not in the config: they wait "
                    "until it is configured again (or: dicom-node queue cancel --destination %s)",
                    waiting,
                    dest,
                    dest,
                )
            elif waiting:
                log.info("destination %s: %d deliveries queued", dest, waiting)
        for name, state in queue.load_circuits(self.engine, list(self.senders)).items():
            self.senders[name].restore(state)
        for s in self.senders.values():
            for t in s.threads:
                t.start()
        if any(d.storage_commitment for d in self.cfg.destinations):
            self._watchdog.start()

    def take_over(self) -> None:
        """Queue again what node processes that are gone were sending here, and wake those destinations' senders."""
        self._take_over(list(self.senders))

    def _take_over(self, destinations: list[str] | None) -> None:
        taken = queue.take_over(self.engine, utcnow(), destinations)
        for dest, n in sorted(taken.items()):
            log.warning(
                "destination %s: %d deliveries were being sent by a node process that is gone: sending them again",
                dest,
                n,
                extra={"destination": dest},
            )
        self.wake(list(taken))

    def wake(self, destinations: list[str] | None = None) -> None:
        for name, s in self.senders.items():
            if destinations is None or name in destinations:
                s.wake()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        for s in self.senders.values():
            s.wake()
        deadline = time.monotonic() + timeout
        for s in self.senders.values():
            for t in s.threads:
                if t.is_alive():
                    t.join(max(0.0, deadline - time.monotonic()))

    def _commitments(self) -> None:
        """The Storage Commitment watchdog's thread: a check every few polls."""
        while not self._stop.wait(COMMITMENT_EVERY):
            self.check_commitments()

    def check_commitments(self) -> int:
        """Send again (and ask to commit again) what was never confirmed in time; returns how many.

        Only in the holder of duty ``commitment-watchdog``, renewed at each check: one process of the
        cluster resends, and one that dies hands it on after the lease (or three checks, if longer).
        """
        try:
            lease = max(self.cfg.node.lease, 3 * COMMITMENT_EVERY)
            if not hold_duty(self.engine, COMMITMENT_DUTY, self.owner, lease):
                return 0
        except Exception as e:
            log.error("storage commitment watchdog: cannot take its duty in the index: %s", e)
            return 0
        total = 0
        for d in self.cfg.destinations:
            if not d.storage_commitment:
                continue
            try:
                late = queue.commitment_overdue(
                    self.engine, d.name, utcnow() - dt.timedelta(seconds=d.commitment_timeout)
                )
                if late:
                    n = queue.resend(
                        self.engine,
                        late,
                        f"no storage commitment report within {d.commitment_timeout:g} s; sending again",
                    )
                    log.warning(
                        "destination %s: %d instance(s) never confirmed by storage commitment: sending again", d.name, n
                    )
                    total += n
                    self.senders[d.name].wake()
            except Exception as e:
                log.error("storage commitment watchdog: %s", e)
        return total

    def commitment_report(self, transaction_uid: str, committed: list[str], failed: dict[str, str]) -> None:
        """An N-EVENT-REPORT arrived: committed instances are done; failed ones are sent again."""
        ok, bad = queue.commitment_result(self.engine, transaction_uid, committed, failed)
        log.info("storage commitment transaction %s: %d committed, %d failed", transaction_uid, ok, len(bad))
        if bad:
            n = queue.resend(self.engine, bad, "storage commitment failed: " + "; ".join(sorted(set(failed.values()))))
            log.warning("storage commitment: %d instance(s) reported failed; sending them again", n)
            self.wake()
