"""Connections that never finish associating cannot starve real senders or the node's memory.

A slow-loris peer connects and trickles its A-ASSOCIATE-RQ one byte at a time, each byte well
inside node.acse_timeout. Before the fix every such connection held a thread and a 1 MiB buffer
for as long as it kept trickling (400 of them took 556 MB). Now node.acse_timeout is a deadline
from connect, connections that have not associated are capped overall and per address, and the
large buffer comes only with the association.

The slow connections come from other loopback addresses (127.0.0.2, ...; all of 127/8 is
loopback on Linux), so that the per-address cap does not also shut out the real sender on
127.0.0.1, as it would on a real network.
"""

from __future__ import annotations

import re
import socket
import subprocess
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from helpers import PEER_ENV, dcmtk

from node.dicom.association import build_request

ACSE_TIMEOUT = 3.0
SLOW = 400
ADDRESSES = 25  # 16 connections each: at node.max_pending_per_address (16), none refused for its address
#: Generous: the old node grew by ~1.4 MB per slow connection (a 1 MiB buffer each); now it is bounded
#: by the cap of 64 pending connections with 16 KiB buffers.
RSS_GROWTH_BOUND = 120 * 2**20


#: The start of a plausible A-ASSOCIATE-RQ (PDU header, protocol version 1, called AE title ...), sent one
#: byte per tick: more than the few bytes a connection gets out before its deadline.
REQUEST_START = build_request(
    "SLOWLORIS",
    "DICOM_NODE",
    [("1.2.840.10008.1.1", ["1.2.840.10008.1.2"])],
    implementation_class_uid="1.2.3",
    implementation_version_name=None,
).encode()[:80]


@dataclass
class SlowLoris:
    """Non-blocking sockets that each send one byte of an A-ASSOCIATE-RQ every ``interval`` s."""

    sockets: dict[socket.socket, float] = field(default_factory=dict)  # -> when it connected
    closed_after: list[float] = field(default_factory=list)  # seconds from connect to the node's close
    connected: set[socket.socket] = field(default_factory=set)
    sent: dict[socket.socket, int] = field(default_factory=dict)

    def open(self, port: int, count: int, addresses: int) -> None:
        for i in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((f"127.0.0.{2 + i % addresses}", 0))
            s.setblocking(False)
            try:
                s.connect(("127.0.0.1", port))
            except BlockingIOError:
                pass
            self.sockets[s] = time.monotonic()

    def trickle(self) -> None:
        """One byte on every open socket; note the ones the node has closed."""
        for s, since in list(self.sockets.items()):
            try:
                if s.recv(1) == b"":
                    raise ConnectionResetError
            except BlockingIOError:  # open, nothing to read: send the next byte
                pass
            except OSError:
                self._closed(s, since)
                continue
            try:
                n = self.sent.get(s, 0)
                s.send(REQUEST_START[n : n + 1])
                self.sent[s] = n + 1
            except BlockingIOError:  # still connecting (SYNs beyond the listen backlog are retried)
                continue
            except OSError:
                self._closed(s, since)
                continue
            if s not in self.connected:  # its first byte went through: the deadline runs from about now
                self.connected.add(s)
                self.sockets[s] = time.monotonic()

    def _closed(self, s: socket.socket, since: float) -> None:
        self.closed_after.append(time.monotonic() - since)
        del self.sockets[s]
        self.connected.discard(s)
        s.close()

    def close_all(self) -> None:
        for s in self.sockets:
            s.close()
        self.sockets.clear()


def metric(web_port: int, name: str, reason: str) -> float:
    body = urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=10).read().decode()
    m = re.search(rf'^{name}{{reason="{reason}"}} (\S+)$', body, re.M)
    return float(m.group(1)) if m else 0.0


def test_slow_loris_flood_is_cut_off_while_a_real_sender_stores(node, shared_data: Path):
    node.extra_config = f"acse_timeout = {ACSE_TIMEOUT}"
    node.start()
    proc = psutil.Process(node.proc.pid)
    rss_start = proc.memory_info().rss
    files = sorted(p for p in (shared_data / "series" / "ct-head-philips-5mm").iterdir() if p.name != "DIRFILE")

    loris = SlowLoris()
    try:
        loris.open(node.port, SLOW, ADDRESSES)
        rss_peak = rss_start
        sender = subprocess.Popen(
            [dcmtk("storescu"), "-v", "-nh", "-R", "-aec", "DICOM_NODE", "127.0.0.1", str(node.port), *map(str, files)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=PEER_ENV,
        )
        deadline = time.monotonic() + ACSE_TIMEOUT + 10
        while loris.sockets and time.monotonic() < deadline:
            loris.trickle()
            rss_peak = max(rss_peak, proc.memory_info().rss)
            time.sleep(0.25)
        still_open = len(loris.sockets)
        out, _ = sender.communicate(timeout=120)
    finally:
        loris.close_all()

    # The real sender got through while the flood was on.
    assert sender.returncode == 0, out
    assert re.findall(r"Received Store Response \(([^)]*)\)", out) == ["Success"] * len(files), out
    assert node.query("select count(*) from instance") == [(len(files),)]
    # Every slow connection was closed by the node, none later than its deadline (plus the acceptor's
    # half-second tick and this loop's quarter second) after its first byte went through.
    assert still_open == 0, f"{still_open} slow connections still open {ACSE_TIMEOUT + 10:.0f} s later"
    assert max(loris.closed_after) < ACSE_TIMEOUT + 2.0, sorted(loris.closed_after)[-5:]
    # Memory stayed bounded.
    growth = rss_peak - rss_start
    print(
        f"closed after (s): min {min(loris.closed_after):.2f}, median {sorted(loris.closed_after)[SLOW // 2]:.2f}, "
        f"max {max(loris.closed_after):.2f}"
    )
    print(
        f"node RSS {rss_start / 2**20:.0f} MiB at start, {rss_peak / 2**20:.0f} MiB at most with {SLOW} slow "
        f"connections and a 28-instance series"
    )
    assert growth < RSS_GROWTH_BOUND, f"RSS grew by {growth / 2**20:.0f} MiB"
    # The log and the metrics say what happened.
    log = node.log()
    assert re.search(
        r"closed the connection from 127\.0\.0\.\d+:\d+: A-ASSOCIATE-RQ not complete within "
        r"node\.acse_timeout \(3 s\) of connecting",
        log,
    ), log[-3000:]
    assert re.search(r"node\.max_pending_connections \(64\) reached", log), log[-3000:]
    name = "dicom_node_associations_rejected_total"
    cut = metric(node.web_port, name, "pending-limit") + metric(node.web_port, name, "acse-timeout")
    assert cut == SLOW, f"{cut} slow connections counted as rejected, {SLOW} were made"


def test_per_address_cap_refuses_the_seventeenth_at_once(node):
    """From one address, connections beyond node.max_pending_per_address are closed without waiting."""
    node.extra_config = "acse_timeout = 20.0"
    node.start()
    loris = SlowLoris()
    try:
        loris.open(node.port, 20, addresses=1)
        deadline = time.monotonic() + 5
        while len(loris.closed_after) < 4 and time.monotonic() < deadline:
            loris.trickle()
            time.sleep(0.1)
        assert len(loris.closed_after) == 4, f"{len(loris.closed_after)} closed, 4 expected (20 - 16)"
        assert max(loris.closed_after) < 5
        # The 16 within the cap are still waiting (their deadline is 20 s away).
        loris.trickle()
        assert len(loris.sockets) == 16
    finally:
        loris.close_all()
    assert "node.max_pending_per_address (16) reached" in node.log()
