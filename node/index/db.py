"""Engines, sessions and schema migration for the index.

This is the one place that knows about SQL dialects. SQLite (the embedded
default) is put into WAL mode with a busy timeout so readers never block the
writer, and write transactions start with ``BEGIN IMMEDIATE`` so a second
writer waits for the lock instead of failing later with ``database is
locked`` when it tries to upgrade a read lock. Everything else is portable
SQLAlchemy and runs on PostgreSQL unchanged.
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, Connection, Dialect, Engine, Table, create_engine, event
from sqlalchemy.dialects import sqlite
from sqlalchemy.engine.interfaces import DBAPIConnection
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import ConnectionPoolEntry
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

if TYPE_CHECKING:  # alembic (~0.1 s) is imported by what migrates, not by a command that reads the index
    from alembic.config import Config as AlembicConfig
    from sqlalchemy.dialects import postgresql

log = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS = 30_000


def is_sqlite(url: str) -> bool:
    return url.startswith("sqlite")


def make_engine(url: str, *, write: bool = True) -> Engine:
    """Create an engine for ``url``.

    ``write=True`` engines begin every transaction with an immediate write
    lock on SQLite; read-only users (status, dashboards) pass ``write=False``
    and keep WAL's lock-free snapshot reads.
    """
    if not is_sqlite(url):
        return create_engine(url, pool_pre_ping=True, future=True)

    if write and url.startswith("sqlite:///") and url != "sqlite:///:memory:":
        Path(url[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(
        url,
        connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        future=True,
    )

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: DBAPIConnection, _record: ConnectionPoolEntry) -> None:
        # Let SQLAlchemy (not the sqlite3 module) decide where transactions begin.
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a process crash; only an OS
        # crash or power loss can roll back the last commits, and the storage
        # files (which are fsync'ed) are re-indexed by recovery at start-up.
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA cache_size=-65536")  # 64 MiB page cache
        # Read index pages through a memory map (no read() per page): keeps
        # look-ups into a million-row index as cheap as into an empty one.
        cur.execute("PRAGMA mmap_size=1073741824")
        # Checkpoints (copying the WAL into the database, with an fsync) are
        # done by a background thread (see WalCheckpointer); the automatic one,
        # which would stall the writer mid-commit, only backs it up.
        cur.execute("PRAGMA wal_autocheckpoint=20000")
        cur.execute("PRAGMA temp_store=MEMORY")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")

    return engine


def insert_or_skip(table: Table, dialect: str, *conflict: ColumnElement[Any]) -> sqlite.Insert | postgresql.Insert:
    """``INSERT ... ON CONFLICT (conflict) DO NOTHING`` for the index's dialect.

    Both databases the index runs on have it, but SQLAlchemy spells it per dialect. Several node processes
    may insert the same row at the same moment: with this the slower one's row is no change instead of an
    error (no ``conflict`` columns: any unique constraint).
    """
    targets = list(conflict) or None
    if dialect == "sqlite":
        return sqlite.insert(table).on_conflict_do_nothing(index_elements=targets)
    if dialect == "postgresql":
        # Imported here: the PostgreSQL dialect (~20 ms) is loaded by a PostgreSQL engine, not on SQLite.
        from sqlalchemy.dialects import postgresql

        return postgresql.insert(table).on_conflict_do_nothing(index_elements=targets)
    raise RuntimeError(f"the index needs SQLite or PostgreSQL, not {dialect}")


class NoIndex(Exception):
    """There is no index at the configured place yet."""


def existing_engine(url: str, *, write: bool = False) -> Engine:
    """An engine on an index that must already exist (for commands that inspect or change it)."""
    if url.startswith("sqlite:///") and not Path(url[len("sqlite:///") :]).is_file():
        raise NoIndex(f"no index at {url[len('sqlite:///') :]}: the node has not run with this data directory")
    return make_engine(url, write=write)


def session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False, future=True)


def alembic_config(engine: Engine | None = None) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    cfg = AlembicConfig()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        cfg.set_main_option("sqlalchemy.url", engine.url.render_as_string(hide_password=False))
    return cfg


#: The PostgreSQL advisory lock key that serialises migrations (any constant; "dcmnode" in ASCII).
MIGRATION_LOCK_KEY = 0x64636D6E6F6465


def migrate(engine: Engine) -> None:
    """Bring the schema to the newest revision (creates it on a new database).

    Under a lock, so that node processes starting together on an empty database do not both create
    it: a PostgreSQL advisory lock held by the migrating transaction, or on SQLite a file lock beside
    the database file. The second process waits, then finds the schema current.
    """
    from alembic import command

    cfg = alembic_config(engine)
    with _migration_file_lock(engine), migration_connection(engine) as conn:
        if engine.dialect.name == "postgresql":
            conn.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK_KEY})")
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, "head")


@contextmanager
def migration_connection(engine: Engine) -> Iterator[Connection]:
    """A connection in a transaction for Alembic; on SQLite with foreign key enforcement off meanwhile.

    SQLite's batch mode alters a table by copying it and dropping the old one; with enforcement on,
    dropping a table other rows refer to fails (or fires their ``ON DELETE SET NULL``), and the pragma
    cannot change inside a transaction. So it is off from before the transaction to after it, and
    ``PRAGMA foreign_key_check`` must find nothing dangling before the commit that was not dangling
    before the migration (an index some older tool left with a dangling reference still upgrades).
    """
    sqlite_db = engine.dialect.name == "sqlite"
    with engine.connect() as conn:
        raw = conn.connection.driver_connection
        if sqlite_db and raw is not None:
            raw.execute("PRAGMA foreign_keys=OFF")
        try:
            with conn.begin():
                check = "PRAGMA foreign_key_check"
                before = {tuple(r) for r in conn.exec_driver_sql(check).all()} if sqlite_db else set()
                yield conn
                if sqlite_db:
                    dangling = [tuple(r) for r in conn.exec_driver_sql(check).all() if tuple(r) not in before]
                    if dangling:
                        raise RuntimeError(
                            f"the migration left references to missing rows (table, rowid, parent): {dangling[:5]}"
                        )
        finally:
            if sqlite_db and raw is not None:
                raw.execute("PRAGMA foreign_keys=ON")


@contextmanager
def _migration_file_lock(engine: Engine) -> Iterator[None]:
    """An exclusive ``flock`` on ``<database>.migrate.lock`` for a SQLite file database (else nothing)."""
    db = engine.url.database
    if engine.dialect.name != "sqlite" or not db or db == ":memory:":
        yield
        return
    with open(f"{db}.migrate.lock", "ab") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


class Prepared:
    """A statement compiled once for a dialect and run on a raw DBAPI cursor.

    The receive path writes a few rows per instance; going through
    SQLAlchemy's execution machinery for each cost more than the SQL itself.
    SQLAlchemy still writes the SQL (so it stays portable) and its type
    processors still convert the values; only the per-call overhead goes.
    """

    def __init__(self, stmt: ClauseElement, dialect: Dialect, keys: list[str] | None = None) -> None:
        compiled = stmt.compile(dialect=dialect, column_keys=keys)
        if not isinstance(compiled, SQLCompiler):  # e.g. DDL: has no bind parameters to prepare
            raise TypeError(f"not a SQL statement with parameters: {stmt}")
        self.sql = compiled.string
        self.positional = bool(compiled.positional)
        names = list(compiled.positiontup or ()) if self.positional else list(compiled.binds)
        self.names = names
        self.processors: dict[str, Callable[[Any], Any]] = {}
        for name in names:
            # The dialect's own implementation (e.g. SQLite's DATETIME text format), as SQLAlchemy would use.
            proc = compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            if proc is not None:
                self.processors[name] = proc

    def params(self, values: dict[str, Any]) -> tuple[Any, ...] | dict[str, Any]:
        """The DBAPI parameters for ``values`` (keyed by column), converted as SQLAlchemy would."""
        procs = self.processors
        if self.positional:
            return tuple(procs[n](values[n]) if n in procs else values[n] for n in self.names)
        return {n: (procs[n](values[n]) if n in procs else values[n]) for n in self.names}


def begin_statement(engine: Engine) -> str | None:
    """How a raw write transaction starts: SQLite takes the write lock up front, others begin implicitly."""
    return "BEGIN IMMEDIATE" if engine.dialect.name == "sqlite" else None


class WalCheckpointer:
    """Runs passive WAL checkpoints off the write path, once a second (SQLite only).

    A passive checkpoint never blocks writers; it copies what it can and
    leaves the rest for the next round.
    """

    def __init__(self, engine: Engine, interval: float = 1.0) -> None:
        import threading

        self._engine = engine
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="wal-checkpoint", daemon=True)

    def start(self) -> None:
        if is_sqlite(str(self._engine.url)):
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)

    def _run(self) -> None:
        raw = None
        while not self._stop.wait(self._interval):
            try:
                if raw is None:
                    raw = self._engine.raw_connection()
                cur = raw.cursor()
                try:
                    cur.execute("PRAGMA wal_checkpoint(PASSIVE)")
                finally:
                    cur.close()
            except Exception as e:  # the automatic checkpoint still bounds the WAL
                log.warning("WAL checkpoint failed: %s", e)
                raw = None
        if raw is not None:
            raw.close()
