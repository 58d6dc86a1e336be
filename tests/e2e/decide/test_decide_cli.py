"""The rules and jobs commands as an administrator uses them, against a running node and real series.

`rules check`, `rules test` need no node; `rules explain`, `rules replay`, `jobs ...` and `status` read the index
of a running node (retry and cancel write to it), from a second process, as on a real installation.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pydicom
import pytest
from helpers import REPO, SHARED, StoreSCP, series_files, storescu, wait_for

CT = "ct-head-philips-5mm"  # 28 axial CT images
MR = "mr-t1-sag-siemens"  # 35 sagittal MR images
TRACKER = "[tracker]\nstable_after = 1\n"
#: How often the job workers look at the table when nothing woke them (node.jobs.runner.POLL).
WORKER_POLL = 2.0

RULES = """
[[rules]]
name = "ct-forward"
{ct_extra}
[rules.match]
Modality = "CT"
not = {{ ImageType = {{ contains = "LOCALIZER" }} }}
[[rules.actions]]
type = "forward"
to = ["scp"]

[[rules]]
name = "mr-sag"
priority = 5
[rules.match]
Modality = "MR"
orientation = "sagittal"
[[rules.actions]]
type = "forward"
to = ["scp"]

[[rules]]
name = "from-modality-x"
[rules.match]
calling_ae = "MODALITY_X"
[[rules.actions]]
type = "forward"
to = ["scp"]
"""


def rules(ct_extra: str = "") -> str:
    return RULES.format(ct_extra=ct_extra)


# -- helpers -------------------------------------------------------------------


#: The folder of the misbehaving test plugins (tests/plugins/faulty_plugins.py), for node and CLI alike.
PLUGINS_PATH = {"PYTHONPATH": str(REPO / "tests" / "plugins")}


def cli(*args: str, config: Path | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "node", *args] + (["--config", str(config)] if config else [])
    # One-shot commands serve no web port: without conftest's override, their config's source is the file alone.
    env = {k: v for k, v in os.environ.items() if k != "DICOM_NODE_WEB__PORT"}
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env={**env, **PLUGINS_PATH})
    assert "Traceback" not in r.stderr, show(r)
    return r


def show(r: subprocess.CompletedProcess) -> str:
    return f"$ {' '.join(map(str, r.args[3:]))}\nexit {r.returncode}\n--- stdout\n{r.stdout}--- stderr\n{r.stderr}"


def said(r: subprocess.CompletedProcess, text: str) -> bool:
    """Whether stderr says ``text``, wherever the error console broke its lines.

    Piped, it hard-wraps at 80 columns, at a space (kept or not) or inside a long word such as a path.
    """
    return "".join(text.split()) in "".join(r.stderr.split())


def table_rows(text: str) -> list[list[str]]:
    """The body rows of a rich table (cells wrapped onto further lines are joined)."""
    rows: list[list[str]] = []
    for line in text.splitlines():
        if not line.startswith("│"):
            continue
        cells = [c.strip() for c in line.strip().strip("│").split("│")]
        if cells[0] or not rows:
            rows.append(cells)
        else:
            rows[-1] = [f"{a} {b}".strip() for a, b in zip(rows[-1], cells, strict=True)]
    return rows


def fields(text: str) -> dict[str, str]:
    """`jobs show` output as {field: value}."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.strip().partition(": ")
        if sep:
            out[key] = value
    return out


def series_uid(name: str) -> str:
    return str(pydicom.dcmread(series_files(name)[0], stop_before_pixels=True).SeriesInstanceUID)


def series_blocks(text: str) -> dict[str, list[str]]:
    """`rules test` output: {series UID: [its header, its lines]}."""
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in text.splitlines():
        if line.startswith("Series "):
            current = blocks.setdefault(line.split()[1], [])
        current.append(line)
    return blocks


def send_both(node) -> None:  # type: ignore[no-untyped-def]
    for name in (CT, MR):
        r = storescu(node.port, series_files(name))
        assert r.returncode == 0, r.stderr


def job_id(node, rule: str) -> int:  # type: ignore[no-untyped-def]
    ((pk,),) = node.query("select id from job where rule = ?", rule)
    return int(pk)


def job_state(node, pk: int) -> tuple[str, int]:  # type: ignore[no-untyped-def]
    ((state, attempts),) = node.query("select state, attempts from job where id = ?", pk)
    return state, attempts


@pytest.fixture
def scp(tmp_path: Path):
    """A real storescp downstream (not started: a test starts it when the destination should answer)."""
    s = StoreSCP(tmp_path / "received")
    yield s
    s.stop()


def write_config(tmp_path: Path, scp: StoreSCP, body: str, name: str = "node.toml") -> Path:
    cfg = tmp_path / name
    cfg.write_text(f'[node]\ndata_dir = "{tmp_path / "data"}"\n{TRACKER}{scp.destination("scp")}{body}')
    return cfg


# -- no node needed ----------------------------------------------------------------


def test_rules_check_lists_rules_in_priority_order_and_names_errors(tmp_path, scp):
    cfg = write_config(tmp_path, scp, rules())
    r = cli("rules", "check", config=cfg)
    assert r.returncode == 0, show(r)
    assert r.stdout.splitlines() == [
        f"{cfg}: configuration valid, 3 rule(s)",
        "  1. mr-sag (priority 5, on_revision ignore)",
        '     when Modality = "MR" and orientation = "sagittal"',
        "     then forward the series to scp",
        "  2. ct-forward (priority 0, on_revision ignore)",
        '     when Modality = "CT" and not ImageType contains "LOCALIZER"',
        "     then forward the series to scp",
        "  3. from-modality-x (priority 0, on_revision ignore)",
        '     when calling_ae = "MODALITY_X"',
        "     then forward the series to scp",
    ], show(r)

    # A typo in a keyword and an unknown destination, both in the second rule of the file.
    wrong = (
        rules()
        .replace('Modality = "MR"', 'Modalty = "MR"')
        .replace(
            'orientation = "sagittal"\n[[rules.actions]]\ntype = "forward"\nto = ["scp"]',
            'orientation = "sagittal"\n[[rules.actions]]\ntype = "forward"\nto = ["pacs"]',
        )
    )
    bad = write_config(tmp_path, scp, wrong, "bad.toml")
    assert wrong.count("Modalty") == 1 and wrong.count('"pacs"') == 1
    r = cli("rules", "check", config=bad)
    assert r.returncode == 2, show(r)
    assert r.stdout == "", "nothing is listed for an invalid config"
    assert said(r, f"invalid rules in {bad}:"), show(r)
    assert said(r, """rules[1] ("mr-sag").match.Modalty: 'Modalty' is not a DICOM keyword"""), show(r)
    assert said(r, """rules[1] ("mr-sag").actions[0].to: unknown destination 'pacs' (destinations: scp)"""), show(r)
    assert "ct-forward" not in r.stderr, "the valid rule is not blamed"

    r = cli("rules", "check", config=tmp_path / "missing.toml")
    assert r.returncode == 2, show(r)
    assert said(r, f"config file {tmp_path / 'missing.toml'} does not exist")


def test_rules_test_on_files_without_a_node(tmp_path, scp):
    cfg = write_config(tmp_path, scp, rules())
    folder = SHARED / "series"
    ct_uid, mr_uid = series_uid(CT), series_uid(MR)

    r = cli("rules", "test", str(folder), config=cfg)
    assert r.returncode == 0, show(r)
    blocks = series_blocks(r.stdout)
    assert set(blocks) == {ct_uid, mr_uid}, show(r)
    assert blocks[ct_uid] == [
        f'Series {ct_uid} (CT "STD BRAIN 5MM", 28 files, 28 frames)',
        '  1. mr-sag (priority 5): NOT MATCHED -- Modality = "MR": the series has "CT"',
        "  2. ct-forward (priority 0): MATCHED -> forward the series to scp",
        '  3. from-modality-x (priority 0): NOT MATCHED -- calling_ae = "MODALITY_X": not known for this series',
    ], show(r)
    assert blocks[mr_uid] == [
        f'Series {mr_uid} (MR "t1_fl2d_sag", 35 files, 35 frames)',
        "  1. mr-sag (priority 5): MATCHED -> forward the series to scp",
        '  2. ct-forward (priority 0): NOT MATCHED -- Modality = "CT": the series has "MR"',
        '  3. from-modality-x (priority 0): NOT MATCHED -- calling_ae = "MODALITY_X": not known for this series',
    ], show(r)
    # The DICOMDIR is reported, not counted as a series, and it is the only file skipped.
    skipped = [line for line in r.stderr.splitlines() if line.lstrip().startswith("skipped ")]
    assert len(skipped) == 1, show(r)
    assert said(r, f"skipped {folder / CT / 'DIRFILE'}: a DICOMDIR"), show(r)

    # The same files, as if a given AE title had sent them: only the calling_ae rule changes its answer.
    r = cli("rules", "test", str(folder / CT), "--calling-ae", "MODALITY_X", config=cfg)
    assert r.returncode == 0, show(r)
    assert series_blocks(r.stdout)[ct_uid][1:] == [
        '  1. mr-sag (priority 5): NOT MATCHED -- Modality = "MR": the series has "CT"',
        "  2. ct-forward (priority 0): MATCHED -> forward the series to scp",
        "  3. from-modality-x (priority 0): MATCHED -> forward the series to scp",
    ], show(r)
    assert mr_uid not in r.stdout

    missing = tmp_path / "no-such-folder"
    r = cli("rules", "test", str(missing), config=cfg)
    assert r.returncode == 2, show(r)
    assert said(r, f"no such file or folder: {missing}"), show(r)
    assert r.stdout == ""

    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not DICOM")
    r = cli("rules", "test", str(tmp_path / "notes"), config=cfg)
    assert r.returncode == 1, show(r)
    assert said(r, "no readable DICOM series in the given paths"), show(r)
    assert not (tmp_path / "data").exists(), "a dry run stores nothing"


# -- against a running node --------------------------------------------------------


def test_explain_replay_jobs_and_status_after_two_real_series(node, scp):
    scp.start()
    node.extra_config = TRACKER + scp.destination("scp") + rules()
    before = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    node.start()
    send_both(node)
    wait_for(
        lambda: node.query("select count(*) from job where state = 'succeeded'") == [(2,)],
        20,
        "both series stable and forwarded",
    )
    cfg = node.config_path
    ct_uid, mr_uid = series_uid(CT), series_uid(MR)
    ct_job, mr_job = job_id(node, "ct-forward"), job_id(node, "mr-sag")
    node.wait_delivered(28 + 35)
    assert len(scp.received()) == 28 + 35

    # -- rules explain: why the CT series did (and did not) trigger each rule
    r = cli("rules", "explain", ct_uid, config=cfg)
    assert r.returncode == 0, show(r)
    lines = r.stdout.splitlines()
    assert lines[0] == f'Series {ct_uid} (CT "STD BRAIN 5MM", 28 instances)', show(r)
    assert "  now revision 1 (28 instances), triggered: its rules were evaluated" in lines, show(r)
    stable = [line for line in lines if line.startswith("  revision 1:")]
    assert len(stable) == 1 and re.fullmatch(
        r"  revision 1: 28 instances, stable \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC \(no instance for 1 s\), "
        r"matched ct-forward",
        stable[0],
    ), show(r)
    start = lines.index(next(line for line in lines if line.startswith("Rules, evaluated now for revision 1")))
    assert "calling_ae=STORESCU" in lines[start] and "orientation=axial" in lines[start], show(r)
    assert lines[start + 1 : start + 6] == [
        '  1. mr-sag (priority 5): NOT MATCHED -- Modality = "MR": the series has "CT"',
        "  2. ct-forward (priority 0): MATCHED -> forward the series to scp",
        '  3. from-modality-x (priority 0): NOT MATCHED -- calling_ae = "MODALITY_X": the series has "STORESCU"',
        "Jobs:",
        f"  #{ct_job} revision 1 rule ct-forward action 0 (forward): succeeded, attempt 1 of 3 -- queued 28 instance(s) "
        "for scp",
    ], show(r)
    assert f"#{mr_job} " not in r.stdout, "only the series' own jobs are listed"

    prefix = cli("rules", "explain", ct_uid[:30], config=cfg)
    assert prefix.returncode == 0 and prefix.stdout == r.stdout, show(prefix)

    r = cli("rules", "explain", "1.2.3.4.5.6.7", config=cfg)
    assert r.returncode == 1 and r.stdout == "", show(r)
    assert said(r, "error: no series 1.2.3.4.5.6.7 in the index"), show(r)
    r = cli("rules", "explain", "1.3.", config=cfg)  # both series' UIDs start so
    assert r.returncode == 1 and said(r, "the start of several series"), show(r)

    # -- rules replay: what the rules would fire for past series
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    r = cli("rules", "replay", "--since", yesterday, config=cfg)
    assert r.returncode == 0, show(r)
    lines = r.stdout.splitlines()
    assert len(lines) == 3, show(r)
    ct_line = next(line for line in lines if ct_uid in line)
    mr_line = next(line for line in lines if mr_uid in line)
    assert re.fullmatch(
        rf'\S+ \S+ UTC  CT  "STD BRAIN 5MM" \(28 inst\.\) {re.escape(ct_uid)}: ct-forward -> '
        "forward the series to scp",
        ct_line,
    ), show(r)
    assert re.fullmatch(
        rf'\S+ \S+ UTC  MR  "t1_fl2d_sag" \(35 inst\.\) {re.escape(mr_uid)}: mr-sag -> '
        "forward the series to scp",
        mr_line,
    ), show(r)
    assert lines[2] == (
        f"2 rule match(es) over the series received since {yesterday} 00:00 UTC (ct-forward: 1, mr-sag: 1)"
    ), show(r)

    r = cli("rules", "replay", "--since", yesterday, "--until", before.strftime("%Y-%m-%dT%H:%M:%S"), config=cfg)
    assert r.returncode == 0 and "0 rule match(es)" in r.stdout and "no series in that period" in r.stdout, show(r)
    assert ct_uid not in r.stdout

    r = cli("rules", "replay", "--since", "last-tuesday", config=cfg)
    assert r.returncode == 2 and r.stdout == "", show(r)
    assert said(r, "--since 'last-tuesday': use a date or date-time such as"), show(r)

    r = cli("rules", "replay", "--since", "2999-01-01", config=cfg)
    assert r.returncode == 0, show(r)
    assert r.stdout.splitlines() == [
        "0 rule match(es) over the series received since 2999-01-01 00:00 UTC (no series in that period)"
    ], show(r)

    # -- jobs
    r = cli("jobs", config=cfg)
    assert r.returncode == 0, show(r)
    rows = table_rows(r.stdout)
    assert [row[0] for row in rows] == [str(max(ct_job, mr_job)), str(min(ct_job, mr_job))], "newest first"
    by_id = {int(row[0]): row for row in rows}
    assert by_id[ct_job][1:4] == ["succeeded", "ct-forward", "0: forward"], show(r)
    assert by_id[ct_job][6] == "1/3" and by_id[ct_job][8] == "queued 28 instance(s) for scp", show(r)
    assert by_id[mr_job][1:3] == ["succeeded", "mr-sag"] and by_id[mr_job][8] == "queued 35 instance(s) for scp", show(
        r
    )

    r = cli("jobs", "--state", "failed", config=cfg)
    assert r.returncode == 0 and "jobs (failed)" in r.stdout, show(r)
    assert table_rows(r.stdout) == [], show(r)
    r = cli("jobs", "--state", "finished", config=cfg)
    assert r.returncode == 2, show(r)
    assert said(r, "--state must be one of pending, running, succeeded, failed, cancelled"), show(r)

    r = cli("jobs", "show", str(ct_job), config=cfg)
    assert r.returncode == 0, show(r)
    f = fields(r.stdout)
    assert f["job"] == str(ct_job) and f["state"] == "succeeded" and f["rule"] == "ct-forward", show(r)
    assert f["action"] == '0: {"priority": "normal", "to": ["scp"], "type": "forward"}', show(r)
    assert f["series"] == f'{ct_uid} (CT "STD BRAIN 5MM")', show(r)
    assert f["revision"] == "1" and f["priority"] == "0" and f["attempts"] == "1 of 3", show(r)
    assert f["result"] == "queued 28 instance(s) for scp" and f["last error"] == "-", show(r)
    assert f["started"] != "-" and f["finished"] != "-", show(r)
    r = cli("jobs", "show", "999", config=cfg)
    assert r.returncode == 1 and said(r, "there is no job 999"), show(r)

    r = cli("jobs", "retry", str(ct_job), config=cfg)
    assert r.returncode == 1, show(r)
    assert said(r, f"job {ct_job} is succeeded; only failed or cancelled jobs can be retried"), show(r)
    assert job_state(node, ct_job) == ("succeeded", 1)

    # -- status
    r = cli("status", config=cfg)
    assert r.returncode == 0, show(r)
    assert "series: 2  instances: 63" in r.stdout, show(r)
    assert "series: triggered: 2" in r.stdout.splitlines(), show(r)
    assert "jobs: succeeded: 2" in r.stdout.splitlines(), show(r)
    assert "deliveries to scp: delivered: 63" in r.stdout.splitlines(), show(r)
    assert len(scp.received()) == 28 + 35, "the CLI made nothing run again"


FLAKY_RULES = """
[plugins]
local = {{ flaky = "faulty_plugins:flaky" }}
[[rules]]
name = "ct-seg"
max_attempts = 1
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "flaky", params = {{ marker = "{ct_marker}" }} }}]
[[rules]]
name = "mr-seg"
match = {{ Modality = "MR" }}
actions = [{{ type = "plugin", plugin = "flaky", params = {{ marker = "{mr_marker}" }} }}]
"""


def test_failed_job_retried_and_pending_job_cancelled(node, tmp_path):
    # The plugin fails on its first attempt: ct-seg (max_attempts = 1) fails; mr-seg waits 60 s to try again.
    node.env.update(PLUGINS_PATH)
    node.extra_config = (
        TRACKER
        + "[jobs]\nretry_delay = 60\n"
        + FLAKY_RULES.format(ct_marker=tmp_path / "ct-tried", mr_marker=tmp_path / "mr-tried")
    )
    node.start()
    send_both(node)
    wait_for(
        lambda: (
            node.query("select rule, state, attempts from job order by rule")
            == [("ct-seg", "failed", 1), ("mr-seg", "pending", 1)]
        ),
        60,
        "the CT job failed and the MR job waiting for its second attempt",
    )
    cfg = node.config_path
    ct_uid = series_uid(CT)
    ct_job, mr_job = job_id(node, "ct-seg"), job_id(node, "mr-seg")

    r = cli("jobs", "--state", "failed", config=cfg)
    assert r.returncode == 0, show(r)
    rows = table_rows(r.stdout)
    assert len(rows) == 1, show(r)
    assert rows[0][:3] == [str(ct_job), "failed", "ct-seg"] and rows[0][6] == "1/1", show(r)
    assert "flaky" in rows[0][8], show(r)

    r = cli("jobs", "show", str(ct_job), config=cfg)
    f = fields(r.stdout)
    assert r.returncode == 0 and f["state"] == "failed" and f["attempts"] == "1 of 1", show(r)
    assert "flaky" in f["last error"] and f["result"] == "-", show(r)

    r = cli("rules", "explain", ct_uid, config=cfg)
    assert r.returncode == 0, show(r)
    assert f"  #{ct_job} revision 1 rule ct-seg action 0 (plugin): failed, attempt 1 of 1 -- " in r.stdout, show(r)

    r = cli("jobs", "show", str(mr_job), config=cfg)
    f = fields(r.stdout)
    assert r.returncode == 0 and f["state"] == "pending" and f["attempts"] == "1 of 3", show(r)
    wait = datetime.fromisoformat(f["not before"]) - datetime.fromisoformat(f["finished"])
    assert timedelta(seconds=55) < wait <= timedelta(seconds=61), f"retry_delay = 60 back-off: {wait}"

    # -- cancel the waiting MR job
    r = cli("jobs", "cancel", str(mr_job), config=cfg)
    assert r.returncode == 0, show(r)
    assert r.stdout.strip() == f"job {mr_job} cancelled (it was pending)", show(r)
    assert job_state(node, mr_job) == ("cancelled", 1)
    r = cli("jobs", "cancel", str(mr_job), config=cfg)
    assert r.returncode == 1, show(r)
    assert said(r, f"job {mr_job} is cancelled; only pending or running jobs can be cancelled"), show(r)

    r = cli("status", config=cfg)
    assert r.returncode == 0 and "jobs: cancelled: 1  failed: 1" in r.stdout.splitlines(), show(r)

    # As if its 60 s back-off were over: a job that is still pending would now be run by the next worker poll.
    node.query("update job set not_before = '2000-01-01 00:00:00' where id = ?", mr_job)

    # -- retry the failed CT job; the running node takes it up within seconds (and the plugin now succeeds)
    r = cli("jobs", "retry", str(ct_job), config=cfg)
    assert r.returncode == 0, show(r)
    assert r.stdout.strip() == f"job {ct_job} is pending again", show(r)
    wait_for(lambda: job_state(node, ct_job) == ("succeeded", 2), 30, "the retried job ran again and succeeded")

    time.sleep(WORKER_POLL + 1)  # a poll of the workers has passed since the back-off ended
    assert job_state(node, mr_job) == ("cancelled", 1), "a cancelled job never runs again"

    r = cli("jobs", "show", str(ct_job), config=cfg)
    f = fields(r.stdout)
    assert f["state"] == "succeeded" and f["attempts"] == "2 of 2", show(r)
    assert f["result"].startswith("1 SEG from 28 source instances") and f["last error"] == "-", show(r)

    r = cli("jobs", config=cfg)
    by_id = {int(row[0]): row for row in table_rows(r.stdout)}
    assert by_id[ct_job][1] == "succeeded" and by_id[ct_job][6] == "2/2", show(r)
    assert by_id[mr_job][1] == "cancelled" and by_id[mr_job][6] == "1/3", show(r)
    assert by_id[mr_job][8].startswith("cancelled by an operator; the error before:"), show(r)

    # A cancelled job can be brought back by an operator, too.
    r = cli("jobs", "retry", str(mr_job), config=cfg)
    assert r.returncode == 0 and f"job {mr_job} is pending again" in r.stdout, show(r)
    wait_for(lambda: job_state(node, mr_job) == ("succeeded", 2), 30, "the retried MR job succeeded")
    r = cli("status", config=cfg)
    assert "jobs: succeeded: 2" in r.stdout.splitlines(), show(r)


def test_queue_shows_waiting_deliveries_and_retry_and_cancel_them(node, scp):
    # The destination is down: deliveries wait with back-off (a long one: only an operator makes them go sooner).
    node.extra_config = TRACKER + scp.destination("scp", retry="{ initial_delay = 120, max_delay = 600 }") + rules()
    node.start()
    send_both(node)
    wait_for(lambda: node.deliveries() == {"queued": 63}, 30, "both series queued")
    wait_for(
        lambda: node.query("select count(*) from delivery where attempts >= 1") >= [(28,)],
        30,
        "a first attempt (then the circuit is open: nothing more is tried for 120 s)",
    )
    cfg = node.config_path
    ct_uid, mr_uid = series_uid(CT), series_uid(MR)

    r = cli("queue", config=cfg)
    assert r.returncode == 0, show(r)
    (row,) = table_rows(r.stdout)
    assert row[:6] == ["scp", "63", "0", "0", "0", "0"], show(r)
    assert "(in " in row[7] and "cannot connect to scp" in row[8], show(r)

    r = cli("queue", "--series", ct_uid, config=cfg)
    rows = table_rows(r.stdout)
    assert r.returncode == 0 and len(rows) == 28 and {x[2] for x in rows} == {"queued"}, show(r)
    assert all(x[3] == "1" and "connection refused" in x[6].lower() for x in rows), show(r)

    r = cli("queue", "cancel", config=cfg)
    assert r.returncode == 2 and said(r, "say which deliveries"), show(r)
    r = cli("queue", "cancel", "--series", mr_uid, config=cfg)
    assert r.returncode == 0 and r.stdout.strip() == "35 deliveries cancelled", show(r)
    r = cli("queue", "--state", "bogus", config=cfg)
    assert r.returncode == 2 and said(r, "--state must be one of queued, sending, delivered, failed, cancelled")

    # -- the destination is back; an operator does not wait for the back-off
    scp.start()
    r = cli("queue", "retry", "--destination", "scp", config=cfg)
    assert r.returncode == 0, show(r)
    assert r.stdout.strip() == "35 failed or cancelled deliveries queued again; 28 waiting ones made due now", show(r)
    # (the cancelled MR deliveries are queued again by the same retry: everything arrives)
    node.wait_delivered(63, timeout=30)
    assert len(scp.received()) == 28 + 35
    assert "an operator asked to retry now" in node.log()
    r = cli("queue", config=cfg)
    assert table_rows(r.stdout)[0][:6] == ["scp", "0", "0", "63", "0", "0"], show(r)
    r = cli("queue", "--series", ct_uid, "--state", "delivered", config=cfg)
    assert len(table_rows(r.stdout)) == 28 and all(x[5] == "0x0000" for x in table_rows(r.stdout)), show(r)
