"""The STOW-RS sender (node.send.stow) against a small local HTTP server, for the answers a real DICOMweb
server (Orthanc, tests/e2e/dicomweb/test_destination.py) does not give on demand: 202 and 409 with a
FailedSOPSequence, 503/429, 413, a redirect, silence; and the dispatcher riding out a 503 with its breaker.
"""

from __future__ import annotations

import datetime as dt
import io
import json
import re
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pydicom
import pytest
from helpers import free_port, series_files, wait_for
from queue_index import Index
from sqlalchemy import select

from node.config import DestinationSection, load_config
from node.index.models import Instance
from node.send import queue, stow
from node.send.dispatch import DestinationSender
from node.send.scu import Item, Result, file_item
from node.storage import Storage

CT = "ct-head-philips-5mm"  # 28 real axial CT images


@dataclass
class Reply:
    status: int
    #: None: a STOW-RS response listing every instance of the request as stored (ReferencedSOPSequence).
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    #: Seconds to wait before answering.
    delay: float = 0.0


@dataclass
class Request:
    path: str
    headers: dict[str, str]
    body: bytes
    #: time.monotonic() when it arrived.
    at: float = field(default_factory=time.monotonic)

    def parts(self) -> list[bytes]:
        """The bodies of the multipart/related parts, checked against their Content-Length."""
        boundary = re.search(r"boundary=([^;\s]+)", self.headers["content-type"])
        assert boundary, self.headers
        b = boundary.group(1).encode()
        chunks = self.body.split(b"--" + b)
        assert chunks[0] == b"" and chunks[-1] == b"--\r\n", "a body of parts between boundaries"
        out = []
        for chunk in chunks[1:-1]:
            head, _, data = chunk[2:].partition(b"\r\n\r\n")
            assert data.endswith(b"\r\n")
            data = data[:-2]
            fields = dict(line.split(": ", 1) for line in head.decode().split("\r\n"))
            assert fields["Content-Type"] == "application/dicom"
            assert int(fields["Content-Length"]) == len(data)
            out.append(data)
        return out

    def sop_instances(self) -> list[str]:
        """The SOP Instance UIDs of the parts, in order."""
        return [str(pydicom.dcmread(io.BytesIO(p), stop_before_pixels=True).SOPInstanceUID) for p in self.parts()]


class StowServer:
    """A DICOMweb server that answers each POST with the next scripted reply (the last one from then on)."""

    def __init__(self, answer: Callable[[Request], Reply]) -> None:
        self.answer = answer
        self.requests: list[Request] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = Request(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                server.requests.append(req)
                reply = server.answer(req)
                body = response(stored=req.sop_instances()) if reply.body is None else reply.body
                time.sleep(reply.delay)
                self.send_response(reply.status)
                for k, v in {"Content-Type": "application/dicom+json", **reply.headers}.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/dicom-web"

    def __enter__(self) -> StowServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def script(*replies: Reply) -> Callable[[Request], Reply]:
    left = list(replies)
    return lambda _req: left.pop(0) if len(left) > 1 else left[0]


def response(
    stored: Sequence[str] = (), failed: dict[str, int] | None = None, warnings: dict[str, int] | None = None
) -> bytes:
    """A STOW-RS response (DICOM JSON): ReferencedSOPSequence for ``stored`` (WarningReason for those in
    ``warnings``), FailedSOPSequence with FailureReason for ``failed``."""

    def item(uid: str, tag: str, code: int | None) -> dict[str, object]:
        out: dict[str, object] = {"00081155": {"vr": "UI", "Value": [uid]}}
        if code is not None:
            out[tag] = {"vr": "US", "Value": [code]}
        return out

    doc: dict[str, object] = {}
    if failed:
        doc["00081198"] = {"vr": "SQ", "Value": [item(u, "00081197", c) for u, c in failed.items()]}
    if stored:
        warn = warnings or {}
        doc["00081199"] = {"vr": "SQ", "Value": [item(u, "00081196", warn.get(u)) for u in stored]}
    return json.dumps(doc).encode()


@pytest.fixture(scope="module")
def items() -> list[Item]:
    return [file_item(p) for p in series_files(CT)]


def dest(url: str, **kw: object) -> DestinationSection:
    return DestinationSection.model_validate({"name": "web", "type": "dicomweb", "url": url, "timeout": 5, **kw})


def outcomes(results: list[Result]) -> list[str]:
    return [r.outcome for r in results]


def test_instances_go_in_batches_of_parts_identical_to_the_stored_files(items: list[Item]):
    with StowServer(script(Reply(200))) as srv:
        sender = stow.StowSender(dest(srv.url, token="t0k3n"))
        results = sender.send(items)
        sender.close()
    assert outcomes(results) == ["delivered"] * len(items)
    assert [r.item for r in results] == items, "in order"
    assert all(r.sent_syntax == r.item.transfer_syntax for r in results)
    assert len(srv.requests) == 1, "28 instances (fewer than MAX_ITEMS) in one request"
    req = srv.requests[0]
    assert req.path == "/dicom-web/studies"
    assert req.headers["authorization"] == "Bearer t0k3n"
    assert req.headers["accept"] == "application/dicom+json"
    assert req.headers["content-type"].startswith('multipart/related; type="application/dicom"; boundary=')
    assert req.parts() == [it.path.read_bytes() for it in items], "each part is the file as stored"


def test_a_batch_is_bounded_by_count_and_bytes(items: list[Item], monkeypatch: pytest.MonkeyPatch):
    size = items[0].path.stat().st_size
    monkeypatch.setattr(stow, "MAX_ITEMS", 10)
    with StowServer(script(Reply(200))) as srv:
        stow.StowSender(dest(srv.url, username="u", password="p")).send(items)
    assert [len(r.parts()) for r in srv.requests] == [10, 10, 8]
    assert srv.requests[0].headers["authorization"] == "Basic dTpw"
    monkeypatch.setattr(stow, "MAX_BYTES", int(size * 2.5))
    with StowServer(script(Reply(200))) as srv:
        stow.StowSender(dest(srv.url)).send(items[:5])
    assert [len(r.parts()) for r in srv.requests] == [2, 2, 1]


def test_202_fails_the_instances_listed_in_failed_sop_sequence_and_delivers_the_others(items: list[Item]):
    three = items[:3]
    uids = [it.sop_instance for it in three]
    body = response(stored=uids[1:], failed={uids[0]: 0xC000}, warnings={uids[1]: 0xB007})
    with StowServer(script(Reply(202, body))) as srv:
        results = stow.StowSender(dest(srv.url)).send(three)
    assert outcomes(results) == ["permanent", "delivered", "delivered"]
    assert results[0].status == 0xC000 and "refused it (STOW-RS FailureReason): status 0xC000" in results[0].text
    assert results[1].warning == "STOW-RS WarningReason 0xB007" and results[2].warning == ""


def test_out_of_resources_in_failed_sop_sequence_is_transient_and_holds_back_the_rest(
    items: list[Item], monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(stow, "MAX_ITEMS", 2)
    uid = items[1].sop_instance
    with StowServer(script(Reply(202, response([items[0].sop_instance], failed={uid: 0xA700})))) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:5])
    assert outcomes(results) == ["delivered", "transient", "transient", "transient", "transient"]
    assert results[1].status == 0xA700 and results[1].attempted
    assert [r.attempted for r in results[2:]] == [False] * 3, "the later batches were not sent"
    assert len(srv.requests) == 1


def test_409_fails_every_instance_with_the_reason_given_or_the_response(items: list[Item]):
    uid = items[0].sop_instance
    with StowServer(script(Reply(409, response(failed={uid: 0xA900})))) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:2])
    assert outcomes(results) == ["permanent", "permanent"]
    assert results[0].status == 0xA900
    assert "HTTP 409 Conflict" in results[1].text and "00081198" in results[1].text


LOGIN_PAGE = b"<!DOCTYPE html><html><head><title>Sign in</title></head><body><form>...</form></body></html>"


@pytest.mark.parametrize(
    ("reply", "what"),
    [
        (Reply(200, LOGIN_PAGE, {"Content-Type": "text/html; charset=utf-8"}), "HTTP 200 with an HTML page"),
        (Reply(200, b""), "HTTP 200 with an empty body"),
        (Reply(202, b'{"status": "ok"}', {"Content-Type": "application/json"}), "HTTP 202 with application/json that"),
        (Reply(200, b"<x/>", {"Content-Type": "application/dicom+xml"}), "HTTP 200 with application/dicom+xml, not"),
    ],
    ids=["login-page", "empty", "other-json", "xml"],
)
def test_a_success_status_whose_body_is_not_a_stow_response_delivers_nothing(reply: Reply, what: str, items):
    """A login page or proxy answering 200 in the server's place: nothing is confirmed, so nothing counts as sent."""
    with StowServer(script(reply)) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:3])
    assert outcomes(results) == ["permanent"] * 3
    expected = f"the server at {srv.url}/studies did not answer as a STOW-RS origin server ({what}"
    assert expected in results[0].text, results[0].text
    assert "check [[destinations]] url for 'web'" in results[0].text
    if reply.body == LOGIN_PAGE:
        assert "server said: <!DOCTYPE html><html><head><title>Sign in</title>" in results[0].text


def test_an_instance_the_response_does_not_list_is_not_delivered(items: list[Item]):
    """A valid STOW-RS response that leaves instances out of both sequences confirms only those it lists."""
    three = items[:3]
    with StowServer(script(Reply(200, response(stored=[three[0].sop_instance])))) as srv:
        results = stow.StowSender(dest(srv.url)).send(three)
    assert outcomes(results) == ["delivered", "permanent", "permanent"]
    assert "lists this instance neither as stored (ReferencedSOPSequence) nor as failed (FailedSOPSequence)" in (
        results[1].text
    )
    assert "check the server's log, then `dicom-node queue retry` sends it again" in results[1].text


def test_a_failed_item_without_a_failure_reason_fails(items: list[Item]):
    uid = items[0].sop_instance
    body = json.dumps({"00081198": {"vr": "SQ", "Value": [{"00081155": {"vr": "UI", "Value": [uid]}}]}}).encode()
    with StowServer(script(Reply(409, body))) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:1])
    assert outcomes(results) == ["permanent"] and "in FailedSOPSequence, without a FailureReason" in results[0].text


@pytest.mark.parametrize("code", [503, 429, 408])
def test_an_unavailable_server_is_transient_for_the_whole_send(code: int, items: list[Item], monkeypatch):
    monkeypatch.setattr(stow, "MAX_ITEMS", 4)
    with StowServer(script(Reply(code, b"busy, come back later"))) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:10])
    assert outcomes(results) == ["transient"] * 10
    assert [r.attempted for r in results] == [True] * 4 + [False] * 6
    assert f"HTTP {code}" in results[0].text and "trying again later" in results[0].text
    assert "server said: busy, come back later" in results[0].text
    assert len(srv.requests) == 1


def test_retry_after_is_read_as_seconds_or_an_http_date():
    now = dt.datetime(2026, 12, 6, 16, 0, 0, tzinfo=dt.UTC)
    assert stow.retry_after("120", now) == 120.0
    assert stow.retry_after("Sun, 06 Dec 2026 16:01:30 GMT", now) == 90.0
    assert stow.retry_after("Sun, 06 Dec 2026 15:00:00 GMT", now) == 0.0, "a date past is now"
    assert stow.retry_after("soon", now) is None and stow.retry_after(None, now) is None
    assert stow.retry_after("", now) is None


def test_a_503_with_retry_after_carries_the_wait_to_every_instance_it_holds_back(items, monkeypatch):
    monkeypatch.setattr(stow, "MAX_ITEMS", 2)
    with StowServer(script(Reply(503, b"maintenance", {"Retry-After": "7"}))) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:4])
    assert outcomes(results) == ["transient"] * 4
    assert [r.retry_after for r in results] == [7.0] * 4
    assert "trying again later (it asks to wait: Retry-After 7)" in results[0].text


def test_a_server_that_does_not_answer_in_time_is_transient(items: list[Item]):
    with StowServer(script(Reply(200, delay=3))) as srv:
        results = stow.StowSender(dest(srv.url, timeout=0.5)).send(items[:1])
    assert outcomes(results) == ["transient"] and "within 0.5 s" in results[0].text


def test_413_sends_a_batch_one_by_one_and_fails_an_instance_too_large_alone(items: list[Item]):
    big = items[1].sop_instance

    def answer(req: Request) -> Reply:
        parts = req.parts()
        if len(parts) > 1 or big.encode() in parts[0]:
            return Reply(413, b"request entity too large")
        return Reply(200)

    with StowServer(answer) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:3])
    assert outcomes(results) == ["delivered", "permanent", "delivered"]
    assert "HTTP 413" in results[1].text and "larger than the server accepts" in results[1].text
    assert [len(r.parts()) for r in srv.requests] == [3, 1, 1, 1]


@pytest.mark.parametrize(
    ("code", "hint"),
    [
        (401, "check the token or username/password of [[destinations]] 'web'"),
        (403, "are not allowed to store"),
        (404, "check the url of [[destinations]] 'web' (instances are POSTed to "),
        (415, 'does not accept multipart/related; type="application/dicom"'),
        (302, "redirected to https://elsewhere/dicom-web/studies: set the url of [[destinations]] 'web' to it"),
    ],
)
def test_a_refusal_fails_at_once_naming_the_setting_to_check(code: int, hint: str, items: list[Item]):
    reply = Reply(code, b"nope", {"Location": "https://elsewhere/dicom-web/studies"})
    with StowServer(script(reply)) as srv:
        results = stow.StowSender(dest(srv.url)).send(items[:2])
    assert outcomes(results) == ["permanent", "permanent"]
    assert f"HTTP {code}" in results[0].text and hint in results[0].text, results[0].text


def test_a_stored_file_that_is_gone_fails_alone(items: list[Item], tmp_path: Path):
    gone = Item(tmp_path / "gone.dcm", items[0].sop_class, items[0].transfer_syntax, "1.2.3")
    with StowServer(script(Reply(200))) as srv:
        results = stow.StowSender(dest(srv.url)).send([gone, items[0]])
    assert {r.item.sop_instance: r.outcome for r in results} == {
        "1.2.3": "permanent",
        items[0].sop_instance: "delivered",
    }
    assert len(srv.requests[0].parts()) == 1


# --- through the dispatcher: queue, back-off, breaker -----------------------------------


@pytest.fixture
def dicomweb_sender(index: Index, tmp_path: Path) -> Iterator[Callable[..., DestinationSender]]:
    stop = threading.Event()
    started: list[DestinationSender] = []

    def make(
        url: str, retry: str = "{ initial_delay = 0.3, max_delay = 0.3, multiplier = 1, jitter = 0 }"
    ) -> DestinationSender:
        (tmp_path / "node.toml").write_text(
            f"""
[node]
data_dir = "{tmp_path / "data"}"
[[destinations]]
name = "pacs"
type = "dicomweb"
url = "{url}"
max_associations = 1
retry = {retry}
"""
        )
        cfg = load_config(tmp_path / "node.toml")
        engine = index.connect()
        owner = index.process().id
        s = DestinationSender(cfg, cfg.destinations[0], engine, Storage(tmp_path / "data"), engine, stop, owner)
        s.restore(queue.load_circuits(engine, ["pacs"])["pacs"])
        started.append(s)
        for t in s.threads:
            t.start()
        return s

    yield make
    stop.set()
    for s in started:
        s.wake()
        for t in s.threads:
            t.join(20)


def queued_uids(index: Index) -> list[str]:
    """The SOP Instance UIDs of the queued instances (the Index helper's own UIDs, not the files')."""
    with index.engine.connect() as conn:
        return list(conn.execute(select(Instance.__table__.c.sop_instance_uid)).scalars())


def test_the_queue_rides_out_a_503_with_its_breaker_and_delivers_each_instance_once(
    index: Index, dicomweb_sender: Callable[..., DestinationSender]
):
    files = series_files(CT)[:6]
    ids = index.queue(6, files=files)
    stored = Reply(200, response(stored=queued_uids(index)))
    with StowServer(script(Reply(503, b"starting"), Reply(503, b"starting"), stored)) as srv:
        dicomweb_sender(srv.url)
        wait_for(lambda: {s for _, s, *_ in index.deliveries()} == {"delivered"}, 30, "every delivery")
    rows = index.deliveries()
    assert [r[0] for r in rows] == ids and {r[3] for r in rows} == {3}, "tried three times: 503, 503, then 200"
    assert len(srv.requests) == 3 and [len(r.parts()) for r in srv.requests] == [6, 6, 6]
    circuit = queue.read_circuit(index.engine, "pacs")
    assert circuit.failures == 0, "the delivery closed the circuit"
    assert sorted(srv.requests[-1].parts()) == sorted(f.read_bytes() for f in files), "the stored files, as stored"


def test_the_queue_waits_as_long_as_retry_after_asks_up_to_max_delay(
    index: Index, dicomweb_sender: Callable[..., DestinationSender]
):
    """503 + Retry-After: 2 waits 2 s (not the 0.3 s back-off); Retry-After: 3600 waits max_delay (2.5 s), not an hour."""
    index.queue(3, files=series_files(CT)[:3])
    replies = [
        Reply(503, b"", {"Retry-After": "2"}),
        Reply(503, b"", {"Retry-After": "3600"}),
        Reply(200, response(stored=queued_uids(index))),
    ]
    with StowServer(script(*replies)) as srv:
        dicomweb_sender(srv.url, "{ initial_delay = 0.3, max_delay = 2.5, multiplier = 1, jitter = 0 }")
        wait_for(lambda: {s for _, s, *_ in index.deliveries()} == {"delivered"}, 30, "every delivery")
    first, second, third = (r.at for r in srv.requests)
    assert second - first >= 1.9, f"the second try came {second - first:.2f} s after the first: Retry-After 2"
    assert third - second >= 2.4, f"the third try came {third - second:.2f} s after the second: max_delay 2.5"


def test_a_refusing_server_fails_the_deliveries_once_and_leaves_the_destination_open(
    index: Index, dicomweb_sender: Callable[..., DestinationSender]
):
    index.queue(40, files=series_files(CT))
    with StowServer(script(Reply(401, b""))) as srv:
        dicomweb_sender(srv.url)
        wait_for(lambda: {s for _, s, *_ in index.deliveries()} == {"failed"}, 30, "every delivery to fail")
        index.queue(3, files=series_files(CT))
        wait_for(lambda: [s for _, s, *_ in index.deliveries()].count("failed") == 43, 30, "the later ones too")
    rows = index.deliveries()
    assert {r[3] for r in rows} == {1}, "failed once, not retried"
    assert all(
        "HTTP 401 Unauthorized: check the token or username/password of [[destinations]] 'pacs'" in r[4] for r in rows
    )
    assert queue.read_circuit(index.engine, "pacs").failures == 0, "a refusal is not an outage"
    assert len(srv.requests) == 3, "32 + 8, then the 3 queued later: nobody waited for a back-off"


def test_a_proxy_login_page_fails_the_deliveries_instead_of_marking_them_delivered(
    index: Index, dicomweb_sender: Callable[..., DestinationSender]
):
    index.queue(5, files=series_files(CT))
    with StowServer(script(Reply(200, LOGIN_PAGE, {"Content-Type": "text/html"}))) as srv:
        dicomweb_sender(srv.url)
        wait_for(lambda: {s for _, s, *_ in index.deliveries()} == {"failed"}, 30, "every delivery to fail")
    rows = index.deliveries()
    assert all("did not answer as a STOW-RS origin server (HTTP 200 with an HTML page)" in r[4] for r in rows)
    assert all("check [[destinations]] url for 'pacs'" in r[4] for r in rows)
    assert {r[3] for r in rows} == {1} and len(srv.requests) == 1


def test_label_map_segs_go_to_a_dicomweb_destination_as_binary_unless_it_says_send():
    """STOW-RS has no negotiation to ask whether the server takes Label Map SEG: "auto" sends the BINARY SEG."""
    from types import SimpleNamespace

    from node.config import Config
    from node.jobs.actions import wants_binary_segs

    web = {"type": "dicomweb", "url": "http://127.0.0.1:9/dicom-web"}
    cfg = Config.model_validate(
        {"destinations": [{"name": "auto", **web}, {"name": "send", "label_map_seg": "send", **web}]}
    )
    ctx: Any = SimpleNamespace(cfg=cfg)
    reasons = wants_binary_segs(ctx, ["auto", "send"])
    assert reasons == {"auto": 'a DICOMweb destination cannot be asked (label_map_seg = "send" sends the label map)'}
