"""The dashboard in headless Chromium (Debian's /usr/bin/chromium, driven by Playwright).

Set DICOM_NODE_SCREENSHOTS=docs/screenshots to keep the screenshots of the main pages for the README.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
from helpers import StoreSCP, wait_for
from helpers.web import CHROMIUM, EVIL_NAME, TOKEN

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(), reason="needs Debian's chromium (scripts/test.sh installs it)"
)


@pytest.fixture
def page(browser, web_node, tmp_path):
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


def shot(page, name: str, tmp_path: Path) -> None:
    target = os.environ.get("DICOM_NODE_SCREENSHOTS")
    folder = Path(target) if target else tmp_path
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / f"{name}.png"))


def test_login_is_required_and_a_wrong_token_is_refused(browser, web_node):
    context = browser.new_context()
    pg = context.new_page()
    pg.goto(f"{web_node.url}/deliveries")
    assert pg.url.startswith(f"{web_node.url}/login?next=")
    pg.fill("input[name=token]", "not-the-right-token-at-all")
    pg.click("button[type=submit]")
    assert "wrong user name, password or token" in pg.inner_text("main")
    pg.fill("input[name=token]", TOKEN)
    pg.click("button[type=submit]")
    pg.wait_for_url(f"{web_node.url}/deliveries")
    assert pg.inner_text("h1") == "Deliveries"
    context.close()


def test_overview_shows_the_counts_after_a_series_was_sent(page, web_node, tmp_path):
    page.goto(web_node.url + "/")
    cards = page.locator(".cards")
    assert cards.locator("[data-k=series]").inner_text() == "4"
    assert cards.locator("[data-k=instances]").inner_text() == "33"
    assert cards.locator("[data-k=outputs]").inner_text() == "2"
    # The live part: the script refreshes from the API and draws the rate charts.
    page.wait_for_selector("#chart-received polyline", state="attached")
    assert page.locator("[data-k='job_states.succeeded']").inner_text() == "4"
    assert page.locator("[data-k='dest.pacs.delivered']").inner_text() == "33"
    assert page.locator("[data-k='dest.down.failed']").inner_text() == "31"
    assert "STD BRAIN 5MM" in page.inner_text("table.series")
    shot(page, "overview", tmp_path)


def test_series_detail_shows_its_timeline(page, web_node, tmp_path):
    page.goto(f"{web_node.url}/studies")
    page.click("a.thumb:has-text('STD BRAIN 5MM')")
    page.wait_for_url(re.compile(r".*/series/.*"))
    steps = page.locator("#timeline li .stepname").all_inner_texts()
    assert steps[0].lower() == "received" and "stable" in [s.lower() for s in steps]
    text = page.inner_text("#timeline")
    assert "rules matched: ct-seg" in text and "Segmentation Storage" in text
    assert "28 of 28 source instance(s) delivered to pacs" in text
    # The slice preview loaded (a decoded image has a width).
    page.wait_for_function("() => document.getElementById('preview').complete")
    assert page.eval_on_selector("#preview", "img => img.naturalWidth") > 0
    shot(page, "series", tmp_path)
    page.goto(f"{web_node.url}/studies")
    page.wait_for_function("() => [...document.images].every(i => i.complete)")
    shot(page, "studies", tmp_path)


def test_a_patient_name_with_script_is_shown_as_text(page, web_node, tmp_path):
    for path in ("/studies", f"/series/{web_node.evil_series_uid}", "/"):
        page.goto(web_node.url + path)
        assert page.evaluate("() => window.__pwned") is None, path
        # The name is on the page, character for character, as text.
        assert "<script>window.__pwned = 1</script>" in page.inner_text("main"), path
        assert page.locator("main script").count() == 0 and page.locator("main img[src=x]").count() == 0
    page.goto(web_node.url + "/studies")
    names = page.locator(".study .patient").all_inner_texts()
    assert EVIL_NAME.split("^")[0] in " ".join(names)


def test_the_retry_button_requeues_a_failed_delivery(page, web_node, tmp_path):
    rows = web_node.node.query("SELECT id FROM delivery WHERE destination = 'down' AND state = 'failed' ORDER BY id")
    assert len(rows) == 31
    target = rows[0][0]
    # The destination comes back; the operator retries this one delivery from the list of failed ones.
    scp = StoreSCP(web_node.root / "down", ae_title="DOWN", port=web_node.down_port).start()
    try:
        page.goto(f"{web_node.url}/deliveries?destination=down&state=failed")
        shot(page, "deliveries", tmp_path)
        # The failed deliveries are listed per series; the operator opens the target's series.
        series = web_node.node.query(
            "SELECT s.series_instance_uid FROM delivery d JOIN series s ON s.id = d.series_fk WHERE d.id = ?", target
        )[0][0]
        page.click(f"tr.group[data-series='{series}'][data-destination='down'] a.instances")
        page.click(f"#delivery-{target} button.retry")
        assert "1 delivery queued to be sent now" in page.inner_text("#msg")
        wait_for(
            lambda: web_node.node.query("SELECT state FROM delivery WHERE id = ?", target)[0][0] == "delivered",
            30,
            "the retried delivery to arrive",
        )
        assert len(scp.received()) == 1
        # Only that one: the others are still failed, as the operator left them.
        n = web_node.node.query("SELECT count(*) FROM delivery WHERE destination = 'down' AND state = 'failed'")[0][0]
        assert n == 30
        page.goto(f"{web_node.url}/deliveries?destination=down&view=instances")
        assert "delivered" in page.inner_text(f"#delivery-{target}")
    finally:
        scp.stop()


def test_jobs_rules_and_plugins_pages(page, web_node, tmp_path):
    page.goto(web_node.url + "/jobs")
    assert page.locator("table.jobs tr").count() == 5  # header + 4 jobs
    shot(page, "jobs", tmp_path)
    page.goto(web_node.url + "/rules")
    assert "ct-seg" in page.inner_text("main") and "run threshold-seg" in page.inner_text("main")
    page.goto(web_node.url + "/plugins")
    assert "threshold-seg" in page.inner_text("main")
    shot(page, "plugins", tmp_path)
    page.goto(web_node.url + "/audit?kind=association_accepted")
    assert "STORESCU" in page.inner_text("table.audit") and "127.0.0.1" in page.inner_text("table.audit")
    page.goto(web_node.url + "/audit")
    shot(page, "audit", tmp_path)


def test_api_docs_render_offline_from_the_nodes_own_assets_within_its_csp(browser, node):
    """Hospital networks are often offline and the node's CSP allows no script from elsewhere: Swagger UI
    comes from the node itself, and its set-up script runs without a CSP violation."""
    node.start()
    url = f"http://127.0.0.1:{node.web_port}"
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    elsewhere: list[str] = []

    def only_the_node(route) -> None:
        if route.request.url.startswith(url + "/"):
            route.continue_()
        else:
            elsewhere.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_node)
    # Injected by the browser itself, so the page's CSP does not stop it from reporting violations.
    context.add_init_script(
        "window.__csp = []; document.addEventListener('securitypolicyviolation',"
        " e => window.__csp.push(e.violatedDirective + ' ' + e.blockedURI));"
    )
    pg = context.new_page()
    pg.set_default_timeout(20_000)
    problems: list[str] = []
    pg.on("pageerror", lambda e: problems.append(str(e)))
    pg.on("console", lambda m: problems.append(m.text) if m.type in ("error", "warning") else None)
    pg.goto(url + "/api/docs")
    pg.locator(".swagger-ui .info .title").filter(has_text="dicom-node").wait_for()
    healthz = pg.locator(".opblock .opblock-summary-path", has_text="/healthz").first
    healthz.wait_for()
    assert healthz.is_visible()
    assert pg.locator(".opblock").count() > 5
    violations = pg.evaluate("window.__csp")
    # The inline script is allowed on this page only.
    other = pg.request.get(url + "/healthz").headers["content-security-policy"]
    assert "script-src 'self';" in other and "sha256-" not in other
    context.close()
    assert not elsewhere, elsewhere
    assert not violations, violations
    assert not problems, problems
