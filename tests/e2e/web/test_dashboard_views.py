"""The dashboard's views for operators, in headless Chromium: jobs and deliveries named by patient, study
and series; deliveries per series; pages that follow the data without a reload; outputs labelled by kind
and plugin; a SEG drawn over its source slice; the series page's actions.

One node for the module (tests/e2e/web/conftest.py); the tests that change its data come last and run in
one worker, in order.
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import make_ct_series, storescu, wait_for
from helpers.web import CHROMIUM, TOKEN
from PIL import Image

pytestmark = [
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)"),
    pytest.mark.xdist_group("dashboard_views"),
]

#: A time as the dashboard shows it: with its time zone.
WHEN = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$")


def shot(page, name: str, tmp_path: Path) -> None:
    """Keep a screenshot (in DICOM_NODE_SCREENSHOTS when set, as test_browser does)."""
    folder = Path(os.environ.get("DICOM_NODE_SCREENSHOTS") or tmp_path)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"), full_page=True)


@pytest.fixture
def page(browser, web_node):
    """A logged-in page that answers the operator's confirmation dialogs with yes (and records them)."""
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    errors: list[str] = []
    pg.dialogs = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("dialog", lambda d: (pg.dialogs.append(d.message), d.accept()))
    pg.goto(f"{web_node.url}/login?token={TOKEN}")
    yield pg
    context.close()
    assert not errors, errors


def _ct(web_node) -> dict[str, str]:
    name, pid, date, description = web_node.node.query(
        "SELECT p.patient_name, p.patient_id, st.study_date, s.series_description FROM series s"
        " JOIN study st ON st.id = s.study_fk JOIN patient p ON p.id = st.patient_fk"
        " WHERE s.series_instance_uid = ?",
        web_node.ct_series_uid,
    )[0]
    # The study date as the dashboard shows it: ISO 8601.
    return {"name": name, "id": pid, "date": f"{date[:4]}-{date[4:6]}-{date[6:]}", "description": description}


def _seg_uid(web_node) -> str:
    """The SEG series threshold-seg made from the real CT."""
    return web_node.node.query(
        "SELECT DISTINCT o.series_instance_uid FROM instance i JOIN series o ON o.id = i.series_fk"
        " JOIN job j ON j.id = i.job_fk JOIN series s ON s.id = j.series_fk"
        " WHERE s.series_instance_uid = ? AND o.modality = 'SEG'",
        web_node.ct_series_uid,
    )[0][0]


def test_the_jobs_page_names_patient_study_date_and_series_and_links_to_it(page, web_node, tmp_path):
    ct = _ct(web_node)
    page.goto(web_node.url + "/jobs")
    job_id = web_node.node.query(
        "SELECT j.id FROM job j JOIN series s ON s.id = j.series_fk WHERE s.series_instance_uid = ? AND kind = 'plugin'",
        web_node.ct_series_uid,
    )[0][0]
    # The CT's two jobs (plugin, forward) share one series cell, the first of their run.
    cell = page.locator("td.series-cell", has_text=ct["description"])
    assert cell.count() == 1
    text = cell.inner_text()
    assert ct["name"] in text and ct["id"] in text and ct["date"] in text, text
    assert cell.get_attribute("rowspan") == "2"
    shot(page, "jobs-by-series", tmp_path)
    finished = page.locator(f"#job-{job_id} td").nth(-2).inner_text()
    assert WHEN.match(finished), finished
    cell.locator("a").click()
    page.wait_for_url(f"{web_node.url}/series/{web_node.ct_series_uid}")
    assert ct["description"] in page.inner_text("h1")


def test_deliveries_are_grouped_per_series_and_destination_and_open_to_the_instances(page, web_node, tmp_path):
    ct = _ct(web_node)
    page.goto(web_node.url + "/deliveries")
    groups = page.locator("table.delivery-groups tr.group")
    shot(page, "deliveries-by-series", tmp_path)
    # The CT and the 3-slice series each to pacs and to down; each SEG to pacs.
    assert groups.count() == 6
    down = page.locator(f"tr.group[data-series='{web_node.ct_series_uid}'][data-destination='down']")
    text = down.inner_text()
    assert "28 failed" in text and ct["name"] in text and ct["date"] in text and ct["description"] in text, text
    error = down.locator("td.error").inner_text()
    newest = web_node.node.query(
        "SELECT d.last_error FROM delivery d JOIN series s ON s.id = d.series_fk"
        " WHERE s.series_instance_uid = ? AND d.destination = 'down' ORDER BY d.updated_at DESC, d.id DESC",
        web_node.ct_series_uid,
    )[0][0]
    assert error == newest and error
    assert WHEN.match(down.locator("td").nth(5).inner_text())
    pacs = page.locator(f"tr.group[data-series='{web_node.ct_series_uid}'][data-destination='pacs']")
    assert "28 delivered" in pacs.inner_text() and "failed" not in pacs.inner_text()
    # Expanding: the instances of that series to that destination, one row each.
    down.locator("a.instances").click()
    page.wait_for_url(re.compile(r".*/deliveries\?series_uid=.*destination=down"))
    assert page.locator("table.deliveries tr[id^=delivery-]").count() == 28
    assert ct["description"] in page.inner_text("main")

    code, grouped = web_node.get("/api/deliveries?group=series")
    # Four series: limit, offset and the total count series; each brings a group per destination.
    assert code == 200 and grouped["total"] == 4 and len(grouped["items"]) == 6, grouped
    item = next(
        g for g in grouped["items"] if g["series_instance_uid"] == web_node.ct_series_uid and g["destination"] == "down"
    )
    assert item["states"] == {"failed": 28} and item["total"] == 28 and item["last_error"] == newest
    assert item["patient_name"] == ct["name"] and item["series_description"] == ct["description"]
    # Only the groups with a failed delivery: the two sources to down (not their deliveries to pacs).
    code, failed = web_node.get("/api/deliveries?group=series&state=failed")
    assert code == 200 and failed["total"] == 2, failed
    assert {(g["destination"], g["total"]) for g in failed["items"]} == {("down", 28), ("down", 3)}
    code, second = web_node.get("/api/deliveries?group=series&limit=1&offset=1")
    assert code == 200 and second["total"] == 4 and len({g["series_instance_uid"] for g in second["items"]}) == 1
    code, rows = web_node.get(f"/api/deliveries?series_uid={web_node.ct_series_uid}&destination=down")
    assert code == 200 and rows["total"] == 28  # the per-instance view stays


def test_outputs_are_labelled_by_kind_plugin_and_job(page, web_node):
    seg_uid = _seg_uid(web_node)
    job_id, software = web_node.node.query(
        "SELECT j.id, j.software FROM job j JOIN series s ON s.id = j.series_fk"
        " WHERE s.series_instance_uid = ? AND j.kind = 'plugin'",
        web_node.ct_series_uid,
    )[0]
    assert software.startswith("threshold-seg ")
    page.goto(f"{web_node.url}/series/{web_node.ct_series_uid}")
    row = page.locator("table.outputs tr", has=page.locator(f"a[href='/series/{seg_uid}']"))
    cells = row.locator("td").all_inner_texts()
    assert cells[0].startswith("SEG") and cells[3] == software and cells[4] == f"#{job_id}", cells
    page.goto(f"{web_node.url}/series/{seg_uid}")
    made_by = page.inner_text("#made-by")
    assert made_by.startswith(f"SEG by {software}, job #{job_id}"), made_by
    page.goto(f"{web_node.url}/studies")
    assert f"SEG by {software} · job #{job_id}" in page.inner_text("main")


def test_a_seg_is_drawn_in_its_colours_over_its_source_slice(page, web_node, tmp_path):
    seg_uid = _seg_uid(web_node)
    page.goto(f"{web_node.url}/series/{seg_uid}")
    page.wait_for_function("() => document.getElementById('overlay').complete")
    # Drawn in the browser: the image decodes, and some of its pixels are coloured (not grey).
    coloured = page.evaluate(
        """() => {
          const img = document.getElementById('overlay');
          const c = document.createElement('canvas');
          c.width = img.naturalWidth; c.height = img.naturalHeight;
          const g = c.getContext('2d');
          g.drawImage(img, 0, 0);
          const d = g.getImageData(0, 0, c.width, c.height).data;
          let n = 0;
          for (let i = 0; i < d.length; i += 4) if (d[i] !== d[i + 1] || d[i + 1] !== d[i + 2]) n++;
          return [c.width, n];
        }"""
    )
    assert coloured[0] == 512 and coloured[1] > 0, coloured
    shot(page, "seg-overlay", tmp_path)
    # Exactly the SEG's pixels on the slice it covers most are coloured; the rest is the grey CT.
    seg_file = next(
        web_node.node.data_dir / p
        for (p,) in web_node.node.query(
            "SELECT i.file_path FROM instance i JOIN series s ON s.id = i.series_fk WHERE s.series_instance_uid = ?",
            seg_uid,
        )
    )
    seg = pydicom.dcmread(seg_file)
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    per_source: dict[str, int] = {}
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        per_source[uid] = per_source.get(uid, 0) + int(np.count_nonzero(frame))
    most = max(per_source.values())
    code, png = web_node.get(f"/series/{seg_uid}/overlay.png")
    assert code == 200
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    grey = (rgb[..., 0] == rgb[..., 1]) & (rgb[..., 1] == rgb[..., 2])
    assert int((~grey).sum()) == most == coloured[1]
    # A series that is not a SEG has no overlay, and says why.
    code, body = web_node.get(f"/series/{web_node.ct_series_uid}/overlay.png")
    assert code == 422 and "segmentation" in body["detail"], body


def test_a_groups_retry_requeues_that_series_for_that_destination_only(page, web_node):
    q = web_node.node.query
    others = q(
        "SELECT d.id, d.updated_at FROM delivery d JOIN series s ON s.id = d.series_fk"
        " WHERE s.series_instance_uid != ? AND d.destination = 'down' ORDER BY d.id",
        web_node.ct_series_uid,
    )
    assert len(others) == 3
    page.goto(web_node.url + "/deliveries?destination=down")
    page.click(f"tr.group[data-series='{web_node.ct_series_uid}'] button.retry")
    assert page.inner_text("#msg") == "28 deliveries queued to be sent now"
    # 'down' still does not answer: they fail again; the other series' deliveries were not touched.
    wait_for(
        lambda: q("SELECT count(*) FROM delivery WHERE destination = 'down' AND state = 'failed'")[0][0] == 31,
        30,
        "the retried deliveries to fail again",
    )
    assert (
        q(
            "SELECT d.id, d.updated_at FROM delivery d JOIN series s ON s.id = d.series_fk"
            " WHERE s.series_instance_uid != ? AND d.destination = 'down' ORDER BY d.id",
            web_node.ct_series_uid,
        )
        == others
    )


def test_the_jobs_and_studies_pages_follow_new_data_without_a_reload(page, web_node, tmp_path):
    before = int(web_node.node.query("SELECT count(*) FROM job")[0][0])
    page.goto(web_node.url + "/jobs")
    other = page.context.new_page()
    other.goto(web_node.url + "/studies")
    for p in (page, other):
        p.evaluate("() => { window.__same_page = true; }")
    assert page.locator("table.jobs tr[id^=job-]").count() == before
    files = make_ct_series(tmp_path / "live", 3, patient_name="LIVE^UPDATE", extra={"SeriesDescription": "LIVE SERIES"})
    r = storescu(web_node.node.port, files)
    assert r.returncode == 0, r.stderr
    # The studies page shows the new series, the jobs page its jobs, each in place (no navigation).
    other.locator(".thumb", has_text="LIVE SERIES").wait_for(timeout=30_000)
    page.locator("td.series-cell", has_text="LIVE SERIES").wait_for(timeout=60_000)
    assert "LIVE^UPDATE" in page.locator("td.series-cell", has_text="LIVE SERIES").inner_text()
    for p in (page, other):
        assert p.evaluate("() => window.__same_page") is True
    other.close()


def test_a_series_page_shows_a_rerun_job_and_its_output_as_they_come(page, web_node):
    """Both live regions of the series page (its facts, and timeline to deliveries) follow a job run from elsewhere."""
    q = web_node.node.query
    job_id = q(
        "SELECT j.id FROM job j JOIN series s ON s.id = j.series_fk WHERE s.series_instance_uid = ? AND kind = 'plugin'",
        web_node.ct_series_uid,
    )[0][0]
    page.goto(f"{web_node.url}/series/{web_node.ct_series_uid}")
    page.evaluate("() => { window.__same_page = true; }")
    assert page.locator("table.outputs tr").count() == 2  # the header and the first SEG
    code, done = web_node.post(f"/api/jobs/{job_id}/rerun")
    assert code == 200, done
    new = int(re.search(r"as job (\d+)", done["message"]).group(1))
    page.locator(f"#job-{new} .state.succeeded").wait_for(timeout=60_000)
    page.locator("table.outputs tr").nth(2).wait_for(timeout=30_000)  # the new SEG series
    made_by = page.locator("table.outputs tr td:nth-child(5)").all_inner_texts()
    assert sorted(made_by) == sorted([f"#{job_id}", f"#{new}"]), made_by
    assert page.evaluate("() => window.__same_page") is True


def test_series_page_actions_run_rules_and_jobs_again_and_forward_now(page, web_node):
    from node.web import actions

    if not all(hasattr(actions, f) for f in ("rerun_rules", "rerun_job", "forward_now")):
        pytest.skip("node.web.actions has no rerun_rules/rerun_job/forward_now yet")
    uid = web_node.evil_series_uid
    q = web_node.node.query

    def jobs() -> list[tuple]:
        return q(
            "SELECT j.id, j.kind, j.state FROM job j JOIN series s ON s.id = j.series_fk"
            " WHERE s.series_instance_uid = ? ORDER BY j.id",
            uid,
        )

    def sent_to_pacs() -> int:
        """How often pacs accepted one of the series' instances (the audit trail's delivered events)."""
        return q(
            "SELECT count(*) FROM audit_event WHERE kind = 'delivered' AND destination = 'pacs' AND sop_instance_uid IN"
            " (SELECT i.sop_instance_uid FROM instance i JOIN series s ON s.id = i.series_fk"
            " WHERE s.series_instance_uid = ?)",
            uid,
        )[0][0]

    had = jobs()
    plugin_job = next(j for j in had if j[1] == "plugin")
    page.goto(f"{web_node.url}/series/{uid}")

    # Run one job again: asked first, then a new job of the same kind succeeds with new outputs.
    page.click(f"#job-{plugin_job[0]} button.rerun")
    assert "again" in page.dialogs[-1]
    assert f"job {plugin_job[0]} runs again" in page.inner_text("#msg")
    wait_for(lambda: len(jobs()) > len(had), 30, "the job to be made again")
    new = jobs()[len(had)]
    assert new[1] == "plugin"
    wait_for(lambda: q("SELECT state FROM job WHERE id = ?", new[0])[0][0] == "succeeded", 60, "the rerun to succeed")

    # Run the rules again: the matching rule's jobs are made once more.
    n = len(jobs())
    page.click("#rerun-rules")
    assert "rules" in page.dialogs[-1]
    assert page.inner_text("#msg")
    wait_for(lambda: len(jobs()) > n, 30, "the rules' jobs to be made again")
    # Those jobs (the plugin and the forward) run; their deliveries settle.
    wait_for(
        lambda: (
            all(j[2] == "succeeded" for j in jobs())
            and not q("SELECT count(*) FROM delivery WHERE state IN ('queued', 'sending')")[0][0]
        ),
        60,
        "the rules' jobs to run and their deliveries to settle",
    )

    # Forward now to pacs: the series' instances are queued again for it.
    sent = sent_to_pacs()
    page.select_option("select[name=destination]", "pacs")
    page.click("#forward-now")
    assert "Send" in page.dialogs[-1]
    assert "queued for pacs" in page.inner_text("#msg")
    wait_for(lambda: sent_to_pacs() == sent + 3, 30, "the series' 3 instances to be sent to pacs again")
