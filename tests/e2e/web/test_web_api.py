"""The REST API, health and authentication of a running node, against what it really received and sent."""

from __future__ import annotations

import base64
import http.client
import io
import subprocess
import sys
from urllib.parse import quote

import numpy as np
import pydicom
import pytest
from helpers import NodeProcess, wait_for
from helpers.web import EVIL_NAME, TOKEN, request
from PIL import Image

from node.config import ConfigError, load_config
from node.web.auth import check_password, hash_password


def test_health_is_open_and_ready_names_its_checks(web_node):
    code, body = web_node.get("/healthz", token=None)
    assert code == 200 and body["status"] == "ok"
    code, body = web_node.get("/readyz", token=None)
    assert code == 200, body
    assert body == {"status": "ready", "checks": {"index": "ok", "storage": "ok", "dicom": "ok", "heartbeat": "ok"}}


def test_the_api_refuses_without_or_with_a_wrong_token(web_node):
    code, body = web_node.get("/api/overview", token=None)
    assert code == 401 and "Bearer" in body["detail"]
    code, _ = web_node.get("/api/overview", token="not-the-token-at-all")
    assert code == 401
    code, _ = web_node.post("/api/deliveries/retry", {"all": True}, token=None)
    assert code == 401
    # The pages send a browser to the login form, and keep where it wanted to go.
    code, body = request(web_node.url + "/jobs?state=failed", token=None)
    assert code == 200 and b"Log in" in body  # urllib follows the 303 to /login


def test_overview_counts_what_was_received_made_and_delivered(web_node):
    code, ov = web_node.get("/api/overview")
    assert code == 200, ov
    assert (ov["series"], ov["instances"], ov["outputs"]) == (4, 33, 2), ov  # 2 sources + 2 SEG series
    assert ov["job_states"]["succeeded"] == 4 and ov["job_states"]["failed"] == 0
    by_name = {d["name"]: d for d in ov["destinations"]}
    assert by_name["pacs"]["states"] == {"delivered": 33}
    assert by_name["down"]["states"] == {"failed": 31}
    assert "refused" in by_name["down"]["last_error"] or "connect" in by_name["down"]["last_error"]
    assert ov["disk"]["free_bytes"] > 0 and ov["stored_bytes"] > 28 * 500_000


def test_series_detail_has_the_timeline_from_first_instance_to_delivery(web_node):
    code, s = web_node.get(f"/api/series/{web_node.ct_series_uid}")
    assert code == 200, s
    assert s["instance_count"] == 28 and s["patient_name"] == "HEAD" and s["state"] == "triggered"
    steps = [t["step"] for t in s["timeline"]]
    # In order: received, stable, rules, the jobs, the SEG, deliveries (and the failure for 'down').
    assert steps[0] == "received" and steps.index("stable") < steps.index("rules") < steps.index("job")
    assert steps.index("job") < steps.index("output") and "delivered" in steps
    # The SEG is delivered after it was made (the sources may go before: forwarding runs beside the plugin).
    at = {t["text"].split(" to ")[0] if t["step"] == "delivered" else t["step"]: t["offset_s"] for t in s["timeline"]}
    assert at["output"] <= at["1 of 1 outputs instance(s) delivered"]
    offsets = [t["offset_s"] for t in s["timeline"]]
    assert offsets == sorted(offsets) and offsets[0] == 0.0
    texts = " | ".join(t["text"] for t in s["timeline"])
    assert "28 in all" in texts and "rules matched: ct-seg" in texts and "Segmentation Storage" in texts
    assert "28 of 28 source instance(s) delivered to pacs" in texts
    assert "1 of 1 outputs instance(s) delivered to pacs" in texts
    assert "28 source instance(s) failed for down" in texts
    assert s["revisions"][0]["matched_rules"] == ["ct-seg"]
    assert any("ct-seg" in line and "MATCHED" in line for line in s["rules_now"])
    assert [o["sop_class"] for o in s["outputs"]] == ["Segmentation Storage"]
    assert s["deliveries"]["source"] == {"pacs": {"delivered": 28}, "down": {"failed": 28}}
    assert s["deliveries"]["outputs"] == {"pacs": {"delivered": 1}}
    assert s["received_from"]["calling_ae"] == "STORESCU"
    # The output series points back to its source.
    code, seg = web_node.get(f"/api/series/{s['outputs'][0]['series_instance_uid']}")
    assert code == 200 and seg["made_by"]["source_series_instance_uid"] == web_node.ct_series_uid


def test_preview_is_a_png_of_the_middle_slice(web_node, shared_data):
    code, png = web_node.get(f"/api/series/{web_node.ct_series_uid}/preview.png?size=256")
    assert code == 200
    img = Image.open(io.BytesIO(png))
    assert img.format == "PNG" and img.size == (256, 256) and img.mode == "L"
    # The picture is of the instance in the middle: its brightest pixels are where the CT's are.
    files = sorted(
        shared_data.glob("series/ct-head-philips-5mm/*[!E]"),
        key=lambda p: int(pydicom.dcmread(p, stop_before_pixels=True).InstanceNumber),
    )
    middle = pydicom.dcmread(files[len(files) // 2]).pixel_array
    small = np.asarray(Image.fromarray((middle > middle.mean()).astype("uint8") * 255).resize((256, 256)))
    agree = float(np.mean((np.asarray(img) > 127) == (small > 127)))
    assert agree > 0.85, agree
    code, body = web_node.get("/api/series/1.2.3.4.does.not.exist/preview.png")
    assert code == 404 and "no series" in body["detail"]


def test_jobs_deliveries_lineage_rules_plugins(web_node):
    code, jobs = web_node.get(f"/api/jobs?series_uid={web_node.ct_series_uid}")
    assert code == 200 and jobs["total"] == 2
    assert {j["kind"] for j in jobs["items"]} == {"plugin", "forward"}
    plugin_job = next(j for j in jobs["items"] if j["kind"] == "plugin")
    assert plugin_job["software"].startswith("threshold-seg ")
    code, failed = web_node.get("/api/deliveries?destination=down&state=failed&limit=5")
    assert code == 200 and failed["total"] == 31 and len(failed["items"]) == 5
    code, lin = web_node.get(f"/api/lineage/{web_node.ct_series_uid}")
    assert code == 200 and any("threshold-seg" in line for line in lin["lines"])
    # The lineage page follows new data like the others: its live part alone, times in UTC.
    code, part = request(f"{web_node.url}/lineage?uid={web_node.ct_series_uid}", headers={"X-Live": "live"})
    assert code == 200 and b"threshold-seg" in part and b"<html" not in part and b" UTC" in part, part[:500]
    code, rules = web_node.get("/api/rules")
    assert code == 200 and rules[0]["name"] == "ct-seg" and rules[0]["matched_revisions"] == 2
    code, plugins = web_node.get("/api/plugins")
    by_name = {p["name"]: p for p in plugins}
    assert code == 200 and by_name["threshold-seg"]["used_by_rules"] == ["ct-seg"] and by_name["mip-sc"]["version"]
    code, body = web_node.get("/api/jobs/999999")
    assert code == 404
    code, body = web_node.post(f"/api/jobs/{plugin_job['id']}/cancel")
    assert code == 409 and "succeeded" in body["detail"]
    code, body = web_node.post("/api/deliveries/cancel", {})
    assert code == 422  # a selection must be said, never implied


def test_patient_names_come_back_exactly_as_stored(web_node):
    code, s = web_node.get(f"/api/series/{quote(web_node.evil_series_uid)}")
    assert code == 200 and s["patient_name"] == EVIL_NAME


def test_local_users_log_in_with_basic_auth(tmp_path):
    hashed = hash_password("s3cret-pass")
    assert check_password("s3cret-pass", hashed) and not check_password("wrong", hashed)
    node = NodeProcess(
        tmp_path / "node",
        extra_config=f"""
[web]
auth = "users"
token = "{TOKEN}"
[[web.users]]
name = "alice"
password_hash = "{hashed}"
""",
    ).start()
    try:
        url = f"http://127.0.0.1:{node.web_port}/api/whoami"
        basic = "Basic " + base64.b64encode(b"alice:s3cret-pass").decode()
        assert request(url, token=None, headers={"Authorization": basic}) == (200, {"user": "alice"})
        wrong = "Basic " + base64.b64encode(b"alice:guess").decode()
        assert request(url, token=None, headers={"Authorization": wrong})[0] == 401
        assert request(url, token=TOKEN) == (200, {"user": "token"})
    finally:
        assert node.stop() == 0


@pytest.mark.parametrize(
    ("web", "message"),
    [
        ('auth = "users"', 'auth = "users" needs at least one [[web.users]] entry'),
        ('token = "short"', "at least 16 characters"),
        ('[[web.users]]\nname = "bob"\npassword_hash = "hunter2"', "not a password"),
        ("port = 70000", "web.port"),
    ],
)
def test_web_config_errors_name_the_key(tmp_path, web, message):
    cfg = tmp_path / "node.toml"
    cfg.write_text(f"[web]\n{web}\n")
    with pytest.raises(ConfigError) as e:
        load_config(cfg, environ={})
    assert message in str(e.value) and "web" in str(e.value)


def test_hash_password_command_makes_a_hash_the_config_accepts(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "node", "web", "hash-password", "--password", "long enough"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    hashed = r.stdout.strip()
    assert check_password("long enough", hashed)
    cfg = tmp_path / "node.toml"
    cfg.write_text(f'[web]\nauth = "users"\n[[web.users]]\nname = "carol"\npassword_hash = "{hashed}"\n')
    assert load_config(cfg, environ={}).web.users[0].name == "carol"


def test_audit_trail_says_who_connected_what_was_stored_fired_produced_and_delivered(web_node):
    code, assoc = web_node.get("/api/audit?kind=association_accepted")
    assert code == 200 and assoc["total"] >= 2
    assert {(e["calling_ae"], e["peer_address"]) for e in assoc["items"]} >= {("STORESCU", "127.0.0.1")}
    code, stored = web_node.get(f"/api/audit?kind=instance_stored&uid={web_node.ct_series_uid}&limit=100")
    assert code == 200 and stored["total"] == 28
    assert len({e["sop_instance_uid"] for e in stored["items"]}) == 28
    code, fired = web_node.get(f"/api/audit?kind=rule_fired&uid={web_node.ct_series_uid}")
    assert code == 200 and [e["rule"] for e in fired["items"]] == ["ct-seg"]
    code, made = web_node.get("/api/audit?kind=output_produced")
    assert code == 200 and made["total"] == 2
    code, sent = web_node.get("/api/audit?kind=delivered&kind=delivery_failed&limit=1000")
    kinds = {(e["kind"], e["destination"]) for e in sent["items"]}
    assert code == 200 and sent["total"] == 33 + 31 and kinds == {("delivered", "pacs"), ("delivery_failed", "down")}
    code, body = web_node.get("/api/audit?kind=no_such_kind")
    assert code == 422


def test_retention_status_and_a_dry_run_from_the_api(web_node):
    code, body = web_node.get("/api/retention")
    assert code == 200 and body["enabled"] is False and body["last_report"] is None
    code, body = web_node.post("/api/retention/run?dry_run=false")
    assert code == 409 and "retention is off" in body["detail"]
    code, report = web_node.post("/api/retention/run?dry_run=true")
    # Nothing is due (no max age set), and the undelivered series for 'down' would be protected anyway.
    assert code == 200 and report["dry_run"] is True and report["deleted_series"] == 0, report
    assert web_node.node.query("SELECT count(*) FROM instance")[0][0] == 33


def test_metrics_count_what_the_node_received_made_and_sent(web_node):
    code, body = web_node.get("/metrics", token=None)  # public_metrics: a scraper needs no token
    assert code == 200
    text = body.decode()
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    assert values["dicom_node_instances_received_total"] == 31  # 28 + 3 received; the 2 SEGs were made here
    assert values['dicom_node_outputs_produced_total{kind="SEG",plugin="threshold-seg"}'] == 2
    assert values['dicom_node_instances_sent_total{destination="pacs"}'] == 33
    assert values['dicom_node_queue_deliveries{destination="down",state="failed"}'] == 31
    assert values['dicom_node_jobs{state="succeeded"}'] == 4
    assert values["dicom_node_disk_free_bytes"] > 0 and values["dicom_node_index_up"] == 1
    assert "_created" not in text


def test_operator_actions_in_the_web_are_audited_with_the_user(web_node):
    target = web_node.node.query("SELECT id FROM delivery WHERE destination = 'down' AND state = 'failed' LIMIT 1")[0][
        0
    ]
    code, body = web_node.post("/api/deliveries/retry", {"ids": [target]})
    assert code == 200 and body["changed"] == 1
    code, trail = web_node.get("/api/audit?kind=queue_retry")
    assert code == 200 and trail["total"] == 1 and trail["items"][0]["actor"] == "token", trail
    # 'down' is still down: the delivery fails again at once, as before.
    wait_for(
        lambda: web_node.node.query("SELECT state FROM delivery WHERE id = ?", target)[0][0] == "failed",
        30,
        "the retried delivery to fail again",
    )


def _no_redirect(url: str, method: str = "GET", headers: dict[str, str] | None = None, data: bytes | None = None):
    """(status, Location) without following redirects."""
    import urllib.error
    import urllib.request

    class Stay(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):  # noqa: ANN002, ANN003
            return None

    opener = urllib.request.build_opener(Stay)
    req = urllib.request.Request(url, data=data, headers=headers or {}, method=method)
    try:
        with opener.open(req, timeout=30) as r:
            return r.status, r.headers.get("Location")
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Location")


def test_every_api_route_and_page_needs_authentication(web_node):
    code, spec = web_node.get("/openapi.json", token=None)
    assert code == 200
    open_paths = {"/healthz", "/readyz", "/metrics"}
    checked = 0
    for path, ops in spec["paths"].items():
        concrete = path.replace("{uid}", web_node.ct_series_uid).replace("{job_id}", "1")
        for method in ops:
            status, _ = _no_redirect(
                web_node.url + concrete,
                method.upper(),
                {"Content-Type": "application/json"},
                b"{}" if method == "post" else None,
            )
            if path in open_paths:
                assert status == 200, (method, path, status)
            else:
                assert status == 401, (method, path, status)
                checked += 1
    assert checked >= 19
    for page in (
        "/",
        "/studies",
        f"/series/{web_node.ct_series_uid}",
        "/jobs",
        "/deliveries",
        "/rules",
        "/plugins",
        "/lineage",
        "/audit",
    ):
        status, location = _no_redirect(web_node.url + page)
        assert status == 303 and location.startswith("/login?next="), (page, status, location)
    # The login page never sends a browser to another site afterwards.
    for target in ("//evil.example/", "https://evil.example/", "/\\evil.example"):
        status, location = _no_redirect(f"{web_node.url}/login?token={TOKEN}&next={quote(target, safe='')}")
        assert status == 303 and location == "/", (target, location)


def test_a_form_from_another_site_is_refused_with_a_session_cookie(web_node):
    # Log in by form and keep the cookie (no redirects followed).
    conn = http.client.HTTPConnection("127.0.0.1", web_node.node.web_port, timeout=30)
    conn.request(
        "POST", "/login", body=f"token={TOKEN}&next=/", headers={"Content-Type": "application/x-www-form-urlencoded"}
    )
    r = conn.getresponse()
    r.read()
    cookie = r.getheader("Set-Cookie")
    assert r.status == 303 and "HttpOnly" in cookie and "SameSite=strict" in cookie, cookie
    sid = cookie.split(";")[0]
    form = {"Content-Type": "application/x-www-form-urlencoded", "Cookie": sid}
    status, _ = _no_redirect(
        web_node.url + "/deliveries/cancel",
        "POST",
        {**form, "Origin": "https://evil.example"},
        b"destination=pacs&back=/deliveries",
    )
    assert status == 403
    status, _ = _no_redirect(
        web_node.url + "/deliveries/cancel",
        "POST",
        {**form, "Origin": web_node.url},
        b"destination=nowhere&back=/deliveries",
    )
    assert status == 303
    assert web_node.node.query("SELECT count(*) FROM delivery WHERE state = 'cancelled'")[0][0] == 0


def test_with_authentication_off_a_form_from_another_site_is_still_refused(tmp_path):
    node = NodeProcess(tmp_path / "node", extra_config='[web]\nauth = "none"\n').start()
    try:
        url = f"http://127.0.0.1:{node.web_port}"
        assert request(url + "/api/whoami", token=None) == (200, {"user": "anonymous"})
        status, _ = _no_redirect(url + "/api/retention/run?dry_run=true", "POST", {"Origin": "https://evil.example"})
        assert status == 403
        status, _ = _no_redirect(url + "/api/retention/run?dry_run=true", "POST")  # a script: no Origin
        assert status == 200
    finally:
        assert node.stop() == 0


def test_study_search_is_literal(web_node):
    def total(q: str) -> int:
        code, body = web_node.get(f"/api/studies?q={quote(q)}")
        assert code == 200
        return body["total"]

    assert total("") == 2 and total("head") == 1 and total("PLASTIC") == 1 and total("<script>") == 1
    assert total("%") == 0 and total("w_ndow") == 0 and total("__pwned") == 1  # % and _ are not wildcards
    code, body = web_node.get(f"/api/series?q={quote('STD BRAIN')}")
    assert code == 200 and [s["series_instance_uid"] for s in body["items"]] == [web_node.ct_series_uid]
