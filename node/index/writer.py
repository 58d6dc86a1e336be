"""One thread owns every index write of the receive path, committing in groups.

Why: concurrent associations each committing their own transaction would
contend for SQLite's single write lock (and wait in its sleep-based busy
handler). Here each association hands its row to the writer and waits; the
writer takes everything queued meanwhile into one transaction, with a
savepoint per item so one bad row fails only its own request. Under load
that is one commit for several instances; with one sender it is one commit
per instance. The writer keeps one raw DBAPI connection and runs statements
prepared by :class:`node.index.db.Prepared`, which works on PostgreSQL too.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Engine

from node.index.db import Prepared, begin_statement

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 64


class Tx:
    """The writer's open transaction, as seen by a work item."""

    def __init__(self, dbapi_conn: Any, dialect: Any) -> None:
        self.conn = dbapi_conn
        self.cur = dbapi_conn.cursor()
        self.dialect = dialect
        self._prepared: dict[Any, Prepared] = {}

    def prepare(self, key: Any, stmt: Any, keys: list[str] | None = None) -> Prepared:
        p = self._prepared.get(key)
        if p is None:
            p = self._prepared[key] = Prepared(stmt, self.dialect, keys)
        return p

    def execute(self, p: Prepared, values: dict[str, Any]) -> Any:
        self.cur.execute(p.sql, p.params(values))
        return self.cur

    def scalar(self, p: Prepared, values: dict[str, Any]) -> Any:
        row = self.execute(p, values).fetchone()
        return None if row is None else row[0]

    def row(self, p: Prepared, values: dict[str, Any]) -> Any:
        return self.execute(p, values).fetchone()


Work = Callable[[Tx], T]


class IndexWriter:
    def __init__(self, engine: Engine, on_failure: Callable[[], None] | None = None) -> None:
        """``on_failure`` is called after any failed item or transaction (e.g. to drop caches)."""
        self._engine = engine
        self._queue: queue.SimpleQueue[tuple[Work[Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._on_failure = on_failure
        self._stopped = False
        self._begin = begin_statement(engine)
        self._raw: Any = None
        self._tx: Tx | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and not self._stopped

    def stop(self, timeout: float = 30) -> bool:
        """Finish queued work and stop; ``False`` if the thread did not finish in time."""
        if not self._stopped:
            self._stopped = True
            self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout=timeout)
        return not self._thread.is_alive()

    def submit(self, work: Work[T]) -> Future[T]:
        fut: Future[T] = Future()
        if self._stopped:
            fut.set_exception(RuntimeError("the index writer is stopped"))
        else:
            self._queue.put((work, fut))
        return fut

    def call(self, work: Work[T], timeout: float | None = 60) -> T:
        """Run ``work`` in the writer's next transaction and wait for its commit."""
        return self.submit(work).result(timeout=timeout)

    def _run(self) -> None:
        try:
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
        finally:
            self._close()

    def _connection(self) -> Tx:
        if self._tx is None:
            self._raw = self._engine.raw_connection()
            self._tx = Tx(self._raw.dbapi_connection, self._engine.dialect)
        return self._tx

    def _close(self) -> None:
        if self._raw is not None:
            try:
                self._raw.close()
            except Exception:
                pass
        self._raw = self._tx = None

    def _commit(self, batch: list[tuple[Work[Any], Future[Any]]]) -> None:
        # Work whose caller gave up waiting (and cancelled it) is not run.
        batch = [(w, f) for w, f in batch if f.set_running_or_notify_cancel()]
        if not batch:
            return
        results: list[tuple[Future[Any], object, BaseException | None]] = []
        try:
            tx = self._connection()
            if self._begin:
                tx.cur.execute(self._begin)
            if len(batch) == 1:  # no savepoint needed: the transaction is the item
                work, fut = batch[0]
                results.append((fut, work(tx), None))
            else:
                for work, fut in batch:
                    tx.cur.execute("SAVEPOINT item")
                    try:
                        results.append((fut, work(tx), None))
                        tx.cur.execute("RELEASE SAVEPOINT item")
                    except Exception as exc:  # this item only
                        tx.cur.execute("ROLLBACK TO SAVEPOINT item")
                        tx.cur.execute("RELEASE SAVEPOINT item")
                        # Ids cached while running this item may belong to rows
                        # just rolled back: the next items must not use them.
                        if self._on_failure:
                            self._on_failure()
                        results.append((fut, None, exc))
            tx.conn.commit()
        except Exception as exc:  # nothing in the batch is durable
            log.error("index transaction of %d item(s) failed: %s", len(batch), exc)
            try:
                if self._tx is not None:
                    self._tx.conn.rollback()
            except Exception:
                self._close()  # a broken connection is replaced on the next batch
            if self._on_failure:
                self._on_failure()
            for _work, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for fut, value, error in results:
            if error is not None:
                if self._on_failure:
                    self._on_failure()
                fut.set_exception(error)
            else:
                fut.set_result(value)
