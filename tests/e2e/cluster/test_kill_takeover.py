"""kill -9 of one of three node processes while it holds work: the other two finish all of it, exactly once.

At the moment of the kill the victim holds a running plugin job (held until the test releases it),
deliveries in flight (to a PACS that hangs until the test lets it answer) and a series only it received,
still waiting for its quiet period. Its lease is short (5 s), so the others must notice, take over each
piece once and finish it: the job runs once more (attempts 2) and stores one SEG, every delivery reaches
the PACS exactly once, the waiting series is triggered once. Restarting the killed process afterwards
must change nothing. Before the kill, a fourth process starts and stops while the three hold their work:
it must take none of it (a starting process used to requeue every running job and delivery).
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import psutil
from cluster_peers import (
    CLUSTER_GROUP,
    Cluster,
    CountingSCP,
    GatedProxy,
    assert_stored,
    send,
    send_concurrently,
    wait_until,
)
from helpers import make_ct_series, read_sop_uid

from node.send.dispatch import BATCH

pytestmark = CLUSTER_GROUP

LEASE = 5
#: Forwarded series, each of FORWARD_SLICES: more deliveries than two of the three processes' senders claim
#: at once (BATCH per association, one association each), but not more than all three do: every process
#: holds some in flight while the PACS hangs, and none is left queued for a process that starts meanwhile.
FORWARD_SERIES, FORWARD_SLICES = 3, BATCH - 2


def config(gate: GatedProxy, release: Path) -> str:
    return f"""
[tracker]
stable_after = 1
use_expected_counts = false
[jobs]
workers = 1
retry_delay = 1
[plugins.local]
held-box = "cluster_plugins:held_box"
[[destinations]]
name = "pacs"
ae_title = "PACS"
host = "127.0.0.1"
port = {gate.port}
max_associations = 1
[[rules]]
name = "fwd"
match = {{ SeriesDescription = "fwd" }}
actions = [{{ type = "forward", to = ["pacs"] }}]
[[rules]]
name = "slow"
match = {{ SeriesDescription = "slow" }}
actions = [{{ type = "plugin", plugin = "held-box", params = {{ release = "{release}" }}, send_to = ["pacs"] }}]
[[rules]]
name = "late"
match = {{ SeriesDescription = "late" }}
stable_after = 4
actions = [{{ type = "forward", to = ["pacs"] }}]
"""


def labelled(out: Path, label: str, count: int, seed: int) -> list[Path]:
    return make_ct_series(
        out / f"{label}{seed}", count, rows=32, cols=32, seed=seed, extra={"SeriesDescription": label}
    )


def owners(cluster: Cluster, sql: str) -> Counter[str]:
    return Counter(owner for (owner,) in cluster.rows(sql) if owner)


def snapshot(cluster: Cluster, pacs: CountingSCP) -> dict[str, Any]:
    """What a restart must not change: jobs, deliveries, revisions, audit counts, what the PACS holds."""
    return {
        "jobs": sorted(cluster.rows("select id, state, attempts from job")),
        "deliveries": sorted(cluster.rows("select id, state, attempts from delivery")),
        "revisions": sorted(cluster.rows("select series_fk, revision, triggered_at is not null from series_revision")),
        "instances": cluster.value("select count(*) from instance"),
        "audit": sorted(
            cluster.rows(
                "select kind, count(*) from audit_event where kind in "
                "('rule_fired', 'job_created', 'output_produced', 'delivered', 'instance_stored') group by kind"
            )
        ),
        "pacs": sorted(pacs.copies().items()),
    }


def holdings(cluster: Cluster) -> list[tuple[Any, ...]]:
    """The running jobs and the deliveries being sent, with their owner and attempts."""
    return sorted(
        cluster.rows("select 'job', id, owner, attempts from job where state = 'running'")
        + cluster.rows("select 'delivery', id, owner, attempts from delivery where state = 'sending'")
    )


def progress(cluster: Cluster) -> dict[str, Any]:
    """Jobs by (rule, state, owner) and deliveries by (state, owner): what is left, and who holds it."""
    return {
        "jobs": Counter(cluster.rows("select rule, state, owner from job")),
        "deliveries": Counter(cluster.rows("select state, owner from delivery")),
        "series": Counter(cluster.rows("select series_description, state from series")),
    }


def finished(p: dict[str, Any], jobs: int) -> bool:
    """Every job ended and nothing waiting to be sent."""
    ended = ("succeeded", "failed", "cancelled")
    return (
        sum(p["jobs"].values()) == jobs
        and all(state in ended for _, state, _ in p["jobs"])
        and not any(state in ("queued", "sending") for state, _ in p["deliveries"])
    )


def test_kill9_of_one_process_the_others_finish_its_work_once(
    make_cluster, postgres_url, pacs: CountingSCP, gated_pacs: GatedProxy, tmp_path: Path
):
    release = tmp_path / "release-plugin-jobs"
    cluster: Cluster = make_cluster(
        postgres_url, extra_config=config(gated_pacs, release), env={"DICOM_NODE_NODE__LEASE": str(LEASE)}
    ).start()
    nodes = cluster.nodes
    ids = [cluster.process_id(n) for n in nodes]

    # Deliveries in flight in every process: the PACS hangs (the gate holds each association).
    forward = [labelled(tmp_path, "fwd", FORWARD_SLICES, seed=i) for i in range(FORWARD_SERIES)]
    results = send_concurrently([(n.port, files) for n, files in zip(nodes, forward, strict=True)])
    assert_stored(results)
    sending_sql = "select owner from delivery where state = 'sending'"
    wait_until(
        lambda: owners(cluster, sending_sql),
        lambda o: set(o) == set(ids),
        60,
        f"each of {ids} to hold deliveries in flight",
    )

    # A running plugin job in every process (one job worker each, one slow series each, held until released).
    slow = [labelled(tmp_path, "slow", 6, seed=10 + i) for i in range(len(nodes))]
    results = send_concurrently([(n.port, files) for n, files in zip(nodes, slow, strict=True)])
    assert_stored(results)
    running_sql = "select owner from job where state = 'running' and rule = 'slow'"
    wait_until(
        lambda: owners(cluster, running_sql),
        lambda o: set(o) == set(ids),
        60,
        f"each of {ids} to run a slow plugin job",
    )

    # A process starting while the others hold this work takes none of it, and neither does its clean stop.
    held = holdings(cluster)
    newcomer = cluster.add_node()
    cluster.process_id(newcomer)
    time.sleep(LEASE / 2 + 1)  # it took over what it could before it answered C-ECHO; then two heartbeats
    assert holdings(cluster) == held, "a starting process took over work of live processes"
    assert newcomer.stop() == 0
    assert holdings(cluster) == held, "a stopping process changed work of live processes"

    victim, victim_id = nodes[0], ids[0]
    # A series only the victim received, waiting for its quiet period (4 s) when the victim dies.
    late = labelled(tmp_path, "late", 5, seed=20)
    assert_stored([send(victim.port, late)])
    victim_job = cluster.rows("select id from job where state = 'running' and owner = :o", o=victim_id)
    victim_sending = cluster.rows("select id from delivery where state = 'sending' and owner = :o", o=victim_id)
    late_state = cluster.value("select state from series where series_description = 'late'")
    victim_holds = {"running jobs": victim_job, "deliveries sending": len(victim_sending), "late series": late_state}
    assert len(victim_job) == 1 and victim_sending and late_state == "receiving", (
        f"before the kill, {victim_id} holds {victim_holds}"
    )

    assert victim.proc is not None
    children = psutil.Process(victim.proc.pid).children(recursive=True)
    victim.kill9()
    killed_at = time.monotonic()
    # Its plugin processes are not the subject here (tests/e2e/plugins checks that they end by themselves):
    # end them now, so that none finishes a run for a process that is gone.
    for p in children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(children, timeout=10)
    gated_pacs.open()
    release.touch()  # the survivors' plugin jobs finish; a run taken over from the victim returns at once

    fwd_uids = {read_sop_uid(f) for files in forward for f in files}
    late_uids = {read_sop_uid(f) for f in late}
    jobs = FORWARD_SERIES + len(slow) + 1
    wait_until(
        lambda: progress(cluster),
        lambda p: finished(p, jobs),
        120,
        "the two survivors to finish every job and delivery",
    )
    finished_after = time.monotonic() - killed_at

    # Every job succeeded; the victim's plugin job ran once more (attempts 2), all others once.
    rows = cluster.rows("select id, rule, state, attempts, owner from job order by id")
    assert {r[2] for r in rows} == {"succeeded"}, rows
    attempts = {r[0]: r[3] for r in rows}
    assert attempts.pop(victim_job[0][0]) == 2, rows
    assert set(attempts.values()) == {1}, rows
    # One SEG per slow series, the taken-over job's included.
    segs = cluster.rows("select sop_instance_uid, job_fk from instance where job_fk is not null")
    assert sorted(job for _, job in segs) == sorted(r[0] for r in rows if r[1] == "slow"), segs
    seg_uids = {u for u, _ in segs}

    # The late series: triggered once (one revision, one rule_fired), though its receiver died.
    revisions = cluster.rows(
        "select r.revision, r.triggered_at is not null from series_revision r join series s on s.id = r.series_fk "
        "where s.series_description = 'late'"
    )
    assert revisions == [(1, True)], revisions
    assert cluster.value("select count(*) from audit_event where kind = 'rule_fired' and rule = 'late'") == 1

    # Every delivery delivered, and the PACS received each SOP Instance UID exactly once.
    deliveries = cluster.rows("select sop_instance_uid, state from delivery")
    assert Counter(u for u, _ in deliveries) == Counter(fwd_uids | late_uids | seg_uids)
    assert {s for _, s in deliveries} == {"delivered"}
    copies = pacs.copies()
    assert set(copies) == fwd_uids | late_uids | seg_uids
    assert [u for u, n in copies.items() if n != 1] == [], "sent more than once"

    # Every file in storage is an indexed instance (the victim's included), and every row has its file.
    rows_on_disk = {p for (p,) in cluster.rows("select file_path from instance")}
    on_disk = {str(p.relative_to(cluster.data_dir)) for p in (cluster.data_dir / "storage").rglob("*.dcm")}
    assert on_disk == rows_on_disk

    # The killed process restarted: it takes nothing up again and sends nothing again.
    before = snapshot(cluster, pacs)
    victim.start()
    cluster.process_id(victim)
    # It took over what it could at start, before it answered C-ECHO; then two heartbeats (lease / 4) and
    # take-over sweeps of every process.
    time.sleep(LEASE / 2 + 1)
    assert snapshot(cluster, pacs) == before
    print(f"kill -9 -> all finished by the two survivors in {finished_after:.1f} s (lease {LEASE} s)")
