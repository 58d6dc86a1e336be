"""QIDO-RS and WADO-RS on the node's web app in this process, over instances stored by STOW-RS.

A client relies on: a search finds what is stored (and says so when it cannot search on an attribute); a
retrieve gives back the instances byte for byte as stored; metadata leaves Pixel Data out; frames are the
stored pixel bytes; rendered is a picture of the right size; unknown UIDs are 404 with a message.
"""

from __future__ import annotations

import base64
import io
import json
import time
import tracemalloc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from helpers import SHARED, dataset_bytes, read_sop_uid, series_files
from helpers.dicomweb import LocalNode, files_body, local_node, parts_of
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

from node import audit
from node.index import query
from node.web import dicomweb_wado as wado

CT = series_files("ct-head-philips-5mm")
MISC = SHARED / "transfer-syntaxes" / "misc"
J2K_MULTIFRAME = MISC / "emri_small_jpeg_2k_lossless.dcm"
NATIVE_MULTIFRAME = MISC / "eCT_Supplemental.dcm"
RGB_JPEG = MISC / "SC_rgb_jpeg_dcmtk.dcm"


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalNode]:
    with local_node(tmp_path_factory.mktemp("dicomweb") / "data") as n:
        r = n.stow(files_body([*CT, J2K_MULTIFRAME, NATIVE_MULTIFRAME, RGB_JPEG]))
        assert r.status_code == 200, r.text
        yield n


def _ct() -> tuple[str, str]:
    ds = dcmread(CT[0], stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def _uids(body: list[dict], tag: str) -> list[str]:
    return [item[tag]["Value"][0] for item in body]


def test_qido_finds_studies_series_and_instances(web: LocalNode):
    study, series = _ct()
    r = web.get("/dicom-web/studies", Accept="application/dicom+json")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    studies = r.json()
    assert study in _uids(studies, "0020000D")
    ct_study = next(s for s in studies if s["0020000D"]["Value"][0] == study)
    assert ct_study["00081190"]["Value"][0] == f"http://testserver/dicom-web/studies/{study}"
    r = web.get(f"/dicom-web/studies/{study}/series")
    assert r.status_code == 200 and _uids(r.json(), "0020000E") == [series]
    r = web.get(f"/dicom-web/studies/{study}/series/{series}/instances")
    assert sorted(_uids(r.json(), "00080018")) == sorted(read_sop_uid(p) for p in CT)
    r = web.get("/dicom-web/instances", params={"SOPInstanceUID": read_sop_uid(CT[3])})
    assert _uids(r.json(), "0020000E") == [series]


def test_qido_matches_limits_and_answers_empty(web: LocalNode):
    study, series = _ct()
    r = web.get(f"/dicom-web/studies/{study}/instances", params={"limit": "5", "offset": "2"})
    assert r.status_code == 200 and len(r.json()) == 5
    r = web.get("/dicom-web/series", params={"Modality": "CT", "SeriesInstanceUID": series})
    assert _uids(r.json(), "0020000E") == [series]
    r = web.get("/dicom-web/series", params={"Modality": "XA"})
    assert r.status_code == 200 and r.json() == []


def test_qido_unknown_attribute_is_400_naming_it(web: LocalNode):
    r = web.get("/dicom-web/studies", params={"NoSuchAttribute": "x"})
    assert r.status_code == 400
    assert "NoSuchAttribute" in r.json()["detail"]
    r = web.get("/dicom-web/studies", params={"limit": "many"})
    assert r.status_code == 400 and "limit" in r.json()["detail"]


def test_wado_retrieves_a_series_byte_identical(web: LocalNode):
    study, series = _ct()
    r = web.get(f"/dicom-web/studies/{study}/series/{series}", Accept='multipart/related; type="application/dicom"')
    assert r.status_code == 200, r.text
    parts = parts_of(r.headers["content-type"], r.content)
    assert len(parts) == len(CT)
    assert all(ct.startswith("application/dicom") for ct, _ in parts)
    sent = {read_sop_uid(p): dataset_bytes(p) for p in CT}
    for _type, data in parts:
        ds = dcmread(io.BytesIO(data), stop_before_pixels=True)
        got = data[144 + int.from_bytes(data[140:144], "little") :]
        assert got == sent[str(ds.SOPInstanceUID)]


def test_wado_instance_and_study(web: LocalNode):
    study, series = _ct()
    uid = read_sop_uid(CT[0])
    r = web.get(f"/dicom-web/studies/{study}/series/{series}/instances/{uid}")
    (part,) = parts_of(r.headers["content-type"], r.content)
    assert dcmread(io.BytesIO(part[1])).SOPInstanceUID == uid
    r = web.get(f"/dicom-web/studies/{study}", Accept='multipart/related; type="application/dicom"; transfer-syntax=*')
    assert len(parts_of(r.headers["content-type"], r.content)) == len(CT)


def test_wado_does_not_transcode_and_says_so(web: LocalNode):
    study, _series = _ct()
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.50'
    r = web.get(f"/dicom-web/studies/{study}", Accept=accept)
    assert r.status_code == 406
    assert "1.2.840.10008.1.2.1" in r.json()["detail"] and "transfer-syntax=*" in r.json()["detail"]


def test_wado_unknown_uids_are_404(web: LocalNode):
    study, series = _ct()
    r = web.get("/dicom-web/studies/1.2.3.999")
    assert r.status_code == 404 and "1.2.3.999" in r.json()["detail"]
    r = web.get(f"/dicom-web/studies/{study}/series/{series}/instances/1.2.3.999/metadata")
    assert r.status_code == 404 and "instance 1.2.3.999" in r.json()["detail"]


def test_metadata_has_the_attributes_but_no_pixel_data(web: LocalNode):
    study, series = _ct()
    r = web.get(f"/dicom-web/studies/{study}/series/{series}/metadata")
    assert r.status_code == 200 and r.headers["content-type"] == "application/dicom+json"
    items = r.json()
    assert len(items) == len(CT)
    assert all("7FE00010" not in i and i["00080060"]["Value"] == ["CT"] for i in items)
    assert {i["00083002"]["Value"][0] for i in items} == {"1.2.840.10008.1.2.1"}


def _refs(path: Path) -> tuple[str, str, str]:
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


def test_frames_of_an_encapsulated_multiframe_are_the_stored_frames(web: LocalNode):
    s, se, i = _refs(J2K_MULTIFRAME)
    r = web.get(f"/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/2,5")
    assert r.status_code == 200, r.text
    parts = parts_of(r.headers["content-type"], r.content)
    ds = dcmread(J2K_MULTIFRAME)
    expected = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    assert [data for _t, data in parts] == [expected[1], expected[4]]
    assert all(t.startswith("image/jp2; transfer-syntax=1.2.840.10008.1.2.4.90") for t, _d in parts)
    r = web.get(f"/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/11")
    assert r.status_code == 404 and "10 frame(s)" in r.json()["detail"]


def test_frames_of_a_native_image_are_its_pixel_bytes(web: LocalNode):
    s, se, i = _refs(NATIVE_MULTIFRAME)
    r = web.get(f"/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/2")
    (part,) = parts_of(r.headers["content-type"], r.content)
    ds = dcmread(NATIVE_MULTIFRAME)
    size = ds.Rows * ds.Columns * ds.BitsAllocated // 8
    assert part[0].startswith("application/octet-stream")
    assert part[1] == ds.PixelData[size : 2 * size]


def test_rendered_is_a_windowed_picture(web: LocalNode):
    study, series = _ct()
    uid = read_sop_uid(CT[14])
    base = f"/dicom-web/studies/{study}/series/{series}/instances/{uid}"
    r = web.get(base + "/rendered")
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    png = np.asarray(Image.open(io.BytesIO(r.content)))
    assert png.shape == (512, 512) and png.min() < 20 and png.max() > 200  # air dark, bone bright
    bone = web.get(base + "/rendered", params={"window": "500,2000"})
    assert bone.status_code == 200 and bone.content != r.content
    r = web.get(base + "/frames/1/rendered", Accept="image/jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(r.content)).size == (512, 512)
    r = web.get(base + "/rendered", Accept="image/gif")
    assert r.status_code == 406 and "image/png" in r.json()["detail"]
    r = web.get(base + "/rendered", params={"window": "wide"})
    assert r.status_code == 400 and "center,width" in r.json()["detail"]


def test_rendered_multiframe_j2k_frame(web: LocalNode):
    s, se, i = _refs(J2K_MULTIFRAME)
    r = web.get(f"/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/3/rendered")
    assert r.status_code == 200, r.text
    assert Image.open(io.BytesIO(r.content)).size == (64, 64)


def test_everything_needs_authentication(web: LocalNode):
    study, _series = _ct()
    for path in ("/dicom-web/studies", f"/dicom-web/studies/{study}", f"/dicom-web/studies/{study}/metadata"):
        assert web.client.get(path).status_code == 401


def test_qido_answers_at_most_max_results_and_says_there_is_more(tmp_path: Path):
    with local_node(tmp_path / "data", max_results=10) as small:
        assert small.stow(files_body(CT[:12])).status_code == 200
        r = small.get("/dicom-web/instances")
        assert r.status_code == 200 and len(r.json()) == 10
        assert "additional results" in r.headers["warning"]
        rest = small.get("/dicom-web/instances", params={"offset": "10"})
        assert len(rest.json()) == 2 and "warning" not in rest.headers
        assert {*_uids(r.json(), "00080018"), *_uids(rest.json(), "00080018")} == {read_sop_uid(p) for p in CT[:12]}
        exact = small.get("/dicom-web/instances", params={"limit": "10"})
        assert len(exact.json()) == 10 and "warning" not in exact.headers


def test_rendered_colour_image_is_rgb_like_the_decoded_pixels(web: LocalNode):
    s, se, i = _refs(RGB_JPEG)
    r = web.get(f"/dicom-web/studies/{s}/series/{se}/instances/{i}/rendered")
    assert r.status_code == 200, r.text
    picture = np.asarray(Image.open(io.BytesIO(r.content)))
    expected = dcmread(RGB_JPEG).pixel_array  # pydicom's RGB
    assert picture.shape == expected.shape and picture.shape[2] == 3
    assert np.abs(picture.astype(int) - expected.astype(int)).max() <= 1


def test_searches_and_retrievals_are_audited_by_name_without_values(web: LocalNode):
    study, series = _ct()
    assert web.get("/dicom-web/studies", params={"PatientID": "PLASTIC"}).status_code == 200
    assert web.get(f"/dicom-web/studies/{study}/series/{series}").status_code == 200

    def events() -> list[dict]:
        found = audit.query(web.engine, kind=["query", "retrieve"], uid=None, limit=100)
        return [e for e in found if "PatientID" in e["detail"] or e["series_uid"] == series]

    deadline = time.monotonic() + 10
    while len(events()) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    query_event = next(e for e in events() if e["kind"] == "query")
    retrieve_event = next(e for e in events() if e["kind"] == "retrieve")
    assert query_event["actor"] == "token" and "PatientID" in query_event["detail"]
    assert "PLASTIC" not in query_event["detail"]  # key names only: values may be patient data
    assert retrieve_event["study_uid"] == study and f"{len(CT)} instance(s)" in retrieve_event["detail"]


# --- review fixes: metadata, frames, rendered, Accept ------------------------------------------------


def _variant(tmp_path: Path, name: str) -> tuple[Path, Dataset]:
    """CT[0] as a new instance of a new study: a bad DS value and a large and a small private binary value."""
    ds = dcmread(CT[0])
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = generate_uid(), generate_uid(), generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.SliceThickness = "5.25"
    ds.add_new(0x00090010, "LO", "DICOM-NODE TEST")
    ds.add_new(0x00091010, "OB", bytes(range(256)) * 256)  # 64 KiB: a PDF or an overlay in real life
    ds.add_new(0x00091011, "OB", b"small value!")
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    raw = bytearray(path.read_bytes())
    at = raw.index(b"5.25")  # SliceThickness's value: no longer a number
    raw[at : at + 4] = b"five"
    path.write_bytes(bytes(raw))
    return path, ds


def test_metadata_survives_a_bad_value_and_leaves_large_binary_values_out(web: LocalNode, tmp_path: Path):
    path, ds = _variant(tmp_path, "bad-ds.dcm")
    assert web.stow(files_body([path])).status_code == 200
    r = web.get(f"/dicom-web/studies/{ds.StudyInstanceUID}/metadata")
    assert r.status_code == 200, r.text
    (item,) = r.json()
    assert item["00080018"]["Value"] == [ds.SOPInstanceUID]
    assert "00180050" not in item  # the DS that is not a number is left out, not a 500
    assert "00091010" not in item  # 64 KiB of binary: left out
    assert base64.b64decode(item["00091011"]["InlineBinary"]) == b"small value!"
    assert len(r.content) < 20_000


def test_metadata_is_written_one_instance_at_a_time(web: LocalNode, monkeypatch: pytest.MonkeyPatch):
    study, series = _ct()
    stored = [(ref, web.storage.absolute(ref.file_path)) for ref in _series_refs(web, series)]
    reads: list[Path] = []
    real = wado.dcmread

    def counting(path, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        reads.append(path)
        return real(path, *args, **kwargs)

    monkeypatch.setattr(wado, "dcmread", counting)
    chunks = wado.metadata_json(stored)
    assert next(chunks) == b"[" and json.loads(next(chunks))["0020000E"]["Value"] == [series]
    assert len(reads) == 1  # the others are read as the answer goes out
    rest = b"".join(chunks)
    assert len(reads) == len(CT)
    assert len(json.loads(b"[{}" + rest)) == len(CT)  # the first item stands in as {}: a valid array


def _series_refs(web: LocalNode, series: str) -> list:
    with web.engine.connect() as conn:
        return query.instances(conn, query.Query(level="SERIES", keys={"SeriesInstanceUID": series}))


def _many_frames(tmp_path: Path, frames: int = 40) -> tuple[Path, Dataset]:
    """The native enhanced CT with its two frames repeated: a 20 MiB multi-frame."""
    ds = dcmread(NATIVE_MULTIFRAME)
    ds.PixelData = bytes(ds.PixelData) * (frames // 2)
    ds.NumberOfFrames = frames
    path = tmp_path / "many-frames.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path, ds


def _peak(fn) -> tuple[object, int]:  # noqa: ANN001
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_frame_is_read_alone_from_the_file(tmp_path: Path):
    path, ds = _many_frames(tmp_path)
    size = ds.Rows * ds.Columns * 2
    (media, (frame,)), peak = _peak(lambda: wado.frames(path, [3]))
    assert media.startswith("application/octet-stream") and frame == ds.PixelData[2 * size : 3 * size]
    assert peak < 4 * size, f"{peak / 2**20:.1f} MiB to read one {size / 2**20:.1f} MiB frame of 40"


def test_rendering_decodes_only_the_frame_shown(tmp_path: Path):
    path, ds = _many_frames(tmp_path)
    png, peak = _peak(lambda: wado.render(path, 3, "image/png", None))
    assert Image.open(io.BytesIO(png)).size == (512, 512)
    frame_bytes = ds.Rows * ds.Columns * 2
    assert peak < 10 * frame_bytes, f"{peak / 2**20:.1f} MiB to render one frame of 40 (all: 20 MiB)"


def test_a_frame_too_large_to_render_is_413(web: LocalNode, monkeypatch: pytest.MonkeyPatch):
    study, series = _ct()
    monkeypatch.setattr(wado, "MAX_RENDER_PIXELS", 512 * 256)
    r = web.get(f"/dicom-web/studies/{study}/series/{series}/instances/{read_sop_uid(CT[0])}/rendered")
    assert r.status_code == 413 and "512 x 512" in r.json()["detail"] and "frames/1" in r.json()["detail"]


def test_accept_is_read_with_its_preferences(web: LocalNode):
    study, series = _ct()
    base = f"/dicom-web/studies/{study}/series/{series}/instances/{read_sop_uid(CT[0])}"
    r = web.get(base + "/rendered", Accept="image/png;q=0.2, image/jpeg")
    assert r.status_code == 200 and r.headers["content-type"] == "image/jpeg"
    assert web.get(base + "/rendered", Accept="image/*").headers["content-type"] == "image/png"
    assert web.get("/dicom-web/studies", Accept="text/plain").status_code == 406
    assert web.get("/dicom-web/studies", Accept="application/dicom+xml").status_code == 406
    assert web.get("/dicom-web/studies", Accept="text/html, */*;q=0.8").status_code == 200
    assert web.get("/dicom-web/studies", Accept="application/json").status_code == 200
    r = web.get(
        f"/dicom-web/studies/{study}",
        Accept='multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90',
    )
    assert r.status_code == 406 and "1.2.840.10008.1.2.1" in r.json()["detail"]


def test_compressed_frames_as_octet_stream_need_transfer_syntax_star(web: LocalNode):
    s, se, i = _refs(J2K_MULTIFRAME)
    url = f"/dicom-web/studies/{s}/series/{se}/instances/{i}/frames/1"
    r = web.get(url, Accept='multipart/related; type="application/octet-stream"')
    assert r.status_code == 406 and 'type="image/jp2"' in r.json()["detail"]
    r = web.get(url, Accept='multipart/related; type="application/octet-stream"; transfer-syntax=*')
    assert r.status_code == 200
    r = web.get(url, Accept='multipart/related; type="image/jp2"')
    assert r.status_code == 200 and parts_of(r.headers["content-type"], r.content)[0][0].startswith("image/jp2")
    native = _refs(NATIVE_MULTIFRAME)
    r = web.get(
        "/dicom-web/studies/{}/series/{}/instances/{}/frames/1".format(*native),
        Accept='multipart/related; type="application/octet-stream"',
    )
    assert r.status_code == 200
