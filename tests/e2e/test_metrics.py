"""Prometheus metrics of a node running in this process, fed by DCMTK peers: counters match what was sent,
the scrape-time state matches the index."""

from __future__ import annotations

import sys

import pytest
from helpers import TEST_PLUGINS, StoreSCP, dataset_bytes, free_port, make_ct_series, storescu, wait_for, wait_for_echo
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text

from node import metrics
from node.app import Node
from node.config import load_config

PLUGINS_DIR = TEST_PLUGINS  # faulty_plugins.py


def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of one exposition."""
    body, content_type = metrics.exposition()
    assert content_type.startswith("text/plain; version=")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        assert family.name.startswith("dicom_node_"), family.name
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(sample: dict, name: str, **labels: str) -> float:
    return sample.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before: dict, after: dict, name: str, **labels: str) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
def start_node(tmp_path):
    """Start a node in this process (its metrics are this process's); stopped afterwards."""
    nodes: list[Node] = []

    def start(extra: str = "") -> Node:
        port = free_port()
        cfg_file = tmp_path / "node.toml"
        cfg_file.write_text(f"""
[node]
host = "127.0.0.1"
port = {port}
data_dir = "{tmp_path / "data"}"
min_free_mb = 0
[web]
enabled = false
{extra}
""")
        node = Node(load_config(cfg_file, environ={}))
        nodes.append(node)
        node.start()
        wait_for_echo(port)
        return node

    yield start
    for n in nodes:
        n.stop()


def test_receive_counters_and_state(start_node, tmp_path):
    node = start_node()
    port = node.cfg.node.port
    files = make_ct_series(tmp_path / "ct", 7)
    before = scrape()
    assert storescu(port, files, aet="METRICSCU").returncode == 0
    assert storescu(port, files[:1], ae="NOT_US").returncode != 0
    after = scrape()
    assert delta(before, after, "dicom_node_instances_received_total") == 7
    assert delta(before, after, "dicom_node_received_bytes_total") == sum(len(dataset_bytes(f)) for f in files)
    assert delta(before, after, "dicom_node_cstore_responses_total", status_class="success", status="0x0000") == 7
    assert delta(before, after, "dicom_node_associations_accepted_total") == 1
    assert delta(before, after, "dicom_node_associations_rejected_total", reason="called-ae") == 1
    assert delta(before, after, "dicom_node_duplicates_received_total") == 0

    assert storescu(port, files[:3]).returncode == 0  # again: kept as first copies
    again = scrape()
    assert delta(after, again, "dicom_node_duplicates_received_total") == 3
    assert delta(after, again, "dicom_node_instances_received_total") == 0

    # Read from the index and the disk at scrape time.
    assert value(again, "dicom_node_index_up") == 1
    assert value(again, "dicom_node_series", state="receiving") == 1  # stable_after is 60 s
    assert value(again, "dicom_node_series", state="triggered") == 0
    assert value(again, "dicom_node_jobs", state="pending") == 0
    assert 0 < value(again, "dicom_node_disk_free_bytes") < value(again, "dicom_node_disk_total_bytes")
    assert value(again, "dicom_node_disk_used_bytes") > 0
    assert value(again, "dicom_node_info", version=__import__("node").__version__) == 1


def test_send_job_and_queue_metrics(start_node, tmp_path):
    scp = StoreSCP(tmp_path / "scp").start()
    try:
        node = start_node(f"""
[tracker]
stable_after = 1
{scp.destination("scp")}
[[destinations]]
name = "dead"
ae_title = "NOBODY"
host = "127.0.0.1"
port = {free_port()}
retry = {{ initial_delay = 60, max_delay = 60 }}
[[rules]]
name = "route"
actions = [{{ type = "forward", to = ["scp", "dead"] }}]
""")
        files = make_ct_series(tmp_path / "ct", 5)
        before = scrape()
        assert storescu(node.cfg.node.port, files).returncode == 0

        def queued_for_dead() -> bool:
            s = scrape()
            return (
                value(s, "dicom_node_queue_deliveries", destination="dead", state="queued") == 5
                and value(s, "dicom_node_queue_deliveries", destination="scp", state="delivered") == 5
            )

        wait_for(queued_for_dead, 60, "5 delivered to scp and 5 queued for the dead destination", interval=0.3)
        after = scrape()
    finally:
        scp.stop()
    with node.reader.connect() as conn:
        stored_bytes = conn.execute(text("select sum(file_size) from instance")).scalar()
    assert delta(before, after, "dicom_node_instances_sent_total", destination="scp") == 5
    assert delta(before, after, "dicom_node_sent_bytes_total", destination="scp") == stored_bytes
    assert delta(before, after, "dicom_node_delivery_results_total", destination="scp", result="delivered") == 5
    assert delta(before, after, "dicom_node_delivery_results_total", destination="dead", result="transient") >= 1
    assert delta(before, after, "dicom_node_instances_sent_total", destination="dead") == 0
    assert delta(before, after, "dicom_node_delivery_seconds_count", destination="scp") == 5
    assert delta(before, after, "dicom_node_delivery_latency_seconds_count", destination="scp") == 5
    assert delta(before, after, "dicom_node_job_seconds_count", kind="forward", plugin="", outcome="succeeded") == 1
    assert value(after, "dicom_node_jobs", state="succeeded") == 1
    assert value(after, "dicom_node_series", state="triggered") == 1
    for state in ("sending", "failed", "cancelled"):
        assert value(after, "dicom_node_queue_deliveries", destination="scp", state=state) == 0


def test_plugin_metrics(start_node, tmp_path, monkeypatch):
    # The plugin processes import the failing plugin by module name, as an installed one would be.
    monkeypatch.syspath_prepend(str(PLUGINS_DIR))
    monkeypatch.setenv("PYTHONPATH", str(PLUGINS_DIR) + ":" + ":".join(sys.path))
    node = start_node("""
[tracker]
stable_after = 1
[plugins]
local = { refuser = "faulty_plugins:refuser" }
[[rules]]
name = "segment"
actions = [{ type = "plugin", plugin = "threshold-seg" }, { type = "plugin", plugin = "refuser" }]
""")
    before = scrape()
    assert storescu(node.cfg.node.port, make_ct_series(tmp_path / "ct", 6)).returncode == 0

    def finished() -> bool:
        s = scrape()
        return value(s, "dicom_node_jobs", state="succeeded") + value(s, "dicom_node_jobs", state="failed") == 2

    wait_for(finished, 120, "both plugin jobs to finish", interval=0.3)
    after = scrape()
    with node.reader.connect() as conn:
        outputs = conn.execute(text("select count(*) from instance where job_fk is not null")).scalar()
    assert outputs >= 1
    assert value(after, "dicom_node_jobs", state="failed") == 1
    assert delta(before, after, "dicom_node_plugin_seconds_count", plugin="threshold-seg") == 1
    assert delta(before, after, "dicom_node_outputs_produced_total", plugin="threshold-seg", kind="SEG") == outputs
    assert (
        delta(before, after, "dicom_node_job_seconds_count", kind="plugin", plugin="threshold-seg", outcome="succeeded")
        == 1
    )
    assert delta(before, after, "dicom_node_job_seconds_count", kind="plugin", plugin="refuser", outcome="failed") == 1
    assert delta(before, after, "dicom_node_job_failures_total", kind="plugin", plugin="refuser", final="true") == 1
    assert (
        delta(before, after, "dicom_node_job_failures_total", kind="plugin", plugin="threshold-seg", final="true") == 0
    )


def test_the_scrape_reports_an_unreadable_index(tmp_path):
    """Without a readable index the state families are left out and index_up says so; counters still come."""
    from node.index.db import make_engine

    (tmp_path / "not-a-db").mkdir()
    engine = make_engine(f"sqlite:///{tmp_path / 'not-a-db'}", write=False)  # a directory: cannot be opened
    metrics.install(engine, tmp_path)
    try:
        s = scrape()
    finally:
        metrics.uninstall()
        engine.dispose()
    assert value(s, "dicom_node_index_up") == 0
    assert not any(name == "dicom_node_jobs" for name, _ in s)
    assert value(s, "dicom_node_disk_total_bytes") > 0
    assert ("dicom_node_instances_received_total", ()) in s
