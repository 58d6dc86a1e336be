"""Prometheus metrics: counters the stages bump as work passes, and state read from the index at scrape time.

Why two kinds: rates (instances received, deliveries, job durations) can only be counted as they
happen, and cost one increment each; levels (queue depths, jobs and series by state, disk space)
are already in the index and on disk, so they are read when Prometheus asks instead of being
maintained on the hot path. Everything lives in this module's own :data:`REGISTRY`, not
prometheus_client's global one, so the exposition holds exactly the node's metrics and a library
that registers its own cannot collide with them. No metric carries patient data; labels are AE
titles, destinations, plugin names, job kinds and DIMSE statuses.

The web layer serves :func:`exposition`; :meth:`node.app.Node.start` calls :func:`install`.
"""

from __future__ import annotations

import logging
import shutil
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector
from sqlalchemy import Engine

from node import __version__
from node.dicom.status import category
from node.index import read

log = logging.getLogger(__name__)

PREFIX = "dicom_node_"
# A *_created sample per counter tells Prometheus nothing it does not know from the process start.
disable_created_metrics()  # type: ignore[no-untyped-call]  # prometheus_client leaves it unannotated
REGISTRY = CollectorRegistry(auto_describe=True)


def _counter(name: str, doc: str, labels: Sequence[str] = ()) -> Counter:
    """A counter named with :data:`PREFIX`, in :data:`REGISTRY`."""
    return Counter(PREFIX + name, doc, labels, registry=REGISTRY)


def _histogram(name: str, doc: str, labels: Sequence[str], buckets: Sequence[float]) -> Histogram:
    """A histogram named with :data:`PREFIX`, in :data:`REGISTRY`."""
    return Histogram(PREFIX + name, doc, labels, registry=REGISTRY, buckets=buckets)


# --- receive ------------------------------------------------------------------------

ASSOCIATIONS_ACCEPTED = _counter("associations_accepted", "Associations accepted by the storage SCP.")
ASSOCIATIONS_REJECTED = _counter(
    "associations_rejected",
    "Associations rejected by the storage SCP, by reason (called-ae, calling-ae, peer-address, limit, protocol, "
    "pending-limit: closed before the request, acse-timeout: no request in time).",
    ["reason"],
)
INSTANCES_RECEIVED = _counter(
    "instances_received", "Instances received and stored (duplicates kept as the first copy excluded)."
)
DUPLICATES_RECEIVED = _counter("duplicates_received", "Instances received again whose first copy was kept.")
BYTES_RECEIVED = _counter("received_bytes", "Data set bytes of the instances received and stored.")
CSTORE_RESPONSES = _counter(
    "cstore_responses",
    "C-STORE responses sent by the storage SCP, by status class (success, warning, failure) and status.",
    ["status_class", "status"],
)

# --- send ---------------------------------------------------------------------------

INSTANCES_SENT = _counter("instances_sent", "Instances delivered to a destination.", ["destination"])
BYTES_SENT = _counter("sent_bytes", "Bytes (as stored) of the instances delivered to a destination.", ["destination"])
DELIVERY_RESULTS = _counter(
    "delivery_results",
    "Outcomes of delivery attempts per destination: delivered, transient (retried), permanent (failed for good).",
    ["destination", "result"],
)
DELIVERY_SECONDS = _histogram(
    "delivery_seconds",
    "Time to send one instance to a destination (C-STORE request to response; the first of an association "
    "includes opening it).",
    ["destination"],
    (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
DELIVERY_LATENCY = _histogram(
    "delivery_latency_seconds",
    "Time from queuing an instance for a destination to its delivery (retries and back-off included).",
    ["destination"],
    (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 24 * 3600),
)

# --- jobs and plugins ---------------------------------------------------------------

_JOB_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
JOB_SECONDS = _histogram(
    "job_seconds",
    "Wall-clock time of job runs, by kind (plugin, forward, discard), plugin (for plugin jobs) and outcome.",
    ["kind", "plugin", "outcome"],
    _JOB_BUCKETS,
)
JOB_FAILURES = _counter(
    "job_failures",
    "Failed job runs, by kind and plugin; final is 'true' when no further attempt follows.",
    ["kind", "plugin", "final"],
)
PLUGIN_SECONDS = _histogram(
    "plugin_seconds",
    "Time spent in a plugin's own code per job run (loading, building and writing excluded).",
    ["plugin"],
    _JOB_BUCKETS,
)
OUTPUTS_PRODUCED = _counter(
    "outputs_produced", "Derived instances stored, by plugin and kind (seg, sc, ...).", ["plugin", "kind"]
)

_STATUS_CHILDREN: dict[int, Any] = {}
_lock = threading.Lock()


def status_class(status: int) -> str:
    """The status's category (success, warning, failure) from node.dicom.status's table."""
    return str(category(status))


def cstore_response(status: int) -> None:
    """Count one C-STORE response the SCP sent (a dict look-up and an increment)."""
    child = _STATUS_CHILDREN.get(status)
    if child is None:
        with _lock:
            child = _STATUS_CHILDREN.setdefault(
                status, CSTORE_RESPONSES.labels(status_class(status), f"0x{status:04X}")
            )
    child.inc()


def job_labels(kind: str, action: dict[str, Any]) -> tuple[str, str]:
    """(kind, plugin) labels of a job: the plugin chain's names joined by '+', '' for other kinds."""
    if kind != "plugin":
        return kind, ""
    if action.get("plugin"):  # plugin = "name"
        return kind, str(action["plugin"])
    steps = action.get("plugins") or []  # plugins = [{ name = ... }, ...]
    names = [str(s.get("name", "")) for s in steps if isinstance(s, dict)]
    return kind, "+".join(n for n in names if n)


# --- state, read at scrape time --------------------------------------------------


class StateCollector(Collector):
    """Queue depths, jobs and series by state from the index; disk space of the data directory.

    Runs in the scraping thread; a few GROUP BY queries on indexed columns through the read-only
    engine (no write lock on SQLite). When the index cannot be read, ``dicom_node_index_up`` is 0
    and the index-based families are left out rather than reported as zeros.
    """

    def __init__(self, engine: Engine | None = None, storage_root: Path | None = None) -> None:
        self.engine = engine
        self.storage_root = storage_root

    def describe(self) -> Iterator[Metric]:
        return iter(())  # collected fresh each time; nothing to check in advance

    def collect(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(PREFIX + "info", "The node's version (always 1).", labels=["version"])
        info.add_metric([__version__], 1)
        yield info
        if self.engine is not None:
            yield from self._index(self.engine)
        if self.storage_root is not None:
            yield from self._disk(self.storage_root)
        yield from self._plugins()

    def _plugins(self) -> Iterator[Metric]:
        """Warm workers by plugin and state, GPU devices in use and jobs waiting for one (this process)."""
        import sys

        pool_module = sys.modules.get("node.plugins.pool")  # nothing to report before a plugin ran
        workers = GaugeMetricFamily(
            PREFIX + "plugin_workers",
            "Warm plugin workers by environment, plugin and state (busy or idle).",
            labels=["environment", "plugin", "state"],
        )
        pool = getattr(pool_module, "_pool", None) if pool_module is not None else None
        counts: dict[tuple[str, str, str], int] = {}
        for w in pool.state(memory=False) if pool is not None else []:
            key = (w["environment"], w["plugin"], "busy" if w["busy"] else "idle")
            counts[key] = counts.get(key, 0) + 1
        for key, n in sorted(counts.items()):
            workers.add_metric(list(key), n)
        yield workers
        gpus_module = sys.modules.get("node.plugins.gpus")
        busy = GaugeMetricFamily(PREFIX + "gpus_busy", "GPU devices ([plugins] gpus) given to a job now.")
        waiting = GaugeMetricFamily(PREFIX + "jobs_waiting_for_gpu", "Plugin jobs waiting for a GPU device.")
        states = []
        if gpus_module is not None:
            with gpus_module._shared_lock:
                allocators = list(gpus_module._shared.values())
            states = [a.state() for a in allocators]
        busy.add_metric([], sum(len(st["busy"]) for st in states))
        waiting.add_metric([], sum(len(st["waiting"]) for st in states))
        yield from (busy, waiting)

    def _index(self, engine: Engine) -> Iterator[Metric]:
        up = GaugeMetricFamily(PREFIX + "index_up", "1 when the index could be read for this scrape, else 0.")
        try:
            counts = read.state_counts(engine)
        except Exception as e:
            log.warning("metrics: cannot read the index: %s", e)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        q = GaugeMetricFamily(
            PREFIX + "queue_deliveries",
            "Deliveries in the forward queue by destination and state.",
            labels=["destination", "state"],
        )
        for dest in sorted(counts.deliveries):
            for state, n in counts.delivery_states(dest).items():
                q.add_metric([dest, state], n)
        yield q
        c = GaugeMetricFamily(
            PREFIX + "queue_awaiting_commitment",
            "Delivered instances whose storage commitment is not confirmed yet, by destination.",
            labels=["destination"],
        )
        for dest, states in sorted(counts.deliveries.items()):
            if states.get(read.AWAITING_COMMITMENT):
                c.add_metric([dest], states[read.AWAITING_COMMITMENT])
        yield c
        j = GaugeMetricFamily(PREFIX + "jobs", "Jobs by state.", labels=["state"])
        for state, n in counts.jobs.items():
            j.add_metric([state], n)
        yield j
        s = GaugeMetricFamily(PREFIX + "series", "Series in the index by tracker state.", labels=["state"])
        for state, n in counts.series.items():
            s.add_metric([state], n)
        yield s
        p = GaugeMetricFamily(
            PREFIX + "node_processes",
            "Node processes on this index: alive (heartbeat within their lease), or gone and not yet reconciled.",
            labels=["role", "state"],
        )
        procs: dict[tuple[str, str], int] = {}
        for row in read.node_processes(engine):
            key = (row.role, "alive" if row.alive() else "gone")
            procs[key] = procs.get(key, 0) + 1
        for (role, state), n in sorted(procs.items()):
            p.add_metric([role, state], n)
        yield p

    def _disk(self, root: Path) -> Iterator[Metric]:
        try:
            usage = shutil.disk_usage(root)
        except OSError as e:
            log.warning("metrics: cannot measure the data directory's filesystem: %s", e)
            return
        free = GaugeMetricFamily(
            PREFIX + "disk_free_bytes", "Bytes free (for the node's user) on the data directory's filesystem."
        )
        free.add_metric([], usage.free)
        used = GaugeMetricFamily(PREFIX + "disk_used_bytes", "Bytes used on the data directory's filesystem.")
        used.add_metric([], usage.used)
        total = GaugeMetricFamily(PREFIX + "disk_total_bytes", "Size of the data directory's filesystem.")
        total.add_metric([], usage.total)
        yield from (free, used, total)


_state = StateCollector()
REGISTRY.register(_state)


def install(engine_for_reads: Engine, storage_root: Path | str) -> None:
    """Point the scrape-time collector at the node's index (a read-only engine) and data directory.

    Safe to call again (a node restarted in the same process): the collector is registered once.
    """
    _state.engine = engine_for_reads
    _state.storage_root = Path(storage_root)


def uninstall() -> None:
    """Stop reading the index at scrape time (the node stopped; its engine is disposed)."""
    _state.engine = None
    _state.storage_root = None


def exposition() -> tuple[bytes, str]:
    """The body and Content-Type of a ``/metrics`` response (Prometheus text exposition format)."""
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
