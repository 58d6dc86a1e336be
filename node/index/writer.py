"""One thread owns every index write of the receive path, committing in groups.

Why: concurrent associations each committing their own transaction would
contend for SQLite's single write lock (and wait in its sleep-based busy
handler). Here each association hands its row to the writer and waits; the
writer takes everything queued meanwhile into one transaction, with a
savepoint per instance so one bad row fails only its own request. Under load
that is one commit for several instances; with one sender it is one commit
per instance, as before. It works the same on PostgreSQL.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import Future
from typing import Callable, TypeVar

from sqlalchemy import Connection, Engine

log = logging.getLogger(__name__)

T = TypeVar("T")
Work = Callable[[Connection], T]

MAX_BATCH = 64


class IndexWriter:
    def __init__(self, engine: Engine, on_failure: Callable[[], None] | None = None) -> None:
        """``on_failure`` is called after any failed item or transaction (e.g. to drop caches)."""
        self._engine = engine
        self._queue: queue.SimpleQueue[tuple[Work, Future] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._on_failure = on_failure
        self._stopped = False

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
            self._thread.join(timeout=30)

    def submit(self, work: Work) -> Future:
        fut: Future = Future()
        if self._stopped:
            fut.set_exception(RuntimeError("the index writer is stopped"))
        else:
            self._queue.put((work, fut))
        return fut

    def call(self, work: Work[T], timeout: float | None = 60) -> T:
        """Run ``work`` in the writer's next transaction and wait for its commit."""
        return self.submit(work).result(timeout=timeout)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            self._commit(batch)
            if stop:
                return

    def _commit(self, batch: list[tuple[Work, Future]]) -> None:
        results: list[tuple[Future, object, BaseException | None]] = []
        try:
            with self._engine.begin() as conn:
                if len(batch) == 1:  # no savepoint needed: the transaction is the item
                    work, fut = batch[0]
                    results.append((fut, work(conn), None))
                else:
                    for work, fut in batch:
                        try:
                            with conn.begin_nested():
                                results.append((fut, work(conn), None))
                        except Exception as exc:  # this item only: its savepoint rolled back
                            results.append((fut, None, exc))
        except Exception as exc:  # the commit itself failed: nothing in the batch is durable
            log.error("index transaction of %d instance(s) failed: %s", len(batch), exc)
            if self._on_failure:
                self._on_failure()
            for _work, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for fut, value, exc in results:
            if exc is not None:
                if self._on_failure:
                    self._on_failure()
                fut.set_exception(exc)
            else:
                fut.set_result(value)
