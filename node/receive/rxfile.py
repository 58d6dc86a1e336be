"""A file that one C-STORE data set is streamed into as its fragments arrive."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

import xxhash

from node.dicom.files import CHECKSUM_ALGORITHM

_counter = itertools.count()
#: How much of the start of each file is also kept in memory, so the header
#: can be checked without reading the file back (most headers are < 8 KiB).
HEAD_BYTES = 64 * 1024


class ReceivedFile:
    """Temp file on the storage filesystem, hashed while written.

    Hashing as the bytes arrive means the checksum costs no second read (and
    xxh3 rather than SHA-256: this is an integrity check, not a signature), and
    writing with ``os.write`` on a raw descriptor means no user-space buffer
    to flush: :meth:`sync` is the one place durability is paid for.

    A write that fails (the storage is full) does not raise: the file is removed at once, the
    error is kept in :attr:`error`, and the rest of the data set is taken and dropped. The
    association can then read to the end of the data set and answer it (0xA700) instead of
    aborting, and the sender's next instance gets a fresh try.
    """

    #: Why this file could not be created or written; its data set is lost and must be refused.
    error: OSError | None = None

    def __init__(self, directory: Path) -> None:
        # Unique per process and call; O_EXCL guards against any leftover.
        name = os.path.join(directory, f"rx-{os.getpid()}-{next(_counter)}.part")
        self.fd: int | None = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        self.name = name
        self.size = 0
        #: Where the data set starts (after our File Meta).
        self.dataset_offset = 0
        self._hash = xxhash.xxh3_128()
        self.head = bytearray()

    @classmethod
    def unwritable(cls, error: OSError) -> ReceivedFile:
        """A stand-in for a file that could not be created: it takes a data set and keeps nothing."""
        rx = cls.__new__(cls)
        rx.fd, rx.name, rx.size, rx.dataset_offset = None, "", 0, 0
        rx._hash, rx.head, rx.error = xxhash.xxh3_128(), bytearray(), error
        return rx

    def write(self, data: bytes | bytearray | memoryview) -> int:
        view = memoryview(data)
        total = len(view)
        self.size += total
        if self.error is not None:
            return total
        if self.fd is None:
            raise ValueError("write to a closed ReceivedFile")
        self._hash.update(view)
        if len(self.head) < HEAD_BYTES:
            self.head += view[: HEAD_BYTES - len(self.head)]
        try:
            while view:
                n = os.write(self.fd, view)
                view = view[n:]
        except OSError as e:
            self.error = e
            self.discard()  # give the space back now, not at the end of the data set
        return total

    def sync(self) -> None:
        if self.fd is not None:
            os.fdatasync(self.fd)

    def checksum(self) -> str:
        """``xxh3_128:<hex>`` of the whole file: detects bit rot and torn copies, costs ~25 GB/s."""
        return f"{CHECKSUM_ALGORITHM}:{self._hash.hexdigest()}"

    def close(self) -> None:
        if self.fd is not None:
            fd, self.fd = self.fd, None
            os.close(fd)

    def placed(self) -> None:
        """The file was renamed into storage: nothing is left to discard."""
        self.close()
        self.name = ""

    def discard(self) -> None:
        """Close and remove; every failure path ends here, and it is a no-op once placed."""
        try:
            self.close()
        except OSError:  # a late write error: the file goes anyway
            pass
        if self.name:
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass
