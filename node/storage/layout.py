"""Where instances live on disk and how they get there without ever being half-written.

File and directory names are hashes of UIDs plus a random token: a UID like
``../../etc/x`` only ever becomes hex digits, so nothing a peer sends can
choose a path. Instances of one series share a directory: it is created (and
its creation made durable) once per series rather than once per instance,
and it is what retention and browsing want anyway. The token lets an "overwrite" duplicate land beside the old
file, be indexed, and only then replace it, so a failure at any step leaves
the previous, indexed copy intact.

Layout under ``data_dir``::

    storage/ab/<sha256(series uid)[:32]>/<sha256(sop uid)[:32]>-<token>.dcm
    tmp/<process>/rx-*.part                        data sets being received by node process <process>
    tmp/<process>/job-<id>-<attempt>/              a job run's outputs before they are stored
    quarantine/<process>/                          files that process's recovery could not index

Several node processes may share one data directory (``[node] processes``, or several hosts): each
has its own temp and quarantine directory, named after its process id (:func:`node.index.cluster.file_name`), so one
process clearing what it left never touches another's files in flight (node.storage.recovery).
"""

from __future__ import annotations

import errno
import hashlib
import os
import random
import secrets
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path

from node.index.cluster import file_name

STORAGE_DIR = "storage"
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
SUFFIX = ".dcm"


class Storage:
    """The node's file store rooted at ``data_dir``, as node process ``process`` uses it.

    A node passes its process id (node.index.cluster.Membership.id). Without one (tools and tests that
    only read or remove stored files) the store gets a temp directory of its own under a made-up name.
    """

    def __init__(self, data_dir: Path, process: str | None = None) -> None:
        self.root = data_dir.resolve()
        self.process = process or f"standalone:{os.getpid()}:{secrets.token_hex(4)}"
        self.files = self.root / STORAGE_DIR
        #: Every process's temp directories are under ``tmp_root``; ``tmp`` is this process's.
        self.tmp_root = self.root / TMP_DIR
        self.tmp = self.tmp_root / file_name(self.process)
        self.quarantine_root = self.root / QUARANTINE_DIR
        #: Made when recovery first moves a file there.
        self.quarantine = self.quarantine_root / file_name(self.process)
        #: Series directories known to exist durably (bounded: see place()), to save a stat per instance.
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def prepare(self) -> bool:
        """Create the directories (this process's temp directory too); True when the data directory is new.

        A node calls it only once its process row is in the index: another process starting up removes
        temp directories named after no live process (node.storage.recovery.clear_scratch).
        """
        new = not self.files.exists()
        for d in (self.root, self.files, self.tmp_root, self.quarantine_root, self.tmp):
            d.mkdir(parents=True, exist_ok=True)
        fsync_dir(self.root)
        return new

    def clear_temp(self, entry: Path) -> int:
        """Remove ``entry`` (a file or a directory tree directly under ``tmp/``); returns the files removed."""
        if entry.parent != self.tmp_root:
            raise ValueError(f"{entry} is not an entry of {self.tmp_root}")
        if not entry.is_dir() or entry.is_symlink():
            try:
                entry.unlink()
            except FileNotFoundError:
                return 0
            return 1
        removed = sum(len(names) for _dir, _subdirs, names in os.walk(entry))
        shutil.rmtree(entry, ignore_errors=True)  # another process may be clearing it too
        return removed

    def path_for(self, series_instance_uid: str, sop_instance_uid: str) -> Path:
        series = _digest(series_instance_uid)
        name = f"{_digest(sop_instance_uid)[:32]}-{random.getrandbits(32):08x}{SUFFIX}"
        return self.files / series[:2] / series[:32] / name

    def relative(self, path: Path) -> str:
        """Index paths are relative so a data directory can be moved."""
        return path.relative_to(self.root).as_posix()

    def absolute(self, relative: str) -> Path:
        path = (self.root / relative).resolve()
        if not path.is_relative_to(self.root):
            raise ValueError(f"index path {relative!r} points outside the data directory")
        return path

    def free_bytes(self) -> int:
        return shutil.disk_usage(self.root).free

    def place(self, temp_path: str | Path, final: Path) -> None:
        """Atomically move an already fsync'ed temp file to ``final``.

        The rename is durable only after :func:`fsync_dir` on ``final.parent``;
        callers may overlap that with other work but must wait for it before
        acknowledging.
        """
        parent = final.parent
        self._ensure_dir(parent)
        try:
            os.rename(temp_path, final)
        except FileNotFoundError:
            if parent.is_dir() or not Path(temp_path).exists():
                raise
            # The series directory was removed meanwhile (retention found it empty, perhaps in another
            # process): forget it, make it again, and try once more.
            with self._dirs_lock:
                self._dirs.discard(parent)
            self._ensure_dir(parent)
            os.rename(temp_path, final)

    def _ensure_dir(self, parent: Path) -> None:
        if parent not in self._dirs:
            # Whoever created the directory, its entry must be durable before a
            # rename into it is acknowledged; the lock makes a second thread wait
            # for the first one's parent fsyncs instead of racing past them.
            with self._dirs_lock:
                if parent not in self._dirs:
                    parent.mkdir(parents=True, exist_ok=True)
                    fsync_dir(parent.parent)
                    fsync_dir(parent.parent.parent)
                    if len(self._dirs) > 100_000:  # a cache, not a registry
                        self._dirs.clear()
                    self._dirs.add(parent)

    def remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        fsync_dir(path.parent)

    def prune_dir(self, directory: Path) -> bool:
        """Remove a series directory under ``storage/`` if it is empty (durably); True if it went."""
        if not directory.is_relative_to(self.files) or directory == self.files:
            raise ValueError(f"{directory} is not a series directory under {self.files}")
        with self._dirs_lock:
            self._dirs.discard(directory)
            try:
                directory.rmdir()
            except OSError:  # not empty (an instance arrived meanwhile) or already gone
                return False
        fsync_dir(directory.parent)
        return True

    def iter_stored(self) -> Iterator[Path]:
        """Every stored instance file (for recovery and audits)."""
        if not self.files.is_dir():
            return
        for dirpath, _dirs, names in os.walk(self.files):
            for name in names:
                if name.endswith(SUFFIX):
                    yield Path(dirpath) / name


def _digest(uid: str) -> str:
    return hashlib.sha256(uid.encode("utf-8", "surrogateescape")).hexdigest()


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
