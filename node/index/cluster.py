"""The node processes that share one index: who they are, whether they are alive, who does a duty.

Several node processes (on one host, ``[node] processes``, or on several hosts) may share one index
and one data directory. Each registers a ``node_process`` row at start and renews its lease (a
heartbeat) every ``lease / 4`` seconds. What a process claims (a running job, a delivery being sent)
carries its id as ``owner``; once the owner's lease has expired, any other process may take the work
over (:func:`owner_gone` is the SQL condition for that). Nothing is taken over from a process that is
alive: a lease only expires when its holder has not written a heartbeat for the whole lease.

Duties that must run in one process at a time across the cluster (retention, the storage commitment
watchdog, reconciling what a crashed process left) are held with :func:`hold_duty`, a lease of their own.

On the same host the lease need not be waited out: each process holds an exclusive ``flock`` on a file
of its own under ``<data_dir>/run/`` for as long as it lives, which the kernel drops when it dies
(``kill -9`` too). A process that can take another's lock on its own host knows that one is gone.
Across hosts only the lease counts (file locks over network filesystems are not to be trusted).

Times are the processes' own clocks (UTC): hosts sharing an index must keep them in sync (NTP), within
a small fraction of the lease.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import ColumnElement, Engine, Row, Select, and_, delete, or_, select, update
from sqlalchemy.exc import IntegrityError

from node.index.models import Duty, NodeProcess, aware, utcnow

log = logging.getLogger(__name__)

_p = NodeProcess.__table__
_d = Duty.__table__

#: Roles of a process: everything, or only the DICOM port (the extra processes of ``[node] processes``).
NODE = "node"
RECEIVER = "receiver"
RUN_DIR = "run"
#: Rows of processes that stopped (or were reconciled) longer ago than this are removed at each start.
FORGET_AFTER = dt.timedelta(days=7)


def new_id() -> str:
    """A process id unique for each start: ``host:pid:random`` (at most 64 characters)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{secrets.token_hex(4)}"


@dataclass(frozen=True)
class ProcessRow:
    """One registered process, as ``dicom-node status`` and the API show it."""

    id: str
    host: str
    pid: int
    role: str
    version: str
    started_at: dt.datetime
    heartbeat_at: dt.datetime
    expires_at: dt.datetime
    stopped_at: dt.datetime | None
    recovered_at: dt.datetime | None

    def alive(self, now: dt.datetime | None = None) -> bool:
        return self.stopped_at is None and self.expires_at >= (now or utcnow())


def _row(r: Row[Any]) -> ProcessRow:
    m = r._mapping
    return ProcessRow(
        m["id"],
        m["host"],
        m["pid"],
        m["role"],
        m["version"],
        aware(m["started_at"]),
        aware(m["heartbeat_at"]),
        aware(m["expires_at"]),
        aware(m["stopped_at"]) if m["stopped_at"] else None,
        aware(m["recovered_at"]) if m["recovered_at"] else None,
    )


def processes(engine: Engine) -> list[ProcessRow]:
    """Every registered process, newest first."""
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(select(_p).order_by(_p.c.started_at.desc()))]


def live_ids(now: dt.datetime) -> Select[tuple[str]]:
    """The ids of the processes whose lease runs at ``now`` (a sub-query)."""
    return select(_p.c.id).where(_p.c.expires_at >= now, _p.c.stopped_at.is_(None))


def owner_gone(owner: ColumnElement[str | None], now: dt.datetime) -> ColumnElement[bool]:
    """SQL: the row's owner is no live process (none recorded, stopped, lease expired, or unknown)."""
    return or_(owner.is_(None), owner.not_in(live_ids(now)))


class Membership:
    """This process's registration: its id, its lease, its heartbeat thread and its liveness lock.

    ``on_beat`` callbacks run after each heartbeat in the heartbeat thread (taking over a dead process's
    work, sweeps); one failing is logged and does not stop the others or the heartbeat.
    """

    def __init__(self, engine: Engine, run_dir: Path, *, lease: float, role: str = NODE, version: str = "") -> None:
        self.engine = engine
        self.run_dir = run_dir
        self.lease = lease
        self.role = role
        self.version = version
        self.id = new_id()
        self.interval = max(0.5, lease / 4)
        self.on_beat: list[Callable[[], None]] = []
        self._stop = threading.Event()
        self._tasks = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
        self._lock_file: IO[bytes] | None = None
        #: Until when the index holds this process alive (the last lease written), and when that was (monotonic).
        self._expires: dt.datetime | None = None
        self._last_beat = 0.0

    # -- life cycle ----------------------------------------------------------

    def _row_values(self, now: dt.datetime) -> dict[str, object]:
        return dict(
            id=self.id,
            host=socket.gethostname()[:255],
            pid=os.getpid(),
            role=self.role,
            version=self.version[:32],
            started_at=now,
            heartbeat_at=now,
            expires_at=now + dt.timedelta(seconds=self.lease),
            stopped_at=None,
            recovered_at=None,
        )

    def register(self) -> None:
        """Take the liveness lock and insert this process's row (before claiming anything)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        f = open(self.run_dir / _lock_name(self.id), "wb")
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # new file, new id: nobody else holds it
        self._lock_file = f
        now = utcnow()
        with self.engine.begin() as conn:
            conn.execute(_p.insert().values(**self._row_values(now)))
        self._expires, self._last_beat = now + dt.timedelta(seconds=self.lease), time.monotonic()
        log.info("registered as node process %s (%s, lease %g s)", self.id, self.role, self.lease)
        forget_old(self.engine, now - FORGET_AFTER)
        self.expire_dead_here()

    def heartbeat(self) -> None:
        """Start renewing the lease (without the periodic tasks yet): right after :meth:`register`, so that a
        long start (reconciling a large data directory after a crash) never lets the lease run out."""
        if not self._thread.is_alive():
            self._thread.start()

    def start(self) -> None:
        """Heartbeat, and run the periodic tasks (``on_beat``) after each one (the parts they use have started)."""
        self._tasks.set()
        self.heartbeat()

    def stop(self, *, clean: bool) -> None:
        """Stop the heartbeat and give up this process's duties; ``clean``: nothing left for anyone to reconcile."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(10)
        now = utcnow()
        try:
            with self.engine.begin() as conn:
                values: dict[str, object] = {"expires_at": now}
                if clean:
                    values.update(stopped_at=now, recovered_at=now)
                conn.execute(update(_p).where(_p.c.id == self.id).values(**values))
                conn.execute(delete(_d).where(_d.c.owner == self.id))
        except Exception as e:  # the index is gone: the lease runs out by itself
            log.warning("could not record this process's stop in the index: %s", e)
        if self._lock_file is not None:
            self._lock_file.close()
            try:
                (self.run_dir / _lock_name(self.id)).unlink()
            except FileNotFoundError:
                pass
            self._lock_file = None

    # -- heartbeat -----------------------------------------------------------

    def beat(self) -> bool:
        """Renew this process's lease; False if its row was not as this process left it (it is written again)."""
        now = utcnow()
        until = now + dt.timedelta(seconds=self.lease)
        mine = and_(_p.c.id == self.id, _p.c.stopped_at.is_(None), _p.c.recovered_at.is_(None))
        with self.engine.begin() as conn:
            done = conn.execute(update(_p).where(mine).values(heartbeat_at=now, expires_at=until)).rowcount
            if done != 1 and not self._stop.is_set():  # (a beat racing stop() must not make the row alive again)
                row = conn.execute(select(_p.c.stopped_at, _p.c.recovered_at).where(_p.c.id == self.id)).first()
                if row is None:
                    log.warning(
                        "node process %s had no row in the index (removed by hand?); registering again", self.id
                    )
                    conn.execute(_p.insert().values(**self._row_values(now)))
                else:
                    log.error(
                        "node process %s was taken for gone by the others (no heartbeat since %s) and what it left "
                        "was reconciled: its running jobs and deliveries were taken over, and their outcomes here are "
                        "not recorded. It goes on working; find out why its heartbeat stopped (index unreachable? "
                        "the process paused?)",
                        self.id,
                        self._expires.isoformat(timespec="seconds") if self._expires else "its start",
                    )
                    conn.execute(
                        update(_p)
                        .where(_p.c.id == self.id)
                        .values(heartbeat_at=now, expires_at=until, stopped_at=None, recovered_at=None)
                    )
        if done == 1 and self._expires is not None and now > self._expires:
            log.warning(
                "this process's lease had lapsed %.0f s before this heartbeat: other node processes may have taken "
                "over its running jobs and deliveries (their outcomes here are then not recorded)",
                (now - self._expires).total_seconds(),
            )
        self._expires, self._last_beat = until, time.monotonic()
        return done == 1

    def problem(self) -> str:
        """For /readyz: "" while the heartbeat keeps the lease, else what is wrong."""
        since = time.monotonic() - self._last_beat
        if self._last_beat and since > self.lease / 2:
            return f"no heartbeat written to the index for {since:.0f} s (lease {self.lease:g} s)"
        return ""

    def _run(self) -> None:
        late = False
        while True:
            try:
                self.beat()
                if late:
                    log.info("heartbeat written again")
                late = False
            except Exception as e:
                if not late:
                    log.error("could not write this process's heartbeat to the index: %s", e)
                late = True
            if not late and self._tasks.is_set():
                try:
                    self.expire_dead_here()
                except Exception as e:
                    log.warning("checking for dead node processes on this host failed: %s", e)
                for fn in self.on_beat:
                    if self._stop.is_set():
                        break
                    try:
                        fn()
                    except Exception:
                        log.exception("periodic cluster task %s failed", getattr(fn, "__qualname__", fn))
            if self._stop.wait(self.interval):
                return

    # -- processes that died -------------------------------------------------

    def expire_dead_here(self) -> list[str]:
        """End the lease of processes of this host that are gone (their liveness lock is free).

        Returns their ids. Their work is then taken over at once rather than after the lease.
        """
        host = socket.gethostname()[:255]
        now = utcnow()
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(_p.c.id).where(
                    _p.c.host == host, _p.c.id != self.id, _p.c.stopped_at.is_(None), _p.c.expires_at >= now
                )
            ).scalars()
            candidates = list(rows)
        gone = [pid for pid in candidates if not _lock_held(self.run_dir / _lock_name(pid))]
        if gone:
            with self.engine.begin() as conn:
                conn.execute(update(_p).where(_p.c.id.in_(gone), _p.c.stopped_at.is_(None)).values(expires_at=now))
            for pid in gone:
                log.warning("node process %s on this host is gone (its lock is free): its work is taken over", pid)
        return gone

    def others_alive(self) -> bool:
        """Whether any other process holds a lease now (start-up reconciles alone only if none does)."""
        with self.engine.connect() as conn:
            return (
                conn.execute(
                    select(_p.c.id).where(_p.c.id.in_(live_ids(utcnow())), _p.c.id != self.id).limit(1)
                ).first()
                is not None
            )


def crashed(engine: Engine, *, older_than: dt.datetime | None = None) -> list[ProcessRow]:
    """Processes whose lease expired without a clean stop and that nobody has reconciled yet.

    ``older_than``: only those whose lease ended before then (their last files are surely indexed or
    orphaned by then, not still on their way into the index).
    """
    cond = [_p.c.stopped_at.is_(None), _p.c.recovered_at.is_(None), _p.c.expires_at < (older_than or utcnow())]
    with engine.connect() as conn:
        return [_row(r) for r in conn.execute(select(_p).where(*cond).order_by(_p.c.started_at))]


def mark_recovered(engine: Engine, ids: Sequence[str]) -> None:
    if ids:
        with engine.begin() as conn:
            conn.execute(update(_p).where(_p.c.id.in_(list(ids))).values(recovered_at=utcnow()))


def forget_old(engine: Engine, before: dt.datetime) -> int:
    """Remove the rows of processes stopped (or reconciled) before ``before``: history, not state."""
    with engine.begin() as conn:
        return conn.execute(
            delete(_p).where(
                or_(_p.c.stopped_at < before, and_(_p.c.recovered_at.is_not(None), _p.c.recovered_at < before))
            )
        ).rowcount


# -- duties ---------------------------------------------------------------------


def hold_duty(engine: Engine, name: str, owner: str, lease: float) -> bool:
    """Take or renew duty ``name`` for ``lease`` seconds; False while another live holder has it."""
    now = utcnow()
    until = now + dt.timedelta(seconds=lease)
    with engine.begin() as conn:
        done = conn.execute(
            update(_d)
            .where(_d.c.name == name, or_(_d.c.owner == owner, _d.c.expires_at < now))
            .values(owner=owner, expires_at=until)
        ).rowcount
        if done == 1:
            return True
        if conn.execute(select(_d.c.name).where(_d.c.name == name)).first() is not None:
            return False
    try:
        with engine.begin() as conn:
            conn.execute(_d.insert().values(name=name, owner=owner, expires_at=until))
        return True
    except IntegrityError:  # another process made the row first: it holds the duty
        return False


def release_duty(engine: Engine, name: str, owner: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(_d).where(_d.c.name == name, _d.c.owner == owner))


def file_name(process_id: str) -> str:
    """A process id as a file or directory name (its lock file, its temp and quarantine directories).

    Process ids are ``host:pid:random``; a host name may hold characters a file name should not (and
    ``:`` is awkward on some filesystems), so anything but letters, digits, ``.``, ``-`` and ``_``
    becomes ``_``. The random part keeps two processes apart.
    """
    name = re.sub(r"[^A-Za-z0-9._-]", "_", process_id)
    return name if name.strip(".") else f"_{name}"


def _lock_name(process_id: str) -> str:
    return file_name(process_id) + ".lock"


def _lock_held(path: Path) -> bool:
    """Whether a live process may hold the lock on ``path``: False only if the file is there and free.

    A missing file says nothing (that process may use another data directory): its lease decides.
    """
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        return True
    with f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    return False
