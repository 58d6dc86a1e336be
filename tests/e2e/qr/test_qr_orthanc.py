"""Orthanc (the Debian package) as the node's Query/Retrieve SCU, through its REST API: it knows the node as a
modality, queries it (C-FIND) and retrieves a study from it (C-MOVE to Orthanc's own AE, which is a
[[destinations]] entry of the node), as an Orthanc user would with /modalities/<m>/query and
/queries/<id>/answers/<n>/retrieve.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pytest
from helpers import NodeProcess, dataset_bytes, read_sop_uid, series_files, storescu
from helpers.orthanc import Orthanc

CT, MR = "ct-head-philips-5mm", "mr-t1-sag-siemens"
pytestmark = pytest.mark.xdist_group("qr-orthanc")


@dataclass
class Peers:
    node: NodeProcess
    orthanc: Orthanc
    #: Orthanc's name for the node (its DicomModalities entry).
    modality: str = "dicom_node"


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    """A node holding the CT and MR series; an Orthanc that has the node as a modality and is its destination."""
    root = tmp_path_factory.mktemp("qr-orthanc")
    node = NodeProcess(root / "node")
    orthanc = Orthanc(root / "orthanc", sender_ports={node.ae_title: node.port}).start()
    try:
        node.extra_config = orthanc.destination("orthanc")
        node.start()
        r = storescu(node.port, [*series_files(CT), *series_files(MR)])
        assert r.returncode == 0, r.stderr
        yield Peers(node, orthanc)
    finally:
        code = node.stop()
        orthanc.stop()
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code in (0, None), f"node exited with {code}\n{node.log()[-4000:]}"


def _first(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(series_files(name)[0], stop_before_pixels=True)


def _query(peers: Peers, level: str, query: dict[str, str]) -> tuple[str, list[dict[str, dict[str, str]]]]:
    """Orthanc's C-FIND to the node: (the query's id, its answers as {tag: {Name, Value}})."""
    made = peers.orthanc.post(f"/modalities/{peers.modality}/query", {"Level": level, "Query": query})
    answers = peers.orthanc.get(f"/queries/{made['ID']}/answers?expand")
    return str(made["ID"]), list(answers)


def _value(answer: dict[str, dict[str, str]], tag: str) -> str:
    return str(answer[tag]["Value"])


def test_orthanc_finds_the_studies_and_series_it_asks_the_node_for(peers: Peers) -> None:
    ct, mr = _first(CT), _first(MR)
    _, studies = _query(peers, "Study", {"StudyInstanceUID": "", "PatientName": "", "StudyDate": "20100101-"})
    assert {_value(a, "0020,000d") for a in studies} == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    _, studies = _query(peers, "Study", {"PatientID": mr.PatientID, "StudyDescription": ""})
    assert [_value(a, "0020,000d") for a in studies] == [mr.StudyInstanceUID]

    _, series = _query(peers, "Series", {"StudyInstanceUID": ct.StudyInstanceUID, "Modality": "", "SeriesNumber": ""})
    assert [(_value(a, "0020,000e"), _value(a, "0008,0060")) for a in series] == [(ct.SeriesInstanceUID, "CT")]


def test_orthanc_retrieves_a_study_by_c_move_and_holds_the_same_data_sets(peers: Peers, tmp_path: Path) -> None:
    files = series_files(CT)
    ct = _first(CT)
    query_id, [answer] = _query(peers, "Study", {"StudyInstanceUID": ct.StudyInstanceUID})
    assert _value(answer, "0020,000d") == ct.StudyInstanceUID
    peers.orthanc.post(
        f"/queries/{query_id}/answers/0/retrieve",
        {"TargetAet": peers.orthanc.aet, "Synchronous": True},
        timeout=120,
    )
    # Synchronous: Orthanc's C-MOVE has had its final response, so the node's deliveries are done.
    assert peers.orthanc.count() == len(files)
    for f in files:
        held = tmp_path / f.name
        held.write_bytes(peers.orthanc.file(read_sop_uid(f)))
        assert dataset_bytes(held) == dataset_bytes(f)
    log = peers.node.log()
    assert f"C-MOVE STUDY (study root) on StudyInstanceUID to orthanc ({peers.orthanc.aet})" in log
    assert f"final 0x0000: {len(files)} completed, 0 failed" in log
