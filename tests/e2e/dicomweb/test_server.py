"""The node as a DICOMweb server, used by real clients: an HTTP client streaming STOW-RS, dicomweb-client
(STOW-RS, QIDO-RS, WADO-RS) and Orthanc's DICOMweb plugin with the node configured as one of its servers.

What a user relies on: what STOW-RS answers as stored is durable, indexed and exactly what was sent, and the
rules act on it as on C-STORE (here: forward to a DCMTK storescp); searches and retrievals work from the
clients people use.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pydicom
import pytest
from dicomweb_client.api import DICOMwebClient
from helpers import NodeProcess, StoreSCP, dataset_bytes, read_sop_uid, series_files, wait_for
from helpers.orthanc import Orthanc
from pydicom.uid import generate_uid

log = logging.getLogger(__name__)

TOKEN = "dicomweb-e2e-token-0123456789"
BOUNDARY = "e2e-stow-boundary-51f0"
CT = series_files("ct-head-philips-5mm")
MR = series_files("mr-t1-sag-siemens")
#: 200 CT instances: 8 series of 25 real slices (copies with new Study/Series/SOP Instance UIDs).
SERIES, SLICES = 8, 25


@dataclass
class Server:
    node: NodeProcess
    pacs: StoreSCP
    root: Path

    @property
    def dicomweb(self) -> str:
        return f"http://127.0.0.1:{self.node.web_port}/dicom-web"

    def client(self) -> DICOMwebClient:
        return DICOMwebClient(url=self.dicomweb, headers={"Authorization": f"Bearer {TOKEN}"})


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("dicomweb-server")
    pacs = StoreSCP(root / "pacs").start()
    config = f"""
[tracker]
stable_after = 1.0

[web]
token = "{TOKEN}"

{pacs.destination("pacs")}
[[rules]]
name = "ct-to-pacs"
[rules.match]
Modality = "CT"
calling_ae = "STOW-RS"
[[rules.actions]]
type = "forward"
to = ["pacs"]
"""
    node = NodeProcess(root / "node", extra_config=config).start()
    try:
        yield Server(node, pacs, root)
    finally:
        code = node.stop()
        pacs.stop()
        text = node.log()
        assert "Traceback" not in text, text[-4000:]
        assert code == 0, text[-4000:]


def _copies(folder: Path) -> list[Path]:
    """200 CT files made from the real series: one new study of 8 series, new Series and SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    study_uid = generate_uid()
    for s in range(SERIES):
        series_uid = generate_uid()
        for k, source in enumerate(CT[:SLICES]):
            ds = pydicom.dcmread(source)
            ds.StudyInstanceUID = study_uid
            ds.SeriesInstanceUID = series_uid
            ds.SeriesNumber = 100 + s
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            path = folder / f"s{s}-{k:02d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            out.append(path)
    return out


def _stream(files: list[Path]) -> Iterator[bytes]:
    """The multipart/related body, produced file by file as it is sent (never whole in memory here either)."""
    for p in files:
        yield f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n\r\n".encode()
        yield p.read_bytes()
        yield b"\r\n"
    yield f"--{BOUNDARY}--\r\n".encode()


def test_stow_of_200_ct_instances_is_durable_indexed_identical_and_rules_fire(server: Server):
    files = _copies(server.root / "ct200")
    sent = {read_sop_uid(p): dataset_bytes(p) for p in files}
    started = time.monotonic()
    r = httpx.post(
        f"{server.dicomweb}/studies",
        content=_stream(files),
        headers={
            "Authorization": f"Bearer {TOKEN}",
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={BOUNDARY}',
            "Accept": "application/dicom+json",
        },
        timeout=300,
    )
    elapsed = time.monotonic() - started
    megabytes = sum(p.stat().st_size for p in files) / 2**20
    log.warning(
        "STOW-RS of %d CT instances (%.0f MiB): %.2f s, %.0f instances/s",
        len(files),
        megabytes,
        elapsed,
        len(files) / elapsed,
    )
    assert r.status_code == 200, r.text
    referenced = r.json()["00081199"]["Value"]
    assert sorted(i["00081155"]["Value"][0] for i in referenced) == sorted(sent)
    # Answered means indexed (with the STOW-RS peer) and on disk, the data set exactly as sent.
    rows = server.node.query(
        "SELECT i.sop_instance_uid, i.file_path, i.calling_ae FROM instance i JOIN series s ON i.series_fk = s.id "
        "WHERE s.series_number >= 100"
    )
    assert len(rows) == len(files)
    assert {ae for _u, _p, ae in rows} == {"STOW-RS"}
    for uid, path, _ae in rows:
        assert dataset_bytes(server.node.data_dir / path) == sent[uid]
    # The rule (CT from calling AE "STOW-RS") forwards every instance to the PACS, as it does for C-STORE.
    wait_for(lambda: len(server.pacs.received()) >= len(files), 120, "the rule to forward the 200 instances")
    got = {read_sop_uid(p): dataset_bytes(p) for p in server.pacs.received()}
    assert all(got[uid] == data for uid, data in sent.items())
    assert server.node.temp_files() == []


def test_dicomweb_client_stores_searches_and_retrieves(server: Server):
    client = server.client()
    datasets = [pydicom.dcmread(p) for p in MR[:5]]
    stored = client.store_instances(datasets)
    assert len(stored.ReferencedSOPSequence) == 5
    study, series = str(datasets[0].StudyInstanceUID), str(datasets[0].SeriesInstanceUID)

    studies = client.search_for_studies(search_filters={"StudyInstanceUID": study})
    assert [s["0020000D"]["Value"][0] for s in studies] == [study]
    found = client.search_for_series(study, search_filters={"Modality": "MR"})
    assert [s["0020000E"]["Value"][0] for s in found] == [series]
    instances = client.search_for_instances(study, series, limit=3)
    assert len(instances) == 3

    retrieved = client.retrieve_series(study, series)
    assert sorted(str(d.SOPInstanceUID) for d in retrieved) == sorted(str(d.SOPInstanceUID) for d in datasets)
    by_uid = {str(d.SOPInstanceUID): d for d in datasets}
    assert all(d.PixelData == by_uid[str(d.SOPInstanceUID)].PixelData for d in retrieved)

    uid = str(datasets[2].SOPInstanceUID)
    meta = client.retrieve_instance_metadata(study, series, uid)
    assert meta["00080018"]["Value"] == [uid] and "7FE00010" not in meta
    (frame,) = client.retrieve_instance_frames(study, series, uid, frame_numbers=[1])
    assert frame == datasets[2].PixelData
    png = client.retrieve_instance_rendered(study, series, uid, media_types=("image/png",))
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_orthanc_dicomweb_plugin_queries_retrieves_and_stores_through_the_node(server: Server):
    # The node's CT study, stored by C-STORE.
    from helpers import storescu

    r = storescu(server.node.port, CT)
    assert r.returncode == 0, r.stderr
    ct = pydicom.dcmread(CT[0], stop_before_pixels=True)
    study = str(ct.StudyInstanceUID)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with Orthanc(
        server.root / "orthanc",
        dicomweb=True,
        dicomweb_servers={"node": {"Url": server.dicomweb + "/", "HttpHeaders": headers}},
    ) as orthanc:
        found = orthanc.post(
            "/dicom-web/servers/node/qido", {"Uri": "/studies", "Arguments": {"StudyInstanceUID": study}}
        )
        # Orthanc's answer: {tag: {"Name", "Value" (a string), ...}} per match.
        assert [s["0020000D"]["Value"] for s in found] == [study]
        assert found[0]["00100010"]["Value"] == "HEAD" and found[0]["00080061"]["Value"] == "CT"
        series = orthanc.post("/dicom-web/servers/node/qido", {"Uri": f"/studies/{study}/series"})
        assert {s["0020000E"]["Value"] for s in series} >= {str(ct.SeriesInstanceUID)}

        orthanc.post("/dicom-web/servers/node/retrieve", {"Resources": [{"Study": study}]}, timeout=120)
        # Stored by C-STORE (calling AE STORESCU): the rule for STOW-RS instances left it alone.
        assert not any(read_sop_uid(p) == read_sop_uid(CT[0]) for p in server.pacs.received())
        assert orthanc.count() == len(CT)
        for p in CT[:5]:
            assert dataset_bytes_of(orthanc.file(read_sop_uid(p))) == dataset_bytes(p)

        # And the other way: Orthanc sends an MR series it holds to the node by STOW-RS.
        mr = MR[5:10]
        for p in mr:
            orthanc.post("/instances", p.read_bytes())
        series_id = orthanc.post(
            "/tools/find",
            {"Level": "Series", "Query": {"SeriesInstanceUID": str(pydicom.dcmread(mr[0]).SeriesInstanceUID)}},
        )[0]
        orthanc.post("/dicom-web/servers/node/stow", {"Resources": [series_id]}, timeout=120)
        for p in mr:
            rows = server.node.query("SELECT file_path FROM instance WHERE sop_instance_uid = ?", read_sop_uid(p))
            assert len(rows) == 1
            assert pydicom.dcmread(server.node.data_dir / rows[0][0]).PixelData == pydicom.dcmread(p).PixelData


def dataset_bytes_of(data: bytes) -> bytes:
    """The data set after the File Meta of a file held in memory."""
    return data[144 + int.from_bytes(data[140:144], "little") :]


def test_a_client_that_goes_away_mid_body_leaves_the_parts_before_and_nothing_of_the_cut_part(server: Server):
    files = MR[10:13]
    body = b"".join(_stream(files))
    cut = body[: len(body) - len(files[-1].read_bytes()) // 2]  # inside the third part
    head = (
        f"POST /dicom-web/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {TOKEN}\r\n"
        f'Content-Type: multipart/related; type="application/dicom"; boundary={BOUNDARY}\r\n'
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    with socket.create_connection(("127.0.0.1", server.node.web_port), timeout=10) as s:
        s.sendall(head + cut)
        wait_for(
            lambda: (
                len(
                    server.node.query(
                        "SELECT id FROM instance WHERE sop_instance_uid IN (?, ?)", *map(read_sop_uid, files[:2])
                    )
                )
                == 2
            ),
            30,
            "the two complete parts to be stored",
        )
    wait_for(lambda: "the client went away after 2 part(s)" in server.node.log(), 30, "the node to log the cut body")
    assert server.node.query("SELECT id FROM instance WHERE sop_instance_uid = ?", read_sop_uid(files[2])) == []
    assert server.node.temp_files() == []
