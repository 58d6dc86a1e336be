"""One thread owns every index write of the receive path, committing in groups.

Why: concurrent associations each committing their own transaction would
contend for SQLite's single write lock (and wait in its sleep-based busy
handler). Here each association hands its row to the writer and waits; the
writer takes everything queued meanwhile into one transaction, with a
savepoint per item so one bad row fails only its own request. Under load
that is one commit for several instances; with one sender it is one commit
per instance. The writer keeps one raw DBAPI connection and runs statements
prepared by :class:`node.index.db.Prepared`, which works on PostgreSQL too.

Several node processes may write one index. On PostgreSQL their transactions
can deadlock (two batches touching the same series rows in different orders)
or find that another process recorded the same instance first (a
:class:`Conflict`): the writer then rolls the batch back and runs it again, so
callers never see it. On SQLite, writers of several processes take turns on
an ``flock`` beside the database file (see :class:`_WriteLock`).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from sqlalchemy import Engine

from node.index.db import Prepared, begin_statement

log = logging.getLogger(__name__)

T = TypeVar("T")
MAX_BATCH = 64
#: How often a batch runs at most when it keeps losing races with other processes (deadlock etc.).
ATTEMPTS = 5
#: A batch that met other processes' writes this many times runs again one item per transaction.
SPLIT_AFTER = 2
#: PostgreSQL's "deadlock detected" and "could not serialize access": the transaction may simply run again;
#: and "foreign key violation": a parent row another process removed meanwhile (retention deleting an empty
#: study while we filed a new series under it): run again, the rolled-back epoch drops the cached id and the
#: parent is made anew.
RETRY_SQLSTATES = frozenset({"40P01", "40001", "23503"})


class Conflict(Exception):
    """A work item found that another process changed what it read: its transaction runs again.

    Raised from within a work item (e.g. an instance INSERT that lost the race for its SOP Instance
    UID); the writer rolls the whole batch back and runs it again, where the item reads the other
    process's committed row.
    """


def retryable(exc: BaseException) -> bool:
    """Whether ``exc`` means "run the transaction again" rather than "this item is wrong"."""
    if isinstance(exc, Conflict):
        return True
    # psycopg 3 errors carry .sqlstate (psycopg2's .pgcode); SQLAlchemy wraps them in .orig.
    for e in (exc, getattr(exc, "orig", None)):
        if (getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)) in RETRY_SQLSTATES:
            return True
    return False


#: Epochs of the writers' transactions: a new one after every rollback (see Tx.epoch).
_epochs = itertools.count(1)


class Tx:
    """The writer's open transaction, as seen by a work item."""

    def __init__(self, dbapi_conn: Any, dialect: Any) -> None:
        self.conn = dbapi_conn
        self.cur = dbapi_conn.cursor()
        self.dialect = dialect
        #: Changes whenever something was rolled back (an item, a batch) or the connection replaced: a cache of
        #: row ids made under another epoch may hold ids of rows that were never committed (SQLite reuses them),
        #: so a cache keeps its epoch and forgets everything when it differs (node.index.records.Recorder).
        self.epoch = next(_epochs)
        self._prepared: dict[Any, Prepared] = {}

    def rolled_back(self) -> None:
        self.epoch = next(_epochs)

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
    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._queue: queue.SimpleQueue[tuple[Work[Any], Future[Any]] | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="index-writer", daemon=True)
        self._stopped = False
        self._begin = begin_statement(engine)
        self._raw: Any = None
        self._tx: Tx | None = None
        self._lock = _WriteLock(engine)

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
        """Queue ``work`` for the next transaction.

        ``work`` may run more than once (its transaction is run again after a deadlock or a
        :class:`Conflict`): it must change nothing outside the transaction but its return value.
        """
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
            self._lock.close()

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
        if batch:
            self._run_batch(batch)

    def _run_batch(self, batch: list[tuple[Work[Any], Future[Any]]]) -> None:
        results: list[tuple[Future[Any], object, Exception | None]] = []
        for attempt in range(1, ATTEMPTS + 1):
            try:
                with self._lock:  # the rollback too: SQLite's write lock is held until it ends
                    try:
                        results = self._transaction(batch)
                    except Exception:
                        self._rollback()
                        raise
            except Exception as exc:  # nothing in the batch is durable
                self._rolled_back()
                if self._lost(exc) and attempt < ATTEMPTS:
                    # The database restarted or failed over (or a proxy dropped us): a new connection, and again.
                    self._close()
                    log.warning(
                        "index connection lost (%s); reconnecting and running the transaction of %d item(s) "
                        "again (attempt %d of %d)",
                        _first_line(exc),
                        len(batch),
                        attempt + 1,
                        ATTEMPTS,
                    )
                    time.sleep(min(2.0, 0.1 * 2**attempt))
                    continue
                if retryable(exc) and len(batch) > 1 and attempt >= SPLIT_AFTER:
                    # Batches of other processes keep meeting this one (their rows locked in another
                    # order): one item per transaction, each locking its rows in the same order everywhere.
                    log.info(
                        "index transaction of %d item(s) met another process's writes %d times (%s); "
                        "running its items one by one",
                        len(batch),
                        attempt,
                        _first_line(exc),
                    )
                    for item in batch:
                        self._run_batch([item])
                    return
                if retryable(exc) and attempt < ATTEMPTS:
                    log.log(
                        logging.WARNING if attempt >= 3 else logging.INFO,
                        "index transaction of %d item(s) met another process's writes (%s); "
                        "running it again (attempt %d of %d)",
                        len(batch),
                        _first_line(exc),
                        attempt + 1,
                        ATTEMPTS,
                    )
                    # Jitter, so that two processes that deadlocked do not meet again in step.
                    time.sleep(random.uniform(0, 0.01 * 2**attempt))
                    continue
                log.error("index transaction of %d item(s) failed: %s", len(batch), exc)
                for _work, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)
                return
            break
        for fut, value, error in results:
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

    def _transaction(
        self, batch: list[tuple[Work[Any], Future[Any]]]
    ) -> list[tuple[Future[Any], object, Exception | None]]:
        """Run ``batch`` in one transaction and commit; per-item failures are results, not exceptions."""
        results: list[tuple[Future[Any], object, Exception | None]] = []
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
                except Exception as exc:
                    if retryable(exc):  # the whole batch runs again
                        raise
                    # this item only
                    tx.cur.execute("ROLLBACK TO SAVEPOINT item")
                    tx.cur.execute("RELEASE SAVEPOINT item")
                    # Ids cached while running this item may belong to rows
                    # just rolled back: the next items must not use them.
                    tx.rolled_back()
                    results.append((fut, None, exc))
        tx.conn.commit()
        return results

    def _rolled_back(self) -> None:
        if self._tx is not None:
            self._tx.rolled_back()

    def _lost(self, exc: Exception) -> bool:
        """Whether ``exc`` says the connection to the database is gone (the dialect knows its errors)."""
        state = getattr(exc, "sqlstate", None) or ""
        # Class 08: connection exception; 57P01-57P03: the server shut down or is starting (PostgreSQL).
        if state.startswith("08") or state in ("57P01", "57P02", "57P03"):
            return True
        dbapi = self._raw.dbapi_connection if self._raw is not None else None
        if dbapi is not None and getattr(dbapi, "closed", False):
            return True
        try:
            # type: ignore: typed for DBAPI errors only; any exception may be asked about (the dialect checks)
            return bool(self._engine.dialect.is_disconnect(exc, dbapi, None))  # type: ignore[arg-type]
        except Exception:
            return False

    def _rollback(self) -> None:
        try:
            if self._tx is not None:
                self._tx.conn.rollback()
        except Exception:
            self._close()  # a broken connection is replaced on the next batch


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class _WriteLock:
    """An exclusive ``flock`` on ``<database>.write.lock`` around each write transaction (SQLite files only).

    Why: writers of several processes on one SQLite file otherwise wait for its write lock in
    SQLite's busy handler, which sleeps (up to 100 ms a time) and polls; a writer waiting here is
    woken by the kernel the moment the other process releases the lock.
    """

    def __init__(self, engine: Engine) -> None:
        db = engine.url.database
        self.path = f"{db}.write.lock" if engine.dialect.name == "sqlite" and db and db != ":memory:" else None
        self._fd: int | None = None

    def __enter__(self) -> None:
        if self.path is None:
            return
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *_exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
