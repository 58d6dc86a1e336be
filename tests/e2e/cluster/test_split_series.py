"""Three node processes on one index (PostgreSQL; or SQLite on one host, each node with a receiver process)
and one data directory, each series split across all three at once.

A load balancer in front of a cluster spreads one sender's associations over the processes, so one
series arrives in thirds at three processes concurrently (and a sender that retries may send the same
instances to two of them). The cluster must behave as one node: every instance stored and indexed
once, each series revision triggered once (one rule_fired, one job per rule), each job run once, each
delivery sent once, and nothing refused.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from cluster_peers import CLUSTER_GROUP, Cluster, CountingSCP, assert_stored, send_concurrently, wait_until
from helpers import make_ct_series, read_sop_uid

pytestmark = CLUSTER_GROUP

ROUNDS = 4
SLICES = 30


def config(pacs: CountingSCP) -> str:
    """Every CT series forwarded to the PACS; a cheap plugin (the built-in threshold-seg) makes a SEG
    of each, sent to the PACS too."""
    return f"""
[tracker]
stable_after = 3
use_expected_counts = false
[jobs]
retry_delay = 1
{pacs.destination("pacs")}
[[rules]]
name = "forward-ct"
match = {{ Modality = "CT" }}
on_revision = "rerun"
actions = [{{ type = "forward", to = ["pacs"] }}]
[[rules]]
name = "bone-seg"
match = {{ Modality = "CT" }}
on_revision = "rerun"
actions = [{{ type = "plugin", plugin = "threshold-seg", send_to = ["pacs"], params = {{ segments = [{{ label = "Bone", lower = 300, type = "Bone" }}] }} }}]
"""


def progress(cluster: Cluster) -> dict[str, Any]:
    """Series, jobs and deliveries by state: how far the cluster got."""
    return {
        "series": Counter(cluster.rows("select modality, state from series")),
        "jobs": Counter(cluster.rows("select rule, state from job")),
        "deliveries": Counter(cluster.rows("select state from delivery")),
    }


def finished(p: dict[str, Any], series: int) -> bool:
    """Every series triggered, every job ended, nothing waiting to be sent."""
    return (
        p["series"][("CT", "triggered")] == series
        and sum(p["jobs"].values()) == 2 * series
        and all(state in ("succeeded", "failed", "cancelled") for _, state in p["jobs"])
        and not p["deliveries"][("queued",)]
        and not p["deliveries"][("sending",)]
    )


@pytest.mark.parametrize(
    ("dialect", "processes"), [("postgresql", 1), ("sqlite", 2)], ids=["postgresql", "sqlite-with-receivers"]
)
def test_series_split_across_three_processes_are_handled_once(
    make_cluster, request: pytest.FixtureRequest, dialect: str, processes: int, pacs, tmp_path: Path
):
    # PostgreSQL; or SQLite in the shared data directory, each node with a receiver process on its DICOM
    # port ([node] processes = 2): six processes on one host.
    url = request.getfixturevalue("postgres_url") if dialect == "postgresql" else ""
    cluster = make_cluster(url, extra_config=f"processes = {processes}\n" + config(pacs)).start()
    receivers = 3 * (processes - 1)
    wait_until(
        lambda: cluster.value("select count(*) from node_process where role = 'receiver' and stopped_at is null"),
        lambda n: n == receivers,
        60,
        f"{receivers} receiver processes to register",
    )
    ports = [n.port for n in cluster.nodes]
    study = "1.2.826.0.1.3680043.10.1431.16.1"  # one study for all rounds: its parent rows are raced each time

    sent: dict[str, list[Path]] = {}
    results = []
    for r in range(ROUNDS):
        files = make_ct_series(tmp_path / f"round{r}", SLICES, rows=32, cols=32, seed=r, study_uid=study)
        sent[f"round{r}"] = files
        # Interleaved thirds: each process gets every third slice, so all three insert into one series at once.
        results += send_concurrently([(port, files[i :: len(ports)]) for i, port in enumerate(ports)])
    # A sender retrying over the balancer: the same whole series at all three processes at the same time.
    dup = make_ct_series(tmp_path / "dup", SLICES, rows=32, cols=32, seed=99, study_uid=study)
    sent["dup"] = dup
    results += send_concurrently([(port, dup) for port in ports])

    assert_stored(results)

    source_uids = {read_sop_uid(f) for files in sent.values() for f in files}
    series_count = len(sent)
    wait_until(
        lambda: progress(cluster),
        lambda p: finished(p, series_count),
        90,
        "every series triggered, its jobs run and sent",
    )

    # Every instance indexed once, counted once in its series, its file on disk; nothing else on disk.
    rows = cluster.rows("select sop_instance_uid, file_path, job_fk from instance")
    indexed = Counter(uid for uid, _, _ in rows)
    assert {u for u, _, job in rows if job is None} == source_uids
    assert max(indexed.values()) == 1
    counts = cluster.rows("select series_instance_uid, instance_count from series where modality = 'CT'")
    assert sorted(n for _, n in counts) == [SLICES] * series_count, counts
    on_disk = {str(p.relative_to(cluster.data_dir)) for p in (cluster.data_dir / "storage").rglob("*.dcm")}
    assert on_disk == {path for _, path, _ in rows}
    assert cluster.value("select count(*) from patient") == 1
    assert cluster.value("select count(*) from study") == 1
    # Stored or kept as a duplicate: every C-STORE the senders made is accounted for (0 refused).
    audited = dict(cluster.rows("select kind, count(*) from audit_event where kind like 'instance%' group by kind"))
    assert audited == {"instance_stored": len(source_uids), "instance_duplicate": 2 * SLICES}, audited

    # One revision per series (thirds arriving at three processes are one series, not three), triggered
    # once: one rule_fired audit per rule and one job per rule.
    revisions = cluster.rows(
        "select s.series_instance_uid, r.revision, r.triggered_at is not null from series_revision r "
        "join series s on s.id = r.series_fk where s.modality = 'CT'"
    )
    assert sorted(r[1:] for r in revisions) == [(1, True)] * series_count, revisions
    fired = Counter(cluster.rows("select series_uid, rule, detail from audit_event where kind = 'rule_fired'"))
    assert len(fired) == 2 * series_count and set(fired.values()) == {1}, fired
    made = Counter(cluster.rows("select job_id from audit_event where kind = 'job_created'"))
    assert len(made) == 2 * series_count and set(made.values()) == {1}, made

    # Each job ran once and succeeded.
    jobs = cluster.rows("select id, rule, state, attempts, owner, last_error from job")
    assert len(jobs) == 2 * series_count
    assert [j for j in jobs if (j[2], j[3], j[4]) != ("succeeded", 1, None)] == [], jobs

    # One SEG per series; one delivery per (instance, destination), each delivered, and the PACS got each
    # SOP Instance UID exactly once.
    segs = {u for u, _, job in rows if job is not None}
    assert len(segs) == series_count
    deliveries = cluster.rows("select sop_instance_uid, state from delivery where destination = 'pacs'")
    assert Counter(u for u, _ in deliveries) == Counter(source_uids | segs)
    assert {s for _, s in deliveries} == {"delivered"}
    copies = pacs.copies()  # storescp writes each file before it answers the C-STORE
    assert set(copies) == source_uids | segs
    assert [u for u, n in copies.items() if n != 1] == [], "sent more than once"
    delivered = Counter(cluster.rows("select sop_instance_uid from audit_event where kind = 'delivered'"))
    assert set(delivered.values()) == {1} and len(delivered) == len(deliveries)
