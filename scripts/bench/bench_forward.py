#!/usr/bin/env python3
"""Forwarding speed: the node's delivery queue to Orthanc vs DCMTK storescu to Orthanc (issue 5).

Two workloads, as in the issue: 200 CT instances of 512x512 (0.5 MB each) and
1,000 instances of 128x128 (35 KB each), uncompressed, synthetic, one series.

One repetition of a workload:

* **storescu**: a fresh Orthanc; ``storescu`` sends the files in one
  association; the time is the process's wall time (association set-up and
  release included).
* **node, N associations**: a fresh Orthanc and a fresh node whose one rule
  forwards every series to it (``max_associations = N``). The files are sent
  to the node first (not timed); the time is the node's own, from its index:
  from the moment the forward job queued the deliveries (``delivery.created_at``)
  to the last ``delivered_at`` -- i.e. reading each file from the node's
  storage, the associations, every C-STORE and its response, and recording
  each outcome durably.

Orthanc runs with the same configuration in every cell (defaults, fsync per
file), so the receiving side is the same for both senders. The ratio printed
is storescu time / node time: above 1.0 the node forwards faster.

    python scripts/bench/bench_forward.py            # 3 repetitions, both workloads
    python scripts/bench/bench_forward.py --reps 1 --workload small
"""

from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

from bench_common import (
    NodeReceiver,
    OrthancReceiver,
    ProcessGroup,
    SeriesSpec,
    generate_series,
    install_sigterm_handler,
    log,
    send_with_storescu,
    wait_until,
)
from report import median, ratio, table

WORKLOADS = {
    "ct": SeriesSpec("ct", "200 CT, 512x512 (0.5 MB)", 512, 512, 200),
    "small": SeriesSpec("small", "1000 x 128x128 (35 KB)", 128, 128, 1000),
}


class ForwardingNode(NodeReceiver):
    """The node with one rule forwarding every series to ``pacs``."""

    def __init__(self, pg: ProcessGroup, pacs_port: int, associations: int) -> None:
        super().__init__(pg)
        self.pacs_port = pacs_port
        self.associations = associations

    def extra_config(self) -> str:
        return f"""
[tracker]
stable_after = 0.5
use_expected_counts = false
[[destinations]]
name = "pacs"
ae_title = "ORTHANC"
host = "127.0.0.1"
port = {self.pacs_port}
max_associations = {self.associations}
[[rules]]
name = "forward-all"
actions = [{{ type = "forward", to = ["pacs"] }}]
"""


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value)


def time_storescu(pg: ProcessGroup, files: list[Path], work: Path) -> float:
    pacs = OrthancReceiver(pg)
    pacs.start(work / "orthanc")
    try:
        r = send_with_storescu(pg, files, pacs.port, pacs.ae_title, 1, work / "logs")
        if not r.ok:
            raise RuntimeError(f"storescu failed: {r.errors}")
        if pacs.stored_count() != len(files):
            raise RuntimeError(f"Orthanc holds {pacs.stored_count()} of {len(files)}")
        return r.elapsed_s
    finally:
        pacs.stop()


def time_node(pg: ProcessGroup, files: list[Path], work: Path, associations: int) -> float:
    pacs = OrthancReceiver(pg)
    pacs.start(work / "orthanc")
    node = ForwardingNode(pg, pacs.port, associations)
    try:
        node.start(work / "node")
        # Into the node (not timed): storescu, one association.
        r = send_with_storescu(pg, files, node.port, node.ae_title, 1, work / "logs-in")
        if not r.ok:
            raise RuntimeError(f"storescu to the node failed: {r.errors}")
        n = len(files)

        def done() -> bool:
            try:
                rows = node.query("select state, count(*) from delivery group by state")
            except Exception:
                return False
            return dict(rows).get("delivered", 0) == n

        if not wait_until(done, 600, interval=0.2):
            raise RuntimeError(
                f"the node did not deliver {n} instances: {node.query('select state, count(*), max(last_error) from delivery group by state')}"
            )
        if pacs.stored_count() != n:
            raise RuntimeError(f"Orthanc holds {pacs.stored_count()} of {n}")
        first, last = node.query("select min(created_at), max(delivered_at) from delivery")[0]
        return (_ts(last) - _ts(first)).total_seconds()
    finally:
        node.stop()
        pacs.stop()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workload", choices=[*WORKLOADS, "both"], default="both")
    ap.add_argument(
        "--associations",
        type=int,
        nargs="+",
        default=[1, 2],
        help="node max_associations values to measure (default: 1 and 2, the default)",
    )
    args = ap.parse_args()
    install_sigterm_handler()
    chosen = list(WORKLOADS.values()) if args.workload == "both" else [WORKLOADS[args.workload]]
    results: dict[tuple[str, str], list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-forward-") as tmp, ProcessGroup() as pg:
        root = Path(tmp)
        for spec in chosen:
            files = generate_series(spec, root / f"data-{spec.key}")
            size = sum(f.stat().st_size for f in files) / 1e6
            log(f"{spec.label}: {len(files)} files, {size:.0f} MB")
            senders = ["storescu"] + [f"node x{a}" for a in args.associations]
            for rep in range(args.reps):
                order = senders if rep % 2 == 0 else list(reversed(senders))
                for who in order:
                    work = root / f"{spec.key}-{rep}-{who.replace(' ', '')}"
                    t0 = time.monotonic()
                    if who == "storescu":
                        t = time_storescu(pg, files, work)
                    else:
                        t = time_node(pg, files, work, int(who.split("x")[1]))
                    results.setdefault((spec.key, who), []).append(t)
                    log(
                        f"  rep {rep + 1} {who}: {t:.2f} s ({len(files) / t:.0f} inst/s; cell {time.monotonic() - t0:.0f} s)"
                    )
    print()
    header = ["workload", "sender", "median s", "instances/s", "MB/s", "ratio storescu/node"]
    rows: list[list[str]] = []
    for spec in chosen:
        mb = spec.rows * spec.cols * 2 * spec.count / 1e6
        for who in ["storescu"] + [f"node x{a}" for a in args.associations]:
            t = median(results[(spec.key, who)]) or float("nan")
            r = ratio(results[(spec.key, "storescu")], results[(spec.key, who)])
            speedup = "" if who == "storescu" or r is None else f"{r:.2f}"
            rows.append([spec.label, who, f"{t:.2f}", f"{spec.count / t:.0f}", f"{mb / t:.0f}", speedup])
    print(table(rows, header, markdown=True))
    print()
    print(
        "all runs (s): "
        + "; ".join(f"{k[0]} {k[1]}: " + ", ".join(f"{v:.2f}" for v in vs) for k, vs in results.items())
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
