"""Sends the forward queue: per destination, ``max_associations`` workers, a back-off and a breaker.

Each destination has its own worker threads, so a dead PACS only ever
occupies its own. A worker claims a batch of due deliveries (in queue
order, which is series order), sends it over its association, and keeps the
association open for the next batch while the queue has more.

A transient failure (refused, reset, timed out, rejected as transient,
0xA7xx) opens the destination's circuit: nothing is tried until its back-off
has passed (``initial_delay * multiplier**(n-1)``, at most ``max_delay``, with
jitter); then one worker probes, and a success closes the circuit. The
failed and waiting deliveries are rescheduled for that time, which is what
``dicom-node queue`` shows. A permanent failure fails the delivery at once
with the reason, without retrying.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import random
import threading
import time
from pathlib import Path

from pydicom.uid import generate_uid
from sqlalchemy import Engine

from node import metrics
from node.config import Config, DestinationSection
from node.index.models import utcnow
from node.send import queue
from node.send.failures import PROCESSING_FAILURE_ATTEMPTS
from node.send.scu import Item, Peer, Result, Sender
from node.storage import Storage

log = logging.getLogger(__name__)

POLL = 2.0
#: Deliveries claimed at once by one worker.
BATCH = 32
#: An idle association is released after this many seconds without anything to send.
LINGER = 2.0
#: Outcomes are written at least this often while a batch is sent (seconds).
FLUSH_EVERY = 0.5


class Breaker:
    """A destination's consecutive transient failures, back-off and circuit state (shared by its workers)."""

    def __init__(self, policy, rng: random.Random | None = None) -> None:  # type: ignore[no-untyped-def]
        self.policy = policy
        self.failures = 0
        self._open_until = 0.0  # monotonic
        #: The wall-clock time of the next try while the circuit is open.
        self.retry_at: dt.datetime | None = None
        self._probing = False
        self._lock = threading.Lock()
        self._rng = rng or random.Random()

    def delay(self, n: int) -> float:
        p = self.policy
        base = min(p.max_delay, p.initial_delay * p.multiplier ** max(0, n - 1))
        return min(p.max_delay, max(0.0, base * (1 + self._rng.uniform(-p.jitter, p.jitter))))

    @property
    def state(self) -> str:
        if self.failures == 0:
            return "closed"
        return "open" if time.monotonic() < self._open_until else "half-open"

    def wait(self) -> float:
        """Seconds until this worker may try (0: go, and if the circuit was open, this worker probes)."""
        with self._lock:
            if self.failures == 0:
                return 0.0
            left = self._open_until - time.monotonic()
            if left > 0:
                return left
            if self._probing:
                return min(POLL, self.policy.initial_delay or POLL)
            self._probing = True
            return 0.0

    def success(self) -> None:
        with self._lock:
            self.failures = 0
            self._probing = False

    def probe_now(self) -> None:
        """End the current back-off early (an operator's retry): the next worker probes."""
        with self._lock:
            self._open_until = 0.0

    def idle(self) -> None:
        """A probe found nothing to send: another worker may probe next time."""
        with self._lock:
            self._probing = False

    def failure(self) -> tuple[float, dt.datetime]:
        """Count a failure; returns (delay, when to try again)."""
        with self._lock:
            self.failures += 1
            d = self.delay(self.failures)
            self._open_until = time.monotonic() + d
            self._probing = False
            self.retry_at = utcnow() + dt.timedelta(seconds=d)
            return d, self.retry_at


class DestinationSender:
    """The workers, back-off and wake-up of one destination."""

    def __init__(self, cfg: Config, d: DestinationSection, engine: Engine, storage: Storage,
                 reader: Engine, stop: threading.Event) -> None:  # fmt: skip
        self.cfg = cfg
        self.dest = d
        self.peer = Peer.from_destination(d, cfg.node.ae_title)
        self.engine = engine
        self.reader = reader
        self.storage = storage
        self.breaker = Breaker(d.retry)
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
        """Deliveries queued while the circuit is open show (in ``dicom-node queue``) when they will go."""
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

    def _work(self) -> None:
        sender = Sender(self.peer)
        idle_since: float | None = None
        try:
            while not self._stop.is_set():
                wait = self.breaker.wait()
                if wait > 0 and self._forced():
                    log.info("destination %s: an operator asked to retry now; trying before the back-off ends",
                             self.dest.name)  # fmt: skip
                    self.breaker.probe_now()
                    wait = self.breaker.wait()
                if wait > 0:
                    sender.close()
                    if threading.current_thread() is self.threads[0]:
                        self._postpone()
                    self._sleep(min(wait, POLL))
                    continue
                try:
                    with self._claim_lock:
                        items = queue.claim(self.engine, self.dest.name, BATCH)
                except Exception as e:
                    log.error("destination %s: cannot read the delivery queue: %s", self.dest.name, e)
                    self.breaker.idle()
                    self._sleep(POLL)
                    continue
                if not items:
                    self.breaker.idle()
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if sender.assoc is not None and now - idle_since >= LINGER:
                        sender.close()
                    self._sleep(min(self._idle_wait(), LINGER if sender.assoc is not None else POLL))
                    continue
                idle_since = None
                try:
                    self._send_batch(sender, items)
                except Exception as e:  # a bug must not kill the worker, nor leave rows "sending"
                    log.exception("destination %s: unexpected error while sending", self.dest.name)
                    sender.close()
                    try:
                        queue.release(self.engine, [c.id for c in items], f"internal error while sending: {e}")
                    except Exception:
                        log.exception("destination %s: could not put the batch back (it is at the next start)",
                                      self.dest.name)  # fmt: skip
                    self._sleep(POLL)
        finally:
            sender.close()

    def _send_batch(self, sender: Sender, claimed: list[queue.Item]) -> None:
        t0 = time.monotonic()
        items: list[Item] = []
        outcomes: list[queue.Outcome] = []
        for c in claimed:
            path = self.storage.absolute(c.file_path) if c.file_path else None
            if c.instance_id is None or path is None or not path.is_file():
                outcomes.append(queue.Outcome(c.id, "failed", error="the instance is no longer stored on this node "
                                              "(deleted or discarded before it was sent)", **self._who(c)))  # fmt: skip
                metrics.DELIVERY_RESULTS.labels(self.dest.name, "permanent").inc()
                continue
            items.append(Item(Path(path), c.sop_class_uid, c.transfer_syntax_uid, c.sop_instance_uid, key=c))
        commit = self.peer.storage_commitment
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
                queue.record(self.engine, outcomes)
                outcomes.clear()
                last_flush[0] = time.monotonic()

        results = sender.send(items, on_result, cancelled=self._stop.is_set)
        if len(results) < len(items):  # stopping: what was not sent goes back, not counted as an attempt
            sent = {id(r.item) for r in results}
            outcomes.extend(queue.Outcome(it.key.id, "queued", error="", attempted=False)  # type: ignore[attr-defined]
                            for it in items if id(it) not in sent)  # fmt: skip
        if commit:
            self._request_commitment(sender, outcomes, items)
        queue.record(self.engine, outcomes)
        failed = [r for r in results if r.outcome == "permanent"]
        waiting = [r for r in results if r.outcome == "transient"]
        took = time.monotonic() - t0
        if delivered:
            log.info("destination %s: %d instance(s) delivered in %.2f s%s", self.dest.name, delivered, took,
                     f", {len(failed)} failed, {len(waiting)} waiting" if failed or waiting else "",
                     extra={"destination": self.dest.name, "delivered": delivered})  # fmt: skip
        for r in failed:
            log.error("destination %s: %s not delivered, not retried: %s", self.dest.name, r.item.sop_instance, r.text,
                      extra={"destination": self.dest.name, "sop_instance_uid": r.item.sop_instance})  # fmt: skip

    def _who(self, c: queue.Item) -> dict:
        """An outcome's fields for the audit trail."""
        return {"destination": self.dest.name, "sop_instance_uid": c.sop_instance_uid, "job_id": c.job_id}

    def _outcome(self, r: Result, retry_at: list[dt.datetime]) -> queue.Outcome:
        c: queue.Item = r.item.key  # type: ignore[assignment]
        if r.attempted:
            metrics.DELIVERY_RESULTS.labels(self.dest.name, r.outcome).inc()
        if r.outcome == "delivered":
            self.breaker.success()
            metrics.INSTANCES_SENT.labels(self.dest.name).inc()
            metrics.BYTES_SENT.labels(self.dest.name).inc(c.file_size)
            metrics.DELIVERY_LATENCY.labels(self.dest.name).observe(max(0.0, (utcnow() - c.created_at).total_seconds()))
            if r.warning:
                log.warning("destination %s: %s stored with a warning: %s", self.dest.name, c.sop_instance_uid,
                            r.warning, extra={"destination": self.dest.name})  # fmt: skip
            return queue.Outcome(c.id, "delivered", r.status, warning=r.warning, sent_syntax=r.sent_syntax,
                                 **self._who(c))  # fmt: skip
        if r.outcome == "permanent":
            return queue.Outcome(c.id, "failed", r.status, r.text, **self._who(c))
        # Transient: the first such result of a batch counts as one failure of the destination.
        if not retry_at:
            delay, when = self.breaker.failure()
            retry_at.append(when)
            log.warning("destination %s: %s; %d consecutive failure(s), next try in %.0f s (at %s)", self.dest.name,
                        r.text, self.breaker.failures, delay, when.isoformat(timespec="seconds"))  # fmt: skip
        give_up = self.dest.retry.give_up_after
        age = (utcnow() - c.created_at).total_seconds()
        if give_up and age >= give_up:
            return queue.Outcome(c.id, "failed", r.status, f"gave up after {c.attempts} attempt(s) over "
                                 f"{age / 3600:.1f} h (retry.give_up_after): {r.text}", **self._who(c))  # fmt: skip
        if r.status == 0x0110 and c.attempts >= PROCESSING_FAILURE_ATTEMPTS:
            return queue.Outcome(c.id, "failed", r.status, f"{r.text} ({c.attempts} times)", **self._who(c))
        return queue.Outcome(c.id, "queued", r.status, r.text, retry_at=retry_at[0], attempted=r.attempted)

    def _request_commitment(self, sender: Sender, outcomes: list[queue.Outcome], items: list[Item]) -> None:
        by_id = {it.key.id: it for it in items}  # type: ignore[attr-defined]
        delivered = [o for o in outcomes if o.state == "delivered" and o.id in by_id]
        if not delivered:
            return
        uid = str(generate_uid())
        refs = [(by_id[o.id].sop_class, by_id[o.id].sop_instance) for o in delivered]
        problem = sender.request_commitment(uid, refs)
        for n, o in enumerate(outcomes):
            if o.state == "delivered" and o.id in by_id:
                outcomes[n] = dataclasses.replace(o, error=problem, commitment_uid="" if problem else uid)
        if problem:
            log.error("destination %s: %d instance(s) delivered but not committed: %s", self.dest.name, len(refs),
                      problem)  # fmt: skip
        else:
            log.info("destination %s: storage commitment requested for %d instance(s) (transaction %s)",
                     self.dest.name, len(refs), uid)  # fmt: skip


class Dispatcher:
    """All destinations' senders; ``wake()`` after queuing, ``stop()`` to finish the batches in flight."""

    def __init__(self, cfg: Config, engine: Engine, storage: Storage, reader: Engine | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self._stop = threading.Event()
        self.senders = {
            d.name: DestinationSender(cfg, d, engine, storage, reader or engine, self._stop) for d in cfg.destinations
        }
        self._watchdog = threading.Thread(target=self._commitments, name="commitment-watchdog", daemon=True)

    def start(self) -> None:
        n = queue.requeue_sending(self.engine)
        if n:
            log.warning("%d deliveries were being sent when the node stopped: sending them again", n)
        known = set(self.senders)
        for dest, states in queue.counts(self.engine).items():
            waiting = states.get("queued", 0)
            if dest not in known and waiting:
                log.warning("%d deliveries are queued for destination %r, which is not in the config: they wait "
                            "until it is configured again (or: dicom-node queue cancel --destination %s)", waiting,
                            dest, dest)  # fmt: skip
            elif waiting:
                log.info("destination %s: %d deliveries queued", dest, waiting)
        for s in self.senders.values():
            for t in s.threads:
                t.start()
        if any(d.storage_commitment for d in self.cfg.destinations):
            self._watchdog.start()

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
        """Instances whose commitment was never confirmed are sent (and committed) again."""
        while not self._stop.wait(POLL * 5):
            for d in self.cfg.destinations:
                if not d.storage_commitment:
                    continue
                try:
                    late = queue.commitment_overdue(self.engine, d.name,
                                                    utcnow() - dt.timedelta(seconds=d.commitment_timeout))  # fmt: skip
                    if late:
                        n = queue.resend(self.engine, late, f"no storage commitment report within "
                                         f"{d.commitment_timeout:g} s; sending again")  # fmt: skip
                        log.warning("destination %s: %d instance(s) never confirmed by storage commitment: sending "
                                    "again", d.name, n)  # fmt: skip
                        self.senders[d.name].wake()
                except Exception as e:
                    log.error("storage commitment watchdog: %s", e)

    def commitment_report(self, transaction_uid: str, committed: list[str], failed: dict[str, str]) -> None:
        """An N-EVENT-REPORT arrived: committed instances are done; failed ones are sent again."""
        ok, bad = queue.commitment_result(self.engine, transaction_uid, committed, failed)
        log.info("storage commitment transaction %s: %d committed, %d failed", transaction_uid, ok, len(bad))
        if bad:
            n = queue.resend(self.engine, bad, "storage commitment failed: " + "; ".join(sorted(set(failed.values()))))
            log.warning("storage commitment: %d instance(s) reported failed; sending them again", n)
            self.wake()
