"""``[node] processes = 3``: one node process and two receiver processes on one DICOM port.

The node is started as an administrator would (``dicom-node run``), on SQLite and on PostgreSQL, and
fed by four DCMTK ``storescu`` streams at once (real CT and MR series from the shared data, each
series split over the streams, so one series arrives at several processes). What counts is what a
sender and an operator see: every instance acknowledged is stored byte-identical and indexed once;
``ps`` and the index show the three processes; a receiver killed with SIGKILL is started again while
the port keeps answering; stopping the node stops them all, cleanly.
"""

from __future__ import annotations

import json
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest
from helpers import PEER_ENV, NodeProcess, dataset_bytes, dcmtk, read_sop_uid, wait_for
from sqlalchemy import create_engine, text

SERIES = ("series/ct-head-philips-5mm", "series/mr-t1-sag-siemens")


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest) -> str:
    """ "" for the default SQLite index in the data directory, else a new PostgreSQL database."""
    return "" if request.param == "sqlite" else str(request.getfixturevalue("postgres_url"))


def ready(node: NodeProcess) -> dict[str, str]:
    """/readyz's checks ({} while the web server does not answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{node.web_port}/readyz", timeout=5) as rsp:
            return dict(json.load(rsp)["checks"])
    except urllib.error.HTTPError as e:  # 503: not ready, with the reasons
        return dict(json.load(e)["checks"])
    except OSError:
        return {}


def receiver_pids(node: NodeProcess) -> set[int]:
    """The node's receiver processes that run now (``ps``: its children started with --receiver-of)."""
    assert node.proc is not None
    pids = set()
    for child in psutil.Process(node.proc.pid).children():
        try:
            if "--receiver-of" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                pids.add(child.pid)
        except psutil.NoSuchProcess:
            pass
    return pids


def send_streams(port: int, files: list[Path], streams: int, logs: Path) -> list[subprocess.CompletedProcess[str]]:
    """``streams`` concurrent storescu associations, file i going to stream i % streams."""
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for i in range(streams):
        out = open(logs / f"storescu-{i}.log", "w")
        cmd = [dcmtk("storescu"), "-nh", "-R", "-aet", f"SENDER{i}", "-aec", "DICOM_NODE", "127.0.0.1", str(port)]
        procs.append(
            (subprocess.Popen([*cmd, *map(str, files[i::streams])], stdout=out, stderr=out, env=PEER_ENV), out)
        )
    done = []
    for p, out in procs:
        p.wait(120)
        out.close()
        done.append(subprocess.CompletedProcess(p.args, p.returncode, (logs / out.name).read_text(), ""))
    return done


def echo(port: int) -> bool:
    r = subprocess.run([dcmtk("echoscu"), "-to", "5", "-aec", "DICOM_NODE", "127.0.0.1", str(port)], env=PEER_ENV)
    return r.returncode == 0


def test_three_processes_share_the_port_store_everything_once_and_restart(
    tmp_path: Path, shared_data: Path, database_url: str
) -> None:
    extra = "processes = 3\n" + (f'\n[database]\nurl = "{database_url}"\n' if database_url else "")
    node = NodeProcess(tmp_path / "node", extra_config=extra).start()
    engine = create_engine(database_url or f"sqlite:///{node.data_dir / 'index.sqlite'}")
    try:
        wait_for(lambda: ready(node).get("receivers") == "ok", 90, "both receiver processes listening")

        # Three processes, in ps and in the index, one of them the node and two receivers.
        pids = receiver_pids(node)
        assert len(pids) == 2
        with engine.connect() as c:
            rows = c.execute(text("select pid, role from node_process where stopped_at is null")).all()
        assert sorted(rows) == sorted([(node.proc.pid, "node"), *((p, "receiver") for p in pids)])  # type: ignore[union-attr]

        # Four streams at once, every series split over them.
        files = sorted(f for s in SERIES for f in (shared_data / s).iterdir() if f.is_file() and f.name != "DIRFILE")
        for r in send_streams(node.port, files, 4, tmp_path / "send"):
            assert r.returncode == 0, r.stdout[-2000:]
        with engine.connect() as c:
            indexed = c.execute(text("select sop_instance_uid, file_path from instance")).all()
        uids = [u for u, _ in indexed]
        assert len(uids) == len(set(uids)), "an instance is indexed twice"
        by_uid = dict(indexed)
        for f in files:
            uid = read_sop_uid(f)
            assert uid in by_uid, f"{f.name} was acknowledged but is not indexed"
            assert dataset_bytes(node.data_dir / by_uid[uid]) == dataset_bytes(f), f"{f.name} stored differently"
        assert len(by_uid) == len(files)

        # A receiver killed outright: the node starts another; the port answers all along.
        victim = min(pids)
        psutil.Process(victim).kill()
        # Until the kernel has closed the victim's socket, a connection may still be queued on it and is then
        # reset (SO_REUSEPORT; docs/scale-out.md): a sender retries. Once it is gone, the others take them all.
        wait_for(lambda: _gone(victim), 10, "the killed receiver to exit")
        # A sender retries (as DCMTK and PACS do): the replacement receiver, just bound to the port, may hold a
        # connection for a moment under load before its accept loop runs.
        assert all(echo(node.port) or echo(node.port) for _ in range(5)), (
            "the DICOM port stopped answering after a receiver died"
        )
        wait_for(lambda: len(receiver_pids(node) - {victim}) == 2, 60, "a new receiver process")
        wait_for(lambda: ready(node).get("receivers") == "ok", 60, "the new receiver listening")
        log = node.log_path.read_text()
        assert "was killed by SIGKILL" in log
        assert f"[receiver pid {victim}] " in log, "a receiver's log lines do not say which process wrote them"
        pids = receiver_pids(node)
        assert victim not in pids and len(pids) == 2

        # Stopping the node stops every process, each cleanly (its row says so).
        assert node.stop() == 0
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 10, "the receivers to exit")
        with engine.connect() as c:
            rows = c.execute(text("select pid, stopped_at from node_process")).all()
        stopped = {pid for pid, at in rows if at is not None}
        assert {node.proc.pid, *pids} <= stopped, rows  # type: ignore[union-attr]
        assert victim not in stopped
    finally:
        node.stop()
        engine.dispose()


def test_receivers_stop_cleanly_when_the_node_process_is_killed(tmp_path: Path) -> None:
    """kill -9 of the first process: its receivers get the parent-death signal and stop cleanly."""
    node = NodeProcess(tmp_path / "node", extra_config="processes = 3\n").start()
    engine = create_engine(f"sqlite:///{node.data_dir / 'index.sqlite'}")
    try:
        wait_for(lambda: ready(node).get("receivers") == "ok", 90, "both receiver processes listening")
        pids = receiver_pids(node)
        assert len(pids) == 2
        assert node.proc is not None
        node.proc.kill()
        node.proc.wait(10)
        wait_for(lambda: not any(psutil.pid_exists(p) for p in pids), 40, "the receivers to exit with their parent")
        with engine.connect() as c:
            rows = dict(c.execute(text("select pid, stopped_at from node_process")).all())
        assert rows[node.proc.pid] is None  # killed: not a clean stop
        assert all(rows[p] is not None for p in pids), f"a receiver did not stop cleanly: {rows}"
    finally:
        node.stop()
        engine.dispose()


def _gone(pid: int) -> bool:
    """The process has exited (a zombie holds no sockets any more)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True
