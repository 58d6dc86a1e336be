"""A file that one C-STORE data set is streamed into as its fragments arrive."""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path


class ReceivedFile:
    """Temp file on the storage filesystem, hashed while written.

    Hashing as the bytes arrive means the checksum costs no second read, and
    writing with ``os.write`` on a raw descriptor means no user-space buffer
    to flush: :meth:`sync` is the one place durability is paid for.
    """

    def __init__(self, directory: Path) -> None:
        fd, name = tempfile.mkstemp(prefix="rx-", suffix=".part", dir=directory)
        self.fd: int | None = fd
        self.name = name
        self.size = 0
        #: Where the data set starts (after our File Meta).
        self.dataset_offset = 0
        self._sha = hashlib.sha256()

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.fd is None:
            raise ValueError("write to a closed ReceivedFile")
        view = memoryview(data)
        total = len(view)
        self._sha.update(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.size += total
        return total

    def sync(self) -> None:
        if self.fd is not None:
            os.fdatasync(self.fd)

    def hexdigest(self) -> str:
        return self._sha.hexdigest()

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def discard(self) -> None:
        """Close and remove; every failure path ends here, and it is harmless after a rename."""
        self.close()
        try:
            os.unlink(self.name)
        except FileNotFoundError:
            pass
