"""Where instances live on disk and how they get there without ever being half-written.

File names are a hash of the SOP Instance UID plus a random token: a UID like
``../../etc/x`` only ever becomes hex digits, so nothing a peer sends can
choose a path. The token lets an "overwrite" duplicate land beside the old
file, be indexed, and only then replace it, so a failure at any step leaves
the previous, indexed copy intact.

Layout under ``data_dir``::

    storage/ab/cd/<sha256(uid)[:32]>-<token>.dcm   stored instances
    tmp/rx-*.part                                  data sets being received
    quarantine/                                    files recovery could not index
"""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
import shutil
import threading
from pathlib import Path

STORAGE_DIR = "storage"
TMP_DIR = "tmp"
QUARANTINE_DIR = "quarantine"
SUFFIX = ".dcm"


class Storage:
    """The node's file store rooted at ``data_dir``."""

    def __init__(self, data_dir: Path) -> None:
        self.root = data_dir.resolve()
        self.files = self.root / STORAGE_DIR
        self.tmp = self.root / TMP_DIR
        self.quarantine = self.root / QUARANTINE_DIR
        #: Leaf directories known to exist durably (at most 65,536), to save a stat per instance.
        self._dirs: set[Path] = set()
        self._dirs_lock = threading.Lock()

    def prepare(self) -> bool:
        """Create the directories; returns True when the data directory is new."""
        new = not self.files.exists()
        for d in (self.root, self.files, self.tmp, self.quarantine):
            d.mkdir(parents=True, exist_ok=True)
        _fsync_dir(self.root)
        return new

    def path_for(self, sop_instance_uid: str) -> Path:
        digest = hashlib.sha256(sop_instance_uid.encode("utf-8", "surrogateescape")).hexdigest()
        return self.files / digest[:2] / digest[2:4] / f"{digest[:32]}-{secrets.token_hex(4)}{SUFFIX}"

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

        The rename is durable only after :meth:`sync_dir` on ``final.parent``;
        callers may overlap that with other work but must wait for it before
        acknowledging.
        """
        parent = final.parent
        if parent not in self._dirs:
            # Whoever created the directory, its entry must be durable before a
            # rename into it is acknowledged; the lock makes a second thread wait
            # for the first one's parent fsyncs instead of racing past them.
            with self._dirs_lock:
                if parent not in self._dirs:
                    parent.mkdir(parents=True, exist_ok=True)
                    _fsync_dir(parent.parent)
                    _fsync_dir(parent.parent.parent)
                    self._dirs.add(parent)
        os.rename(temp_path, final)

    @staticmethod
    def sync_dir(path: Path) -> None:
        _fsync_dir(path)

    def commit(self, temp_path: str | Path, final: Path) -> None:
        """Atomically move an already fsync'ed temp file to ``final`` and make the rename durable."""
        self.place(temp_path, final)
        _fsync_dir(final.parent)

    def remove(self, path: Path) -> None:
        try:
            path.unlink()
        except FileNotFoundError:
            return
        _fsync_dir(path.parent)

    def iter_stored(self):  # type: ignore[no-untyped-def]
        """Every stored instance file (for recovery and audits)."""
        if not self.files.is_dir():
            return
        for dirpath, _dirs, names in os.walk(self.files):
            for name in names:
                if name.endswith(SUFFIX):
                    yield Path(dirpath) / name


def fsync_dir(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:  # some filesystems cannot fsync directories
        if e.errno not in (errno.EINVAL, errno.EBADF):
            raise
    finally:
        os.close(fd)
