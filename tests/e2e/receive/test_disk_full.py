"""A full disk is an answer (0xA700), not an abort: nothing partial stays, and the node keeps serving.

The storage really fills up: the node's data directory is a small tmpfs (the tests mount one, as
root; they are skipped, saying why, where mounting is not permitted). A failing fsync or rename
cannot be provoked on tmpfs, so those are injected into the node process by a ``sitecustomize``
shim, while a trigger file exists.
"""

from __future__ import annotations

import errno
import os
import re
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
import pytest
from helpers import dataset_bytes, storescu

CT_SERIES = "series/ct-head-philips-5mm"
#: How DCMTK's storescu -v reports status 0xA700.
REFUSED_A700 = "Refused: OutOfResources"

FAULT_SHIM = """
import errno, os

_flag = os.environ.get("DICOM_NODE_TEST_ENOSPC_FLAG", "")
_mode = os.environ.get("DICOM_NODE_TEST_ENOSPC", "")


def _full(path=None):
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)


if _mode == "fdatasync":
    _real_fdatasync = os.fdatasync

    def fdatasync(fd):
        if os.path.exists(_flag):
            raise _full()
        return _real_fdatasync(fd)

    os.fdatasync = fdatasync
elif _mode == "rename":
    _real_rename = os.rename

    def rename(src, dst, *args, **kwargs):
        if str(src).endswith(".part") and os.path.exists(_flag):
            raise _full(str(dst))
        return _real_rename(src, dst, *args, **kwargs)

    os.rename = rename
"""


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[..., Path]]:
    """``mount(path, size)``: a tmpfs of ``size`` at ``path``; unmounted at the end of the test."""
    mounted: list[Path] = []

    def mount(path: Path, size: str = "8m") -> Path:
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True, text=True
        )
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs to fill up (needs root or CAP_SYS_ADMIN): {r.stderr.strip()}")
        mounted.append(path)
        return path

    try:
        yield mount
    finally:
        for path in reversed(mounted):
            if subprocess.run(["umount", str(path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path, leave: int) -> Path:
    """Fill the filesystem of ``directory`` up to ``leave`` free bytes with a filler file.

    With ``leave=0`` the aim is a full filesystem: a node writing there meanwhile (its index growing) may fill
    the last bytes first, so running out of space while filling is the aim reached, not an error.
    """
    filler = directory / "filler.bin"
    free = os.statvfs(directory).f_bavail * os.statvfs(directory).f_frsize
    left = max(0, free - leave)
    with open(filler, "wb", buffering=0) as fp:
        while left:
            try:
                left -= fp.write(b"\0" * min(left, 1 << 20))
            except OSError as e:
                if e.errno != errno.ENOSPC or leave:
                    raise
                break
    return filler


def responses(output: str) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


def series(shared_data: Path, n: int) -> list[Path]:
    files = sorted(p for p in (shared_data / CT_SERIES).iterdir() if p.name != "DIRFILE")
    return files[:n]


def assert_nothing_left(node) -> None:
    assert node.query("select count(*) from instance") == [(0,)]
    assert node.stored_files() == []
    assert node.temp_files() == []


def assert_stored(node, files: list[Path]) -> None:
    stored = {uid: path for uid, path in node.query("select sop_instance_uid, file_path from instance")}
    assert len(stored) == len(files)
    for f in files:
        uid = str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(node.data_dir / stored[uid]) == dataset_bytes(f)


def test_full_storage_answers_a700_and_the_next_association_stores(node, small_fs, shared_data: Path):
    files = series(shared_data, 4)  # ~520 KB each
    small_fs(node.data_dir, "8m")
    node.start()
    # Less free space than one instance: each data set fails part-way through its write.
    filler = fill(node.data_dir, leave=300 * 1024)
    r = storescu(node.port, files, "-v")
    out = r.stdout + r.stderr
    # Every instance answered with 0xA700 (DCMTK's name for it): the association went on after each.
    assert responses(out) == [REFUSED_A700] * len(files), out
    assert "Association Aborted" not in out and "A-ABORT" not in out, out
    assert_nothing_left(node)
    log = node.log()
    assert re.search(r"could not store \S+ from STORESCU .*the storage filesystem is full", log), log[-3000:]
    assert "Traceback" not in log

    filler.unlink()  # space again: the next association stores everything
    r = storescu(node.port, files, "-v")
    assert r.returncode == 0 and responses(r.stdout + r.stderr) == ["Success"] * len(files), r.stdout + r.stderr
    assert_stored(node, files)
    assert node.temp_files() == []


@pytest.mark.parametrize("step", ["fdatasync", "rename"])
def test_enospc_on_fsync_or_rename_answers_a700(node, shared_data: Path, tmp_path: Path, step: str):
    files = series(shared_data, 2)
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(FAULT_SHIM)
    flag = tmp_path / "disk-full"
    flag.touch()
    node.env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH", "")])),
        "DICOM_NODE_TEST_ENOSPC": step,
        "DICOM_NODE_TEST_ENOSPC_FLAG": str(flag),
    }
    node.start()
    r = storescu(node.port, files, "-v")
    out = r.stdout + r.stderr
    assert responses(out) == [REFUSED_A700] * len(files), out
    assert_nothing_left(node)
    assert re.search(r"could not store \S+ from STORESCU .*the storage filesystem is full", node.log()), node.log()

    flag.unlink()
    r = storescu(node.port, files, "-v")
    assert r.returncode == 0 and responses(r.stdout + r.stderr) == ["Success"] * len(files), r.stdout + r.stderr
    assert_stored(node, files)


def test_full_index_filesystem_answers_a700(node, small_fs, shared_data: Path, tmp_path: Path):
    """The files have room, the index does not: 0xA700, the placed file is removed again."""
    files = series(shared_data, 3)
    db_dir = small_fs(tmp_path / "index-fs", "4m")
    node.extra_config = f'\n[database]\nurl = "sqlite:///{db_dir}/index.sqlite"\n'
    node.start()
    filler = fill(db_dir, leave=0)
    r = storescu(node.port, files, "-v")
    out = r.stdout + r.stderr
    assert responses(out) == [REFUSED_A700] * len(files), out
    assert node.stored_files() == [] and node.temp_files() == []
    assert re.search(
        r"refused \S+ from STORESCU .*0xA700 the index could not record it: database or disk is full", node.log()
    ), node.log()[-3000:]

    filler.unlink()
    r = storescu(node.port, files, "-v")
    assert r.returncode == 0 and responses(r.stdout + r.stderr) == ["Success"] * len(files), r.stdout + r.stderr
    with sqlite3.connect(db_dir / "index.sqlite") as c:
        assert c.execute("select count(*) from instance").fetchone() == (len(files),)
