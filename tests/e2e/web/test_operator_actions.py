"""What an operator does to stored series, on a running node with a real CT: run a job or a series' rules
again, forward a series now (REST API and command line, audited), see which plugin version made which
output (lineage), and try a rule on stored series in the rule tester (API and the page in Chromium)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import quote

import pydicom
import pytest
from helpers import wait_for
from helpers.web import CHROMIUM, TOKEN

REPO = Path(__file__).resolve().parents[3]
# One node for the module, its tests in order: they act on the same series one after the other.
pytestmark = pytest.mark.xdist_group("operator_actions")

CT_RULE = """
[[rules]]
name = "try-ct"
[rules.match]
Modality = "CT"
SeriesDescription = { contains = "BRAIN" }
[[rules.actions]]
type = "forward"
to = ["pacs"]
"""


@pytest.fixture
def page(browser, web_node):
    """A logged-in page in the real Chromium; any script error or dialog fails the test."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: (errors.append(f"dialog: {d.message}"), d.dismiss()))
    pg.goto(f"{web_node.url}/login?token={TOKEN}")
    yield pg
    context.close()
    assert not errors, errors


def _jobs(web_node, series_uid: str) -> list[tuple]:
    """(id, kind, run, state, software) of the series' jobs, oldest first."""
    return web_node.node.query(
        "SELECT j.id, j.kind, j.run, j.state, j.software FROM job j JOIN series s ON s.id = j.series_fk "
        "WHERE s.series_instance_uid = ? ORDER BY j.id",
        series_uid,
    )


def _settled(web_node, job_ids: list[int], timeout: float = 120) -> None:
    def done() -> bool:
        marks = ",".join("?" * len(job_ids))
        states = [s for (s,) in web_node.node.query(f"SELECT state FROM job WHERE id IN ({marks})", *job_ids)]
        return all(s in ("succeeded", "failed", "cancelled") for s in states)

    wait_for(done, timeout, f"jobs {job_ids} to finish")


def _outputs(web_node, job_id: int) -> list[tuple[str, str]]:
    """(SOP Instance UID, Series Instance UID) of what a job made."""
    return web_node.node.query(
        "SELECT i.sop_instance_uid, s.series_instance_uid FROM instance i JOIN series s ON s.id = i.series_fk "
        "WHERE i.job_fk = ? ORDER BY i.id",
        job_id,
    )


def cli(web_node, *args: str) -> subprocess.CompletedProcess:
    r = subprocess.run(
        [sys.executable, "-m", "node", *args, "--config", str(web_node.node.config_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "Traceback" not in r.stderr, r.stderr
    return r


# -- the rule tester: nothing changes, so first -------------------------------------------------------


def test_the_rule_tester_says_which_series_match_and_why(web_node):
    before = web_node.get("/api/rules")
    body = {"rule_toml": CT_RULE, "series_uids": [web_node.ct_series_uid, web_node.evil_series_uid, "1.2.3.999"]}
    code, report = web_node.post("/api/rules/test", body)
    assert code == 200 and report["errors"] == [] and report["rules"] == ["try-ct"]
    ct, evil, unknown = report["series"]
    assert ct["matched"] == ["try-ct"] and ct["description"] == "STD BRAIN 5MM"
    assert "MATCHED -> forward the series to pacs" in ct["explanation"][0]
    assert evil["matched"] == [] and "NOT MATCHED -- SeriesDescription" in evil["explanation"][0]
    assert unknown["error"] == "no series 1.2.3.999 in the index"
    # A bare rule table works as well.
    bare = CT_RULE.replace("[[rules]]\n", "").replace("rules.", "")
    code, report = web_node.post("/api/rules/test", {"rule_toml": bare, "series_uids": [web_node.ct_series_uid]})
    assert code == 200 and report["series"][0]["matched"] == ["try-ct"], report
    # The running config is as it was: the rule was tried, not added.
    assert web_node.get("/api/rules") == before


@pytest.mark.parametrize(
    "toml, error",
    [
        (CT_RULE.replace('to = ["pacs"]', 'to = ["nowhere"]'), 'rules[0] ("try-ct").actions[0].to'),
        (CT_RULE.replace("SeriesDescription =", "SeriesDescripton ="), 'rules[0] ("try-ct").match.SeriesDescripton'),
        (CT_RULE.replace('name = "try-ct"', 'name = "try-ct"\npriorty = 3'), 'rules[0] ("try-ct").priorty'),
        (CT_RULE.replace('Modality = "CT"', 'Modality = "CT'), "not valid TOML"),
        ("[node]\nport = 1\n", "rules[0].node: unknown key"),  # a bare table is one rule's keys
        ('[node]\nport = 1\n[[rules]]\nname = "x"\n', "only rules are tested here: remove node"),
    ],
)
def test_a_wrong_rule_is_answered_with_its_key(web_node, toml, error):
    code, report = web_node.post("/api/rules/test", {"rule_toml": toml, "series_uids": [web_node.ct_series_uid]})
    assert code == 200 and report["series"] == [], report
    assert any(error in line for line in report["errors"]), report["errors"]


@pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium")
def test_the_rule_tester_page_in_a_browser(page, web_node):
    page.goto(f"{web_node.url}/rules")
    page.click("a[href='/rules/test']")
    page.wait_for_url(re.compile(r".*/rules/test$"))
    page.fill("#rule_toml", CT_RULE)
    page.select_option("#series_uids", [web_node.ct_series_uid, web_node.evil_series_uid])
    page.click("#rule-tester button[type=submit]")
    page.wait_for_selector("table.tester-results")
    ct = page.locator(f"tr[data-series='{web_node.ct_series_uid}']")
    evil = page.locator(f"tr[data-series='{web_node.evil_series_uid}']")
    assert ct.locator(".verdict").inner_text() == "yes: try-ct"
    assert "MATCHED -> forward the series to pacs" in ct.inner_text()
    assert evil.locator(".verdict").inner_text() == "no"
    assert "NOT MATCHED -- SeriesDescription" in evil.inner_text()
    # The rule and the choice are kept for the next try; a mistake is shown with its key.
    assert page.input_value("#rule_toml").strip() == CT_RULE.strip()
    page.fill("#rule_toml", CT_RULE.replace("SeriesDescription =", "SeriesDescripton ="))
    page.click("#rule-tester button[type=submit]")
    page.wait_for_selector("ul.tester-errors")
    assert 'rules[0] ("try-ct").match.SeriesDescripton' in page.inner_text("ul.tester-errors")
    assert page.locator("table.tester-results").count() == 0


# -- actions that change the index ----------------------------------------------------------------------


def test_rerun_of_a_succeeded_job_makes_new_outputs_and_keeps_the_old(web_node):
    """The plugin job runs again as run 2: a new SEG (new SOP and series UIDs) is stored and delivered, the
    first SEG stays, and lineage names the plugin version of each."""
    first = next(j for j in _jobs(web_node, web_node.ct_series_uid) if j[1] == "plugin" and j[2] == 1)
    assert first[3] == "succeeded"
    (old_sop, old_series), *_ = _outputs(web_node, first[0])
    code, body = web_node.post(f"/api/jobs/{first[0]}/rerun")
    assert code == 200, body
    new_id = int(body["message"].rsplit(" ", 1)[1])
    assert body["message"] == f"job {first[0]} runs again as job {new_id}"
    _settled(web_node, [new_id])
    new = next(j for j in _jobs(web_node, web_node.ct_series_uid) if j[0] == new_id)
    assert (new[1], new[2], new[3], new[4]) == ("plugin", 2, "succeeded", first[4])
    code, detail = web_node.get(f"/api/jobs/{new_id}")
    assert code == 200 and (detail["run"], detail["rule"], detail["action_index"]) == (2, "ct-seg", 0)
    outputs = _outputs(web_node, new_id)
    assert len(outputs) == 1
    new_sop, new_series = outputs[0]
    assert new_sop != old_sop and new_series != old_series
    assert _outputs(web_node, first[0]) == [(old_sop, old_series)]  # the first run's SEG is kept
    # The new SEG reached the PACS (the action's send_to) and is a SEG of the same source.
    wait_for(lambda: any(new_sop in p.name for p in web_node.pacs.received()), 60, "the new SEG at the PACS")
    seg = pydicom.dcmread(next(p for p in web_node.pacs.received() if new_sop in p.name))
    assert seg.Modality == "SEG"
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == web_node.ct_series_uid
    # Lineage: each output with the plugin version that made it, the rerun marked as run 2.
    code, lin = web_node.get(f"/api/lineage/{quote(web_node.ct_series_uid)}")
    text = "\n".join(lin["lines"])
    version = first[4]  # e.g. "threshold-seg 1.0"
    assert f"run 2 (plugin {version})" in text
    for sop in (old_sop, new_sop):
        assert re.search(rf"output Segmentation Storage {re.escape(sop)} \(series [0-9.]+, made by {version}\)", text)
    # Only what a given version made; none of another.
    code, lin = web_node.get(f"/api/lineage/{quote(web_node.ct_series_uid)}?plugin_version={quote(version)}")
    assert code == 200 and all("(forward" not in line for line in lin["lines"]) and new_sop in "\n".join(lin["lines"])
    code, lin = web_node.get(f"/api/lineage/{quote(web_node.ct_series_uid)}?plugin_version=threshold-seg%3D%3D0.0.0")
    assert code == 200 and not any("output" in line for line in lin["lines"])
    assert "not made with plugin version 'threshold-seg==0.0.0' left out" in lin["lines"][-1]
    code, trail = web_node.get(f"/api/audit?kind=job_rerun&uid={quote(web_node.ct_series_uid)}")
    assert [(e["actor"], e["job_id"]) for e in trail["items"]] == [("token", first[0])]


def test_a_job_about_to_run_or_unknown_is_refused(web_node):
    code, body = web_node.post("/api/jobs/999999/rerun")
    assert code == 404 and body["detail"] == "there is no job 999999"
    job = _jobs(web_node, web_node.evil_series_uid)[0][0]
    code, body = web_node.post(f"/api/jobs/{job}/rerun")
    assert code == 200
    new_id = int(body["message"].rsplit(" ", 1)[1])
    code, body = web_node.post(f"/api/jobs/{new_id}/rerun")
    # Just made: pending or already running; either way it runs, so a second run is refused, with why.
    if code == 409:
        assert re.fullmatch(rf"job {new_id} is (pending|running); it runs anyway \(cancel it first.*", body["detail"])
    else:  # it finished in between (a fast forward job): then it may run again
        assert code == 200
    _settled(web_node, [new_id])


def test_rules_run_again_on_the_latest_revision(web_node):
    before = _jobs(web_node, web_node.ct_series_uid)
    runs = {kind: max(r for _, k, r, _, _ in before if k == kind) for kind in ("plugin", "forward")}
    code, body = web_node.post(f"/api/series/{quote(web_node.ct_series_uid)}/rerun-rules")
    assert code == 200 and body["changed"] == 2, body
    assert body["message"].startswith(f"series {web_node.ct_series_uid} revision 1: rule(s) ct-seg matched; 2 job(s)")
    made = [j for j in _jobs(web_node, web_node.ct_series_uid) if j not in before]
    assert sorted((kind, run) for _, kind, run, _, _ in made) == [
        ("forward", runs["forward"] + 1),
        ("plugin", runs["plugin"] + 1),
    ]
    _settled(web_node, [j[0] for j in made])
    made = [j for j in _jobs(web_node, web_node.ct_series_uid) if j[0] in {m[0] for m in made}]
    assert [state for _, _, _, state, _ in made] == ["succeeded", "succeeded"]
    code, trail = web_node.get(f"/api/audit?kind=rules_rerun&uid={quote(web_node.ct_series_uid)}")
    assert trail["items"][0]["actor"] == "token" and "2 job(s) made" in trail["items"][0]["detail"]
    code, body = web_node.post("/api/series/1.2.3.999/rerun-rules")
    assert code == 404 and body["detail"] == "no series 1.2.3.999 in the index"


def test_forward_now_sends_the_series_again(web_node):
    uid = web_node.evil_series_uid

    def delivered() -> int:
        """How often the PACS accepted an instance of the series (the audit trail has one event each time)."""
        return web_node.node.query(
            "SELECT count(*) FROM audit_event WHERE kind = 'delivered' AND destination = 'pacs' AND sop_instance_uid "
            "IN (SELECT i.sop_instance_uid FROM instance i JOIN series s ON s.id = i.series_fk "
            "WHERE s.series_instance_uid = ?)",
            uid,
        )[0][0]

    before = delivered()
    assert before >= 3  # the rule's forward delivered them once already
    code, body = web_node.post(f"/api/series/{quote(uid)}/forward", {"destination": "pacs"})
    assert code == 200 and body == {"changed": 3, "message": f"3 instance(s) of series {uid} queued for pacs"}
    wait_for(lambda: delivered() == before + 3, 60, "the three instances delivered to pacs again")
    code, body = web_node.post(f"/api/series/{quote(uid)}/forward", {"destination": "nowhere"})
    assert code == 422 and body["detail"] == "no destination 'nowhere' in the config (destinations: pacs, down)"
    code, body = web_node.post("/api/series/1.2.3.999/forward", {"destination": "pacs"})
    assert code == 404 and body["detail"] == "no series 1.2.3.999 in the index"
    code, trail = web_node.get(f"/api/audit?kind=series_forward&uid={quote(uid)}")
    assert [(e["actor"], e["destination"], e["detail"]) for e in trail["items"]] == [
        ("token", "pacs", "3 of 3 instance(s) queued")
    ]


def test_the_same_from_the_command_line(web_node):
    uid = web_node.ct_series_uid
    job = next(j for j in _jobs(web_node, uid) if j[1] == "forward" and j[3] == "succeeded")[0]
    r = cli(web_node, "jobs", "rerun", str(job))
    assert r.returncode == 0, r.stderr
    new_id = int(re.fullmatch(rf"job {job} runs again as job (\d+)\n", r.stdout).group(1))
    _settled(web_node, [new_id])  # the running node picks it up
    r = cli(web_node, "jobs", "show", str(new_id))
    assert re.search(r"^ +run: [2-9] \(a rerun", r.stdout, re.M), r.stdout
    r = cli(web_node, "jobs", "rerun", "999999")
    assert r.returncode == 1 and "there is no job 999999" in r.stderr
    r = cli(web_node, "series", "forward", uid, "pacs")
    # What the rerun forward job queued may still be waiting: it is sent once, not twice.
    got = re.fullmatch(r"(\d+) instance\(s\) queued for pacs(?:; (\d+) already waiting to be sent)?\n", r.stdout)
    assert r.returncode == 0 and got, r.stdout + r.stderr
    assert int(got.group(1)) + int(got.group(2) or 0) == 28
    r = cli(web_node, "series", "rerun-rules", uid)
    assert r.returncode == 0 and "rule(s) ct-seg matched; 2 job(s) made" in r.stdout, r.stderr
    made = [int(i) for i in re.findall(r"#(\d+)", r.stdout)]
    r = cli(web_node, "series", "forward", uid, "nowhere")
    assert r.returncode == 2 and "no destination 'nowhere'" in r.stderr and "destinations: pacs, down" in r.stderr
    r = cli(web_node, "lineage", uid, "--plugin-version", "0.0.0")
    assert r.returncode == 0 and "left out" in r.stdout and "output" not in r.stdout
    kinds = web_node.node.query(
        "SELECT DISTINCT kind FROM audit_event WHERE actor = 'cli' AND kind IN ('job_rerun', 'series_forward', "
        "'rules_rerun') ORDER BY kind"
    )
    assert kinds == [("job_rerun",), ("rules_rerun",), ("series_forward",)]
    _settled(web_node, made)  # the running node runs them
