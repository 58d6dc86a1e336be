"""Deleting stored instances: their index rows and their files, for the discard action and retention.

The order is what keeps the index and the files in step: inside the caller's transaction the rows
are deleted first (not yet committed), then the files, then the caller commits. While the
transaction is open no one else can write the rows (SQLite's write lock, a row lock elsewhere), so
nothing new can start on instances that are about to go. If the process dies before the commit,
the rows come back with some of their files gone; the next clean-up of the same instances finds
them again and finishes (a missing file is skipped), and start-up recovery names them meanwhile.
The other order could leave files without rows, which recovery would index again: deleted data
coming back is the worse failure.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import Connection, delete, select, update

from node.index.models import Delivery, Instance, Series
from node.storage.layout import Storage, fsync_dir

_i = Instance.__table__
_d = Delivery.__table__
_s = Series.__table__
#: Rows per statement (well below any database's limit on bound parameters).
CHUNK = 500


@dataclass
class Removed:
    #: Index rows deleted.
    instances: int = 0
    #: Files removed, and their size in bytes (files already missing are not counted).
    files: int = 0
    bytes: int = 0


def delete_instance_rows(
    conn: Connection, series_id: int, items: Sequence[tuple[int, str]], *, revision: int | None = None
) -> list[str]:
    """Delete the rows of ``items`` ((id, stored path) of instances of one series) still as listed.

    A row that changed meanwhile (another file, another series or, with ``revision``, another
    revision: a re-send) is kept. Delivery rows keep their history with ``instance_fk`` NULL, and the
    series' instance count follows. Returns the stored paths of the rows deleted: the files the
    caller removes (:func:`remove_files`) before it commits.
    """
    gone: list[str] = []
    for start in range(0, len(items), CHUNK):
        listed = dict(items[start : start + CHUNK])
        cond = [_i.c.id.in_(list(listed)), _i.c.series_fk == series_id]
        if revision is not None:
            cond.append(_i.c.revision == revision)
        rows = [r for r in conn.execute(select(_i.c.id, _i.c.file_path).where(*cond)) if listed[r.id] == r.file_path]
        if not rows:
            continue
        ids = [r.id for r in rows]
        # The foreign key says ON DELETE SET NULL too; saying it here does not depend on the database enforcing it.
        conn.execute(update(_d).where(_d.c.instance_fk.in_(ids)).values(instance_fk=None))
        conn.execute(delete(_i).where(_i.c.id.in_(ids)))
        gone.extend(r.file_path for r in rows)
    if gone:
        conn.execute(update(_s).where(_s.c.id == series_id).values(instance_count=_s.c.instance_count - len(gone)))
    return gone


def remove_files(storage: Storage, relative_paths: Iterable[str]) -> tuple[int, int]:
    """Remove stored files (missing ones are skipped) and series directories left empty, durably.

    Returns (files removed, their bytes). One directory fsync per directory, not per file.
    """
    files = size = 0
    dirs: set[Path] = set()
    for rel in relative_paths:
        path = storage.absolute(rel)
        try:
            n = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            continue
        files += 1
        size += n
        dirs.add(path.parent)
    for d in sorted(dirs):
        if not storage.prune_dir(d) and d.is_dir():
            fsync_dir(d)
    return files, size


def delete_instances(
    conn: Connection, storage: Storage, series_id: int, items: Sequence[tuple[int, str]], *, revision: int | None = None
) -> Removed:
    """:func:`delete_instance_rows`, then :func:`remove_files`; the caller commits ``conn`` afterwards."""
    gone = delete_instance_rows(conn, series_id, items, revision=revision)
    files, size = remove_files(storage, gone)
    return Removed(len(gone), files, size)
