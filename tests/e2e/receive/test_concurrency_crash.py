"""Many senders at once, kill -9 in the middle, and what start-up recovery makes of it.

Every test runs ``dicom-node run`` in a subprocess and talks to it with DCMTK
``storescu``, as a PACS would. What a sender was told is read from its own
output (``-v`` prints "Sending file: PATH" and then "Received Store Response
(Success)" for each acknowledged instance), never from the node's logs.

A note on what a kill -9 can and cannot prove: the kernel keeps the page
cache of a killed process, so a node that answered Success *before* fsync
would still pass the crash test. :func:`test_success_only_after_fsync_rename_and_commit`
closes that gap by auditing, inside the node process, the order of the
system calls behind each Success it sends.
"""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
import time
import warnings
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from helpers import PEER_ENV, NodeProcess, dataset_bytes, dcmtk, make_ct_series, read_sop_uid, storescu
from pydicom.uid import generate_uid

LOG_FORBIDDEN = ("database is locked", "aborted", "Traceback")


# --- helpers -------------------------------------------------------------------------------------


@dataclass
class Sender:
    """One ``storescu`` process sending one series, its output kept in a file (no pipe to fill up)."""

    name: str
    files: list[Path]
    log_path: Path
    proc: subprocess.Popen | None = None
    returncode: int | None = None

    def start(self, port: int) -> Sender:
        cmd = [
            dcmtk("storescu"),
            "-v",
            "-nh",
            "-R",
            "-aet",
            self.name,
            "-aec",
            "DICOM_NODE",
            "127.0.0.1",
            str(port),
            *map(str, self.files),
        ]
        with open(self.log_path, "wb") as out:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=PEER_ENV)
        return self

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def acknowledged(self) -> set[Path]:
        """Files this sender got a Success C-STORE-RSP for."""
        return parse_storescu_successes(self.output())


_SENDING = re.compile(r"^I: Sending file: (.+?)\s*$")
_RESPONSE = re.compile(r"^I: Received Store Response \((.+?)\)")


def parse_storescu_successes(output: str) -> set[Path]:
    """DCMTK 3.6.7 storescu -v: ``Sending file: PATH`` ... ``Received Store Response (Success)``."""
    current: Path | None = None
    ok: set[Path] = set()
    for line in output.splitlines():
        if m := _SENDING.match(line):
            current = Path(m.group(1))
        elif (m := _RESPONSE.match(line)) and current is not None:
            if m.group(1) == "Success":
                ok.add(current)
            current = None
    return ok


def wait_senders(senders: list[Sender], timeout: float) -> None:
    """Wait for all senders within one deadline; kill (and fail on) any still running after it."""
    deadline = time.monotonic() + timeout
    stuck = []
    for s in senders:
        assert s.proc is not None
        try:
            s.returncode = s.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            s.proc.kill()
            s.returncode = s.proc.wait(10)
            stuck.append(s.name)
    assert not stuck, f"storescu {stuck} still running after {timeout} s"


def wait_until(predicate, timeout: float, what: str, interval: float = 0.02) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def count_instances(node: NodeProcess) -> int:
    try:
        return node.query("select count(*) from instance")[0][0]
    except sqlite3.OperationalError as e:
        if "no such table" in str(e):  # the node has not created its schema yet
            return 0
        raise


def check_log(text: str) -> None:
    for bad in LOG_FORBIDDEN:
        assert bad not in text, (
            f"node log contains {bad!r}:\n" + "\n".join(line for line in text.splitlines() if bad in line)[-4000:]
        )


def source_index(files: list[Path]) -> dict[str, Path]:
    return {read_sop_uid(f): f for f in files}


def instance_rows(node: NodeProcess) -> dict[str, dict]:
    with closing(node.db()) as c:
        c.row_factory = sqlite3.Row
        return {r["sop_instance_uid"]: dict(r) for r in c.execute("select * from instance")}


def storage_relpaths(node: NodeProcess) -> set[str]:
    return {p.relative_to(node.data_dir).as_posix() for p in node.stored_files()}


def quarantined(node: NodeProcess) -> list[Path]:
    q = node.data_dir / "quarantine"
    return sorted(p for p in q.rglob("*") if p.is_file()) if q.is_dir() else []


def send_five(node: NodeProcess, tmp_path: Path) -> dict[str, Path]:
    files = make_ct_series(tmp_path / "src", 5, seed=7)
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stdout + r.stderr
    assert count_instances(node) == 5
    return source_index(files)


def last_stop(node: NodeProcess) -> str | None:
    """When the node process that registered last recorded its clean stop (None: it did not)."""
    rows = node.query("select stopped_at from node_process order by started_at desc limit 1")
    assert rows, "the node registered no process row"
    return rows[0][0]


def stop_cleanly(node: NodeProcess) -> None:
    assert node.stop() == 0, node.log()[-4000:]
    assert last_stop(node) is not None, "a clean stop must be recorded in the node's process row"
    left = list((node.data_dir / "tmp").iterdir())
    assert left == [], f"a clean stop leaves no temp directory behind: {left}"


def forget_clean_stop(node: NodeProcess) -> None:
    """Make the last stop look like a crash (kill -9 between rename and commit): nothing says it was clean."""
    with closing(node.db()) as c, c:
        c.execute("update node_process set stopped_at = null, recovered_at = null")


def log_since(node: NodeProcess, offset: int) -> str:
    return node.log()[offset:]


# --- 1. concurrency ------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_eight_concurrent_associations_of_200_instances(node, tmp_path: Path):
    """8 senders x 200 instances at once: nothing lost, nothing locked, every byte as sent.

    All series share one patient and one study, so the patient and study rows
    are created under concurrent first arrivals too.
    """
    study_uid = generate_uid()
    senders = [
        Sender(
            f"SENDER{i}",
            make_ct_series(tmp_path / f"src{i}", 200, 64, 64, seed=i, study_uid=study_uid),
            tmp_path / f"storescu{i}.log",
        )
        for i in range(8)
    ]
    node.start()

    t0 = time.monotonic()
    for s in senders:
        s.start(node.port)
    wait_senders(senders, timeout=180)
    elapsed = time.monotonic() - t0
    print(f"8 x 200 instances received in {elapsed:.1f} s ({1600 / elapsed:.0f} instances/s)")

    for s in senders:
        assert s.returncode == 0, f"{s.name} exited with {s.returncode}:\n{s.output()[-3000:]}"
        assert s.acknowledged() == set(s.files), f"{s.name}: not every file got Success"

    assert count_instances(node) == 1600
    assert node.query("select count(*) from patient") == [(1,)]
    assert node.query("select count(*) from study") == [(1,)]
    series = node.query(
        "select s.series_instance_uid, s.instance_count, count(i.id) from series s "
        "left join instance i on i.series_fk = s.id group by s.id"
    )
    assert len(series) == 8
    assert all(count == 200 and rows == 200 for _uid, count, rows in series), series

    rows = instance_rows(node)
    for s in senders:
        src = source_index(s.files)
        series_uids = {rows[uid]["series_fk"] for uid in src}
        assert len(series_uids) == 1, f"{s.name}'s instances are spread over several series"
        for uid, f in src.items():
            row = rows[uid]
            assert row["calling_ae"] == s.name
            stored = node.data_dir / row["file_path"]
            assert stored.is_file(), f"{row['file_path']} is indexed but missing"
            assert row["file_size"] == stored.stat().st_size
            assert dataset_bytes(stored) == dataset_bytes(f), f"{uid}: stored data set differs from {f}"

    assert storage_relpaths(node) == {r["file_path"] for r in rows.values()}, "storage and index disagree"
    assert node.temp_files() == []
    check_log(node.log())


# --- 2. kill -9 in the middle of four associations --------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_kill9_during_four_associations_then_recovery(node, tmp_path: Path):
    """kill -9 while 4 associations stream: nothing acknowledged is lost, storage and index agree."""
    senders = [
        Sender(
            f"CRASH{i}",
            make_ct_series(tmp_path / f"src{i}", 200, 128, 128, seed=100 + i),
            tmp_path / f"storescu{i}.log",
        )
        for i in range(4)
    ]
    source = {uid: f for s in senders for uid, f in source_index(s.files).items()}
    total = len(source)
    node.start()
    for s in senders:
        s.start(node.port)

    # Kill after ~1 s with rows committed, or earlier on a machine fast enough to finish soon.
    t0 = time.monotonic()
    wait_until(
        lambda: (n := count_instances(node)) >= 300 or (n > 0 and time.monotonic() - t0 >= 1.0),
        timeout=60,
        what="indexed instances",
    )
    killed_at = count_instances(node)
    node.kill9()
    print(f"killed the node {time.monotonic() - t0:.2f} s after the senders started, {killed_at} rows indexed")
    wait_senders(senders, timeout=60)

    acknowledged = {p for s in senders for p in s.acknowledged()}
    assert 0 < len(acknowledged) < total, (
        f"{len(acknowledged)} of {total} acknowledged: the kill did not land mid-transfer; make the series bigger"
    )
    assert any(s.returncode != 0 for s in senders), "no sender noticed the crash"

    # Restart on the same data directory: recovery must run (no clean stop recorded).
    log_offset = len(node.log())
    assert last_stop(node) is None
    node.start()
    restart_log = log_since(node, log_offset)
    assert re.search(r"recovery: node process\(es\) \S+ did not stop cleanly", restart_log), restart_log
    assert re.search(r"recovery: checked \d+ file\(s\)", restart_log), restart_log

    rows = instance_rows(node)
    adopted = [uid for uid in rows if rows[uid]["association_id"] == "recovered"]
    q = quarantined(node)
    print(
        f"after recovery: {len(rows)} rows, {len(acknowledged)} acknowledged, "
        f"{len(adopted)} indexed by recovery, {len(q)} quarantined"
    )
    for p in q:
        warnings.warn(f"recovery quarantined {p}", stacklevel=1)

    # Every acknowledged instance survived: indexed, on disk, byte-identical.
    ack_uids = {read_sop_uid(p): p for p in acknowledged}
    missing = sorted(set(ack_uids) - set(rows))
    assert not missing, f"{len(missing)} acknowledged instances are not in the index: {missing[:5]}"
    for uid, f in ack_uids.items():
        stored = node.data_dir / rows[uid]["file_path"]
        assert stored.is_file(), f"acknowledged {uid} has no stored file"
        ds = pydicom.dcmread(stored)
        assert ds.SOPInstanceUID == uid
        assert dataset_bytes(stored) == dataset_bytes(f), f"acknowledged {uid}: stored bytes differ from {f}"

    # Whatever else is indexed (committed but not acknowledged, or indexed by recovery) is complete too.
    for uid, row in rows.items():
        assert uid in source, f"unknown instance {uid} in the index"
        stored = node.data_dir / row["file_path"]
        assert stored.is_file(), f"row {uid} points at a missing file {row['file_path']}"
        assert row["file_size"] == stored.stat().st_size
        assert dataset_bytes(stored) == dataset_bytes(source[uid]), f"{uid}: stored bytes differ"

    # Index and storage agree both ways; series counts match their rows; no temp files.
    on_disk = storage_relpaths(node)
    indexed = {r["file_path"] for r in rows.values()}
    assert on_disk - indexed == set(), f"files without a row: {sorted(on_disk - indexed)[:5]}"
    assert indexed - on_disk == set(), f"rows without a file: {sorted(indexed - on_disk)[:5]}"
    mismatched = node.query(
        "select s.series_instance_uid, s.instance_count, count(i.id) from series s "
        "left join instance i on i.series_fk = s.id group by s.id having s.instance_count != count(i.id)"
    )
    assert mismatched == [], f"series.instance_count disagrees with the instance rows: {mismatched}"
    assert not [p for p in node.temp_files() if p.name.startswith("rx-")], node.temp_files()

    # A PACS retries what it was not told Success for: afterwards every series is complete, once.
    for i, s in enumerate(senders):
        todo = [f for f in s.files if f not in acknowledged]
        if todo:
            r = storescu(node.port, todo, "-v", aet=f"RETRY{i}", timeout=120)
            assert r.returncode == 0, r.stderr[-3000:]
            assert parse_storescu_successes(r.stderr) == set(todo), r.stderr[-3000:]
    assert count_instances(node) == total
    assert sorted(c for (c,) in node.query("select instance_count from series")) == [200] * 4
    assert len(node.stored_files()) == total
    assert node.temp_files() == []
    assert "Traceback" not in node.log()


# --- 3. recovery, one case at a time ----------------------------------------------------------------

_ROW_COLUMNS_FROM_DATA = (
    "sop_instance_uid",
    "series_fk",
    "sop_class_uid",
    "transfer_syntax_uid",
    "instance_number",
    "acquisition_number",
    "image_type",
    "rows",
    "columns",
    "number_of_frames",
    "bits_allocated",
    "photometric_interpretation",
    "image_position_patient",
    "image_orientation_patient",
    "pixel_spacing",
    "slice_thickness",
    "slice_location",
    "file_path",
    "file_size",
    "checksum",
)


def _lose_row(node: NodeProcess, uid: str) -> None:
    """What a crash between rename and commit leaves: the file, but neither the row nor its count."""
    with closing(node.db()) as c, c:
        (series_fk,) = c.execute("select series_fk from instance where sop_instance_uid = ?", (uid,)).fetchone()
        assert c.execute("delete from instance where sop_instance_uid = ?", (uid,)).rowcount == 1
        c.execute("update series set instance_count = instance_count - 1 where id = ?", (series_fk,))
    forget_clean_stop(node)


def test_recovery_indexes_a_stored_file_whose_row_is_missing(node, tmp_path: Path):
    """A file renamed into place whose row never committed is indexed at start, as if received."""
    node.start()
    src = send_five(node, tmp_path)
    uid = sorted(src)[2]
    before = instance_rows(node)[uid]
    stop_cleanly(node)
    _lose_row(node, uid)
    assert uid not in instance_rows(node)

    offset = len(node.log())
    node.start()
    log = log_since(node, offset)
    assert "did not stop cleanly" in log
    assert f"recovery: indexed {uid}" in log, log

    after = instance_rows(node)
    assert len(after) == 5
    for col in _ROW_COLUMNS_FROM_DATA:
        assert after[uid][col] == before[col], f"{col}: {after[uid][col]!r} != {before[col]!r}"
    assert node.query("select instance_count from series") == [(5,)]
    assert quarantined(node) == []
    assert storage_relpaths(node) == {r["file_path"] for r in after.values()}


def test_recovered_row_keeps_the_calling_ae_title(node, tmp_path: Path):
    """Rules match on calling AE titles; the stored File Meta keeps it, so recovery can too."""
    node.start()
    src = send_five(node, tmp_path)
    uid = sorted(src)[0]
    stop_cleanly(node)
    _lose_row(node, uid)
    node.start()
    assert instance_rows(node)[uid]["calling_ae"] == "STORESCU"


@pytest.mark.parametrize("clean_stop", [True, False], ids=["after-clean-stop", "after-crash"])
def test_leftover_temp_file_is_removed_at_start(node, tmp_path: Path, clean_stop: bool):
    """A half-received data set never survives a start, whether or not the last stop was clean."""
    node.start()
    src = send_five(node, tmp_path)
    stop_cleanly(node)
    if not clean_stop:
        forget_clean_stop(node)
    junk = node.data_dir / "tmp" / "rx-junk.part"
    junk.write_bytes(b"\x00" * 128 + b"DICM" + os.urandom(1000))

    offset = len(node.log())
    node.start()
    log = log_since(node, offset)
    assert not junk.exists()
    assert node.temp_files() == []
    assert "removed 1 incomplete temporary file" in log, log
    assert ("did not stop cleanly" in log) is (not clean_stop), "full scan exactly when the last stop was not clean"
    assert quarantined(node) == []
    rows = instance_rows(node)
    assert set(rows) == set(src)
    assert all((node.data_dir / r["file_path"]).is_file() for r in rows.values())


def test_row_whose_file_is_missing_is_reported_and_node_starts(node, tmp_path: Path):
    """A lost file is named in the log (by SOP Instance UID) and does not stop the node from starting."""
    node.start()
    src = send_five(node, tmp_path)
    uid = sorted(src)[1]
    lost = node.data_dir / instance_rows(node)[uid]["file_path"]
    stop_cleanly(node)
    lost.unlink()
    forget_clean_stop(node)

    offset = len(node.log())
    node.start()  # waits for C-ECHO: the node is up
    log = log_since(node, offset)
    reported = [line for line in log.splitlines() if uid in line]
    assert reported and any("no file" in line for line in reported), log
    # Still a working node: it takes new instances.
    more = make_ct_series(tmp_path / "more", 2, seed=8)
    r = storescu(node.port, more)
    assert r.returncode == 0, r.stderr
    assert count_instances(node) == 7


def test_resending_an_instance_whose_file_is_lost_restores_it(node, tmp_path: Path):
    """After recovery reported a lost file, the PACS re-sends it: the node must keep that copy."""
    node.start()
    src = send_five(node, tmp_path)
    uid = sorted(src)[1]
    stop_cleanly(node)
    lost = node.data_dir / instance_rows(node)[uid]["file_path"]
    lost.unlink()
    forget_clean_stop(node)
    node.start()
    r = storescu(node.port, [src[uid]])
    assert r.returncode == 0, r.stderr
    stored = node.data_dir / instance_rows(node)[uid]["file_path"]
    assert stored.is_file(), "the sender was told Success, but the node still has no file for the instance"


# --- 4. the order behind each Success (what kill -9 cannot see) ----------------------------------------

#: Installed as ``sitecustomize`` in the node process only (PYTHONPATH), it wraps the os calls the
#: write path uses and, just before each C-STORE-RSP leaves the socket, checks the instance it
#: acknowledges: data synced before the rename, the directory synced after it, any directory the
#: node created made durable, and the index row committed (visible to another connection). Every
#: sync and every SQLite commit is slowed down by 50 ms, so a Success that races one of them
#: instead of waiting for it loses the race every time.
AUDIT_SHIM = r'''
import json, os, socket, sqlite3, threading, time

_OUT = os.environ["DICOM_NODE_TEST_AUDIT"]
_DELAY = float(os.environ.get("DICOM_NODE_TEST_SYNC_DELAY", "0.05"))
_DATA = os.path.realpath(os.environ["DICOM_NODE_TEST_DATA_DIR"])
_STORAGE = os.path.join(_DATA, "storage")
_lock = threading.Lock()
_seq = [0]
_synced_files = set()
_dir_synced = {}    # dir -> largest start sequence number of a completed fsync
_renamed = {}       # final path -> (source synced before the rename, sequence after the rename)
_created = {}       # dir -> sequence after mkdir

def _tick():
    with _lock:
        _seq[0] += 1
        return _seq[0]

def _write(record):
    with _lock, open(_OUT, "a") as fp:
        fp.write(json.dumps(record) + "\n")

def _wrap_sync(orig):
    def sync(fd):
        try:
            path = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            path = None
        is_dir = path is not None and os.path.isdir(path)
        start = _tick()
        time.sleep(_DELAY)  # a slow disk: any Success that does not wait for this now shows up
        result = orig(fd)
        if path is not None:
            with _lock:
                if is_dir:
                    _dir_synced[path] = max(start, _dir_synced.get(path, 0))
                else:
                    _synced_files.add(path)
        return result
    return sync

def _wrap_rename(orig):
    def rename(src, dst, *args, **kwargs):
        s = os.path.realpath(os.fspath(src))
        d = os.path.realpath(os.fspath(dst))
        with _lock:
            was_synced = s in _synced_files
        result = orig(src, dst, *args, **kwargs)
        seq = _tick()
        with _lock:
            _renamed[d] = (was_synced, seq)
        return result
    return rename

_orig_mkdir = os.mkdir
def _mkdir(path, *args, **kwargs):
    result = _orig_mkdir(path, *args, **kwargs)
    seq = _tick()
    with _lock:
        _created[os.path.realpath(os.fspath(path))] = seq
    return result

os.fdatasync = _wrap_sync(os.fdatasync)
os.fsync = _wrap_sync(os.fsync)
os.rename = _wrap_rename(os.rename)
os.replace = _wrap_rename(os.replace)
os.mkdir = _mkdir

def _store_response(data):
    """(status, affected SOP instance UID) if ``data`` is a P-DATA-TF carrying a C-STORE-RSP."""
    if len(data) < 12 or data[0] != 0x04:
        return None
    pos, end = 6, 6 + int.from_bytes(data[2:6], "big")
    while pos + 6 <= end:
        item_len = int.from_bytes(data[pos:pos + 4], "big")
        header = data[pos + 5]
        body = data[pos + 6:pos + 4 + item_len]
        pos += 4 + item_len
        if not header & 0x01:
            continue
        elems, i = {}, 0
        while i + 8 <= len(body):
            elem = int.from_bytes(body[i + 2:i + 4], "little")
            length = int.from_bytes(body[i + 4:i + 8], "little")
            elems[elem] = body[i + 8:i + 8 + length]
            i += 8 + length
        if int.from_bytes(elems.get(0x0100, b"\0\0"), "little") == 0x8001:
            return (int.from_bytes(elems.get(0x0900, b"\0\0"), "little"),
                    elems.get(0x1000, b"").rstrip(b"\0 ").decode("ascii"))
    return None

def _audit(status, uid):
    problems = []
    if status == 0:
        con = _orig_connect(f"file:{_DATA}/index.sqlite?mode=ro", uri=True, timeout=10)
        try:
            row = con.execute("select file_path from instance where sop_instance_uid = ?", (uid,)).fetchone()
        finally:
            con.close()
        if row is None:
            problems.append("no committed index row")
        else:
            final = os.path.realpath(os.path.join(_DATA, row[0]))
            parent = os.path.dirname(final)
            with _lock:
                renamed = _renamed.get(final)
                dir_synced = dict(_dir_synced)
                created = dict(_created)
            if not os.path.isfile(final):
                problems.append("the indexed file does not exist")
            if renamed is None:
                problems.append("the file was never renamed into place")
            else:
                data_synced, renamed_at = renamed
                if not data_synced:
                    problems.append("renamed into place before its data was synced")
                if dir_synced.get(parent, 0) <= renamed_at:
                    problems.append("its directory was not synced after the rename")
            d = parent
            while d.startswith(_STORAGE + os.sep):
                if d in created and dir_synced.get(os.path.dirname(d), 0) <= created[d]:
                    problems.append(f"directory {d} was created but its parent not synced since")
                d = os.path.dirname(d)
    _write({"uid": uid, "status": status, "problems": problems})

_orig_connect = sqlite3.connect

class _SlowCommitConnection(sqlite3.Connection):
    def commit(self):
        time.sleep(_DELAY)
        return super().commit()

def _connect(*args, **kwargs):
    kwargs.setdefault("factory", _SlowCommitConnection)
    return _orig_connect(*args, **kwargs)

sqlite3.connect = sqlite3.dbapi2.connect = _connect

_orig_sendall = socket.socket.sendall
def _sendall(self, data, *args):
    try:
        rsp = _store_response(bytes(data))
        if rsp is not None:
            _audit(*rsp)
    except Exception as e:
        _write({"error": repr(e)})
    return _orig_sendall(self, data, *args)

socket.socket.sendall = _sendall
'''


@pytest.mark.timeout(120)
def test_success_only_after_fsync_rename_and_commit(node, tmp_path: Path):
    """Each Success is sent only when the bytes, the rename and the index row are durable.

    Without this, a node that fsync'ed after answering (or not at all) would pass
    every other test here: kill -9 does not drop the page cache, only power loss does.
    """
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(AUDIT_SHIM)
    audit = tmp_path / "audit.jsonl"
    node.env = {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(shim), os.environ.get("PYTHONPATH", "")])),
        "DICOM_NODE_TEST_AUDIT": str(audit),
        "DICOM_NODE_TEST_DATA_DIR": str(node.data_dir),
    }
    senders = [
        Sender(f"AUDIT{i}", make_ct_series(tmp_path / f"src{i}", 20, seed=200 + i), tmp_path / f"s{i}.log")
        for i in range(2)
    ]
    node.start()
    for s in senders:
        s.start(node.port)
    wait_senders(senders, timeout=60)
    for s in senders:
        assert s.returncode == 0, s.output()[-3000:]
    assert node.stop() == 0

    records = [json.loads(line) for line in audit.read_text().splitlines()] if audit.exists() else []
    errors = [r for r in records if "error" in r]
    assert not errors, f"the audit shim failed: {errors[:3]}"
    assert len(records) == 40, f"expected one audited C-STORE-RSP per instance, got {len(records)} (shim not active?)"
    assert all(r["status"] == 0 for r in records)
    bad = [r for r in records if r["problems"]]
    assert not bad, f"{len(bad)} Success responses were sent too early, e.g. {bad[:3]}"
