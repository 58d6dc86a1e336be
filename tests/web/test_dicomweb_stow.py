"""STOW-RS on the node's web app, in this process, over a real index and storage (node.web.dicomweb_stow).

What a client relies on: an answered instance is stored durably and indexed with its data set exactly as
sent; a broken part gets its own failure reason and the others are stored; a broken body or a wrong media
type gets a clear 400/415; nothing half-received is left behind.
"""

from __future__ import annotations

import asyncio
import threading
import time
import tracemalloc
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from helpers import SHARED, dataset_bytes, read_sop_uid, series_files
from helpers.dicomweb import BOUNDARY, STOW_TYPE, LocalNode, files_body, local_node, part, stow_body
from pydicom import dcmread
from sqlalchemy import text
from starlette.requests import Request

from node.dicom.files import split_file_meta
from node.dicom.multipart import Body, Part
from node.receive.ingest import Peer
from node.web import dicomweb
from node.web.dicomweb_stow import STORE_THREADS, StorePool, StowReceiver

CT = series_files("ct-head-philips-5mm")
MALFORMED = SHARED / "malformed"


@pytest.fixture
def web(tmp_path: Path) -> Iterator[LocalNode]:
    with local_node(tmp_path / "data") as n:
        yield n


def _rows(web: LocalNode) -> dict[str, str]:
    with web.engine.connect() as c:
        return dict(c.execute(text("SELECT sop_instance_uid, file_path FROM instance")).all())


def _items(body: dict, tag: str) -> list[dict]:
    return body.get(tag, {}).get("Value", [])


def _uid(item: dict, tag: str) -> str:
    return item[tag]["Value"][0]


def test_a_series_is_stored_indexed_and_byte_identical(web: LocalNode):
    files = CT[:6]
    r = web.stow(files_body(files))
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/dicom+json"
    body = r.json()
    referenced = _items(body, "00081199")
    assert [_uid(i, "00081155") for i in referenced] == [read_sop_uid(p) for p in files]
    assert "00081198" not in body
    study = _uid(body, "00081190").rsplit("/", 1)[1]
    assert all(
        _uid(i, "00081190").startswith(f"http://testserver/dicom-web/studies/{study}/series/") for i in referenced
    )
    rows = _rows(web)
    assert len(rows) == 6 and len(web.recorded) == 6
    for p in files:
        stored = web.storage.absolute(rows[read_sop_uid(p)])
        assert dataset_bytes(stored) == dataset_bytes(p)
    assert web.temp_files() == []


def test_a_broken_part_gets_its_own_failure_and_the_others_are_stored(web: LocalNode):
    body = stow_body(
        [
            part(CT[0].read_bytes()),
            part((MALFORMED / "no_meta.dcm").read_bytes()),  # no preamble, no File Meta
            part((MALFORMED / "MR_truncated.dcm").read_bytes()),  # Pixel Data shorter than the image
            part(b"{}", "application/json"),
            part(CT[1].read_bytes()),
        ]
    )
    r = web.stow(body)
    assert r.status_code == 202, r.text
    out = r.json()
    assert [_uid(i, "00081155") for i in _items(out, "00081199")] == [read_sop_uid(CT[0]), read_sop_uid(CT[1])]
    failed = _items(out, "00081198")
    assert [i["00081197"]["Value"][0] for i in failed] == [0xC000, 0xC000, 0xC000]
    reasons = [_uid(i, "00000902") for i in failed]
    assert "part 2" in reasons[0] and "Part 10" in reasons[0]
    assert "part 3" in reasons[1] and _uid(failed[1], "00081155") == read_sop_uid(MALFORMED / "MR_truncated.dcm")
    assert "part 4" in reasons[2] and "application/json" in reasons[2]
    assert set(_rows(web)) == {read_sop_uid(CT[0]), read_sop_uid(CT[1])}
    assert len(web.stored_files()) == 2 and web.temp_files() == []


def test_a_file_meta_without_sop_uids_is_stored_under_the_data_set_uids(web: LocalNode):
    """The stored file's own File Meta names the instance (WADO-RS serves it, destinations forward it)."""
    source = MALFORMED / "CTImageStorage_bad_meta.dcm"
    r = web.stow(files_body([source]))
    assert r.status_code == 200, r.text
    rows = _rows(web)
    assert list(rows) == [read_sop_uid(source)]
    stored = web.storage.absolute(rows[read_sop_uid(source)])
    meta = dcmread(stored, stop_before_pixels=True).file_meta
    ds = dcmread(source, stop_before_pixels=True, force=True)
    assert meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert meta.MediaStorageSOPClassUID == ds.SOPClassUID
    assert dataset_bytes(stored) == dataset_bytes(source)
    assert len(web.stored_files()) == 1 and web.temp_files() == []


def test_nothing_stored_is_409_with_the_reasons(web: LocalNode):
    r = web.stow(files_body([MALFORMED / "no_meta.dcm", MALFORMED / "meta_missing_tsyntax.dcm"]))
    assert r.status_code == 409, r.text
    reasons = [_uid(i, "00000902") for i in _items(r.json(), "00081198")]
    assert "Part 10" in reasons[0] and "Transfer Syntax" in reasons[1]
    assert _rows(web) == {}


def test_instances_of_another_study_than_the_url_are_refused(web: LocalNode):
    r = web.stow(files_body(CT[:2]), path="/dicom-web/studies/1.2.3.4.5")
    assert r.status_code == 409, r.text
    failed = _items(r.json(), "00081198")
    assert [i["00081197"]["Value"][0] for i in failed] == [0xA900, 0xA900]
    assert "not the study of the URL" in _uid(failed[0], "00000902")
    assert _rows(web) == {} and web.stored_files() == [] and web.temp_files() == []


def test_a_body_cut_off_inside_a_part_keeps_the_parts_before_it_and_nothing_of_that_part(web: LocalNode):
    whole = files_body(CT[:3])
    cut = whole[: len(whole) - 200_000]  # inside the third part
    r = web.stow(cut)
    assert r.status_code == 400, r.text
    detail = r.json()["detail"]
    assert "ended before its closing boundary" in detail and "part 3" in detail and "2 instance(s)" in detail
    assert set(_rows(web)) == {read_sop_uid(CT[0]), read_sop_uid(CT[1])}
    assert len(web.stored_files()) == 2 and web.temp_files() == []


def test_a_body_that_is_not_multipart_is_400(web: LocalNode):
    r = web.stow(b"this is not a multipart body at all " * 100)
    assert r.status_code == 400, r.text
    assert "closing boundary" in r.json()["detail"] or "cannot be parsed" in r.json()["detail"]
    assert _rows(web) == {}


@pytest.mark.parametrize(
    ("content_type", "code", "says"),
    [
        ("application/dicom", 415, "multipart/related"),
        (f'multipart/related; type="application/dicom+json"; boundary={BOUNDARY}', 415, "application/dicom+json"),
        ('multipart/related; type="application/dicom"', 400, "boundary"),
        (f'multipart/related; type="application/dicom"; boundary={"b" * 300}', 400, "RFC 2046 allows 70"),
    ],
)
def test_wrong_media_type_says_what_is_accepted(web: LocalNode, content_type: str, code: int, says: str):
    r = web.stow(files_body(CT[:1]), content_type=content_type)
    assert r.status_code == code, r.text
    assert says in r.json()["detail"]
    assert _rows(web) == {}


def test_stow_needs_authentication(web: LocalNode):
    r = web.client.post(
        "/dicom-web/studies", content=files_body(CT[:1]), headers={"Content-Type": web.headers()["Content-Type"]}
    )
    assert r.status_code == 401
    assert _rows(web) == {}


def test_a_data_set_without_series_uid_is_stored_with_a_warning(web: LocalNode, tmp_path: Path):
    ds = dcmread(CT[0])
    del ds.SeriesInstanceUID  # Type 1: the instance does not conform, but it is kept
    variant = tmp_path / "no-series.dcm"
    ds.save_as(variant, enforce_file_format=True)
    r = web.stow(files_body([variant, CT[1]]))
    assert r.status_code == 202, r.text
    referenced = _items(r.json(), "00081199")
    assert len(referenced) == 2
    warned = [i for i in referenced if "00081196" in i]
    assert [i["00081196"]["Value"][0] for i in warned] == [0xB007]
    assert "SeriesInstanceUID" in _uid(warned[0], "00000902")
    assert set(_rows(web)) == {read_sop_uid(CT[0]), read_sop_uid(CT[1])}


def test_the_same_instance_twice_is_stored_once(web: LocalNode):
    r = web.stow(files_body([CT[0], CT[0]]))
    assert r.status_code == 200, r.text
    assert len(_items(r.json(), "00081199")) == 2
    assert list(_rows(web)) == [read_sop_uid(CT[0])] and len(web.stored_files()) == 1


def test_the_body_is_never_held_in_memory(tmp_path: Path):
    """28 CT files (14 MiB) fed in 64 KiB chunks: the receiver's peak allocation stays far below a part's size."""
    with local_node(tmp_path / "data") as web:
        body = files_body(CT)
        pool = StorePool(2)
        try:
            receiver = StowReceiver(BOUNDARY, web.ingest, Peer("STOW-RS", "NODE", "127.0.0.1", "t"), pool=pool)
            tracemalloc.start()
            try:
                for k in range(0, len(body), 65536):
                    receiver.feed(body[k : k + 65536])
                results = receiver.finish()
                _current, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
        finally:
            pool.shutdown()
        assert [r.stored for r in results] == [True] * len(CT)
        # The first 64 KiB of each pending file are kept (ReceivedFile.head) and a chunk is in flight: ~1 MiB.
        # A body held whole (14 MiB) or parts held whole (0.5 MiB each, up to 8 pending) would exceed 2 MiB.
        assert peak < 2 * 2**20, f"peak {peak / 2**20:.1f} MiB for a {len(body) / 2**20:.0f} MiB body"


def test_concurrent_requests_share_one_bounded_store_pool(web: LocalNode, monkeypatch: pytest.MonkeyPatch):
    """Three clients at once: at most STORE_THREADS stores run together (not a pool of threads per request)."""
    lock = threading.Lock()
    active = peak = 0
    real = web.ingest.store

    def store(rx, **kw):  # noqa: ANN001, ANN003, ANN202
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
        try:
            time.sleep(0.05)  # a slow disk: the stores overlap
            return real(rx, **kw)
        finally:
            with lock:
                active -= 1

    monkeypatch.setattr(web.ingest, "store", store)
    with ThreadPoolExecutor(3) as clients:
        answers = list(clients.map(lambda fs: web.stow(files_body(fs)), [CT[0:6], CT[6:12], CT[12:18]]))
    assert [r.status_code for r in answers] == [200, 200, 200]
    assert len(_rows(web)) == 18 and web.temp_files() == []
    assert 1 <= peak <= STORE_THREADS


def test_a_request_cancelled_mid_part_leaves_no_temp_file(web: LocalNode):
    """A server shutdown cancels the request while a part is being received: its temp file goes."""
    chunks = [files_body(CT[:1])[:100_000]]  # past the File Meta: the part's temp file exists

    async def receive() -> dict:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(), "more_body": True}
        raise asyncio.CancelledError

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/dicom-web/studies",
        "query_string": b"",
        "headers": [(b"content-type", STOW_TYPE.encode())],
        "app": web.client.app,
        "client": ("127.0.0.1", 50000),
        "server": ("testserver", 80),
        "scheme": "http",
        "root_path": "",
    }
    with pytest.raises(asyncio.CancelledError):
        asyncio.run(dicomweb._stow(Request(scope, receive), "tester", None))
    assert web.temp_files() == [] and _rows(web) == {}


def test_split_file_meta_is_incremental():
    """None until the File Meta and the first data set tag have arrived, then the File Meta and where the data
    set starts (the first element after group 0002 ends the group: its length is not trusted)."""
    raw = CT[0].read_bytes()
    offset = 144 + int.from_bytes(raw[140:144], "little")
    for n in (0, 100, 132, 140, offset - 1, offset + 5):
        assert split_file_meta(raw[:n]) is None
    found = split_file_meta(raw[: offset + 6])
    assert found is not None
    meta, at = found
    assert (
        at == offset and meta.TransferSyntaxUID == dcmread(CT[0], stop_before_pixels=True).file_meta.TransferSyntaxUID
    )
    with pytest.raises(ValueError, match="Part 10"):
        split_file_meta(b"\0" * 200)


def test_a_boundary_longer_than_rfc_2046_allows_is_taken_like_orthanc_sends_it(web: LocalNode):
    """Orthanc's DICOMweb plugin sends a 73-character boundary (two UUIDs); the node's writer makes the body."""
    body = Body([Part.of_file(CT[0])], boundary="7" * 36 + "-" + "3" * 36)
    r = web.stow(b"".join(body), content_type=body.content_type)
    assert r.status_code == 200, r.text
    assert list(_rows(web)) == [read_sop_uid(CT[0])]
