"""The dispatcher in a cluster of node processes (issue 16), on SQLite and PostgreSQL: what a process that is
gone was sending is taken over by a live one, and the Storage Commitment watchdog resends in one process only.
Sending itself is not started here (see test_circuit.py and tests/e2e/send)."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from queue_index import Index

from node.config import Config, load_config
from node.index.states import DeliveryState
from node.send import queue
from node.send.dispatch import Dispatcher
from node.storage import Storage


def _config(tmp_path: Path) -> Config:
    (tmp_path / "node.toml").write_text(
        f"""
[node]
data_dir = "{tmp_path / "data"}"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = 1
storage_commitment = true
commitment_timeout = 0.1
"""
    )
    return load_config(tmp_path / "node.toml")


def _delivered_asking_commitment(index: Index, owner: str) -> None:
    """Every queued delivery sent and its commitment asked for (a transaction no report ever answers)."""
    claimed = queue.claim(index.engine, "pacs", 100, owner)
    queue.record(
        index.engine,
        [
            queue.Outcome(c.id, DeliveryState.DELIVERED, 0, commitment_uid="1.2.826.0.1.3680043.8.498.9")
            for c in claimed
        ],
        owner,
    )
    time.sleep(0.15)  # past commitment_timeout


def test_only_the_holder_of_the_watchdog_duty_resends_what_was_never_committed(index: Index, tmp_path: Path) -> None:
    cfg = _config(tmp_path)
    ids = index.queue(2)
    first, second = index.process(), index.process()
    a = Dispatcher(cfg, index.connect(), Storage(cfg.data_dir), owner=first.id)
    b = Dispatcher(cfg, index.connect(), Storage(cfg.data_dir), owner=second.id)

    _delivered_asking_commitment(index, first.id)
    assert a.check_commitments() == 2, "the first to look takes the duty and resends"
    rows = index.deliveries()
    assert [(r[0], r[1]) for r in rows] == [(i, DeliveryState.QUEUED) for i in ids]
    assert rows[0][4] == "no storage commitment report within 0.1 s; sending again"

    _delivered_asking_commitment(index, second.id)
    assert b.check_commitments() == 0, "another process resent while the holder is alive"
    assert {r[1] for r in index.deliveries()} == {DeliveryState.DELIVERED}
    assert a.check_commitments() == 2

    first.stop(clean=True)  # the holder stops: its duty goes with it
    _delivered_asking_commitment(index, second.id)
    assert b.check_commitments() == 2, "the duty passed to a live process"


def test_a_live_process_takes_over_what_a_process_that_is_gone_was_sending(
    index: Index, tmp_path: Path, caplog
) -> None:
    cfg = _config(tmp_path)
    index.queue(3)
    dead, live = index.process(), index.process()
    lost = queue.claim(index.engine, "pacs", 3, dead.id)
    d = Dispatcher(cfg, index.connect(), Storage(cfg.data_dir), owner=live.id)

    d.take_over()
    assert {r[2] for r in index.deliveries()} == {dead.id}, "nothing is taken from a live process"
    dead.stop(clean=False)
    with caplog.at_level(logging.WARNING, logger="node.send.dispatch"):
        d.take_over()
    assert [r[1:3] for r in index.deliveries()] == [(DeliveryState.QUEUED, None)] * len(lost)
    assert "destination pacs: 3 deliveries were being sent by a node process that is gone" in caplog.text
    assert d.senders["pacs"]._woken, "the destination's senders were woken to send them"
    assert [c.id for c in queue.claim(index.engine, "pacs", 10, live.id)] == [c.id for c in lost]
    assert all(r[3] == 2 for r in index.deliveries()), "each try counted"
