"""The node's Query/Retrieve SCP against DCMTK's findscu, movescu and getscu, on the real CT and MR series.

One node for the module (stored into with storescu first) and one DCMTK storescp as its C-MOVE destination;
the clients' answers are read from the response files they write (findscu -X) and from their debug output
(statuses, sub-operation counts, comments), as a user of those tools sees them.
"""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from helpers import (
    PEER_ENV,
    SHARED,
    NodeProcess,
    StoreSCP,
    dataset_bytes,
    dcmtk,
    read_sop_uid,
    series_files,
    storescu,
)

CT, MR = "ct-head-philips-5mm", "mr-t1-sag-siemens"
#: A study of one MR image stored in JPEG 2000 lossless (another patient, 2004).
J2K = SHARED / "transfer-syntaxes" / "misc" / "MR2_J2KR.dcm"
#: One node for the whole module: its tests run in one xdist worker.
pytestmark = pytest.mark.xdist_group("qr-dcmtk")


def _first(name: str) -> pydicom.Dataset:
    return pydicom.dcmread(series_files(name)[0], stop_before_pixels=True)


def _j2k() -> pydicom.Dataset:
    return pydicom.dcmread(J2K, stop_before_pixels=True)


@pytest.fixture(scope="module")
def scp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreSCP]:
    server = StoreSCP(tmp_path_factory.mktemp("storescp")).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, scp: StoreSCP) -> Iterator[NodeProcess]:
    """A node holding the CT and MR series and the J2K image, with the storescp as its [[destinations]] entry "scp"."""
    n = NodeProcess(tmp_path_factory.mktemp("node"), extra_config=scp.destination("scp"))
    n.start()
    r = storescu(n.port, [*series_files(CT), *series_files(MR)])
    assert r.returncode == 0, r.stderr
    r = storescu(n.port, [J2K], "-xv")
    assert r.returncode == 0, r.stderr
    yield n
    code = n.stop()
    assert "Traceback" not in n.log(), n.log()[-4000:]
    assert code in (0, None), f"node exited with {code}\n{n.log()[-4000:]}"


def _run(tool: str, node: NodeProcess, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """A DCMTK Q/R client with debug output (statuses, counts and comments are read from it)."""
    cmd = [dcmtk(tool), "-d", "-aec", node.ae_title, *args, "127.0.0.1", str(node.port)]
    return subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=PEER_ENV, timeout=120, cwd=cwd)


def findscu(
    node: NodeProcess, out: Path, *keys: str, root: str = "-S", more: tuple[str, ...] = ()
) -> list[pydicom.Dataset]:
    """findscu's matches (each response identifier it wrote with -X), after checking it ended with Success."""
    out.mkdir(parents=True, exist_ok=True)
    r = _run("findscu", node, root, "-X", "-od", str(out), *more, *[a for k in keys for a in ("-k", k)])
    assert r.returncode == 0 and "0x0000: Success" in r.stdout + r.stderr, r.stdout + r.stderr
    return [pydicom.dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


def final_status(output: str) -> int:
    """The last DIMSE status in a DCMTK client's debug output (the final response's)."""
    return int(re.findall(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})", output)[-1], 16)


def counts(output: str) -> tuple[int, int, int]:
    """(completed, failed, warning) of the final C-MOVE/C-GET response in movescu's / getscu's debug output."""
    final = output[output.rindex("Final") :]
    return tuple(  # type: ignore[return-value]
        int(re.search(rf"(?:Number of )?{k} Suboperations\s*:\s*(\d+)", final).group(1))  # type: ignore[union-attr]
        for k in ("Completed", "Failed", "Warning")
    )


# -- C-FIND ---------------------------------------------------------------------------------------


def test_patient_level_under_patient_root_finds_both_patients(node: NodeProcess, tmp_path: Path) -> None:
    ct, mr = _first(CT), _first(MR)
    found = findscu(
        node,
        tmp_path,
        "QueryRetrieveLevel=PATIENT",
        "PatientID",
        "PatientName",
        "NumberOfPatientRelatedStudies",
        root="-P",
    )
    by_id = {str(ds.PatientID): ds for ds in found}
    assert set(by_id) == {ct.PatientID, mr.PatientID, _j2k().PatientID}
    assert str(by_id[ct.PatientID].PatientName) == str(ct.PatientName)
    assert by_id[ct.PatientID].NumberOfPatientRelatedStudies == 1


@pytest.mark.parametrize("root", ["-S", "-P"])
def test_study_level_in_both_roots(node: NodeProcess, tmp_path: Path, root: str) -> None:
    ct = _first(CT)
    keys = [
        "QueryRetrieveLevel=STUDY",
        "StudyInstanceUID",
        "StudyDate",
        "ModalitiesInStudy",
        "NumberOfStudyRelatedInstances",
        f"PatientID={ct.PatientID}",
    ]
    [study] = findscu(node, tmp_path, *keys, root=root)
    assert study.StudyInstanceUID == ct.StudyInstanceUID and study.StudyDate == ct.StudyDate
    assert study.ModalitiesInStudy == "CT" and study.NumberOfStudyRelatedInstances == len(series_files(CT))
    assert study.RetrieveAETitle == node.ae_title


@pytest.mark.parametrize("root", ["-S", "-P"])
def test_series_and_image_levels_in_both_roots(node: NodeProcess, tmp_path: Path, root: str) -> None:
    mr = _first(MR)
    patient = [f"PatientID={mr.PatientID}"] if root == "-P" else []
    [series] = findscu(
        node,
        tmp_path / "series",
        "QueryRetrieveLevel=SERIES",
        *patient,
        f"StudyInstanceUID={mr.StudyInstanceUID}",
        "SeriesInstanceUID",
        "Modality",
        "SeriesNumber",
        "NumberOfSeriesRelatedInstances",
        root=root,
    )
    assert (series.SeriesInstanceUID, series.Modality) == (mr.SeriesInstanceUID, "MR")
    assert series.NumberOfSeriesRelatedInstances == len(series_files(MR))
    images = findscu(
        node,
        tmp_path / "images",
        "QueryRetrieveLevel=IMAGE",
        *patient,
        f"StudyInstanceUID={mr.StudyInstanceUID}",
        f"SeriesInstanceUID={mr.SeriesInstanceUID}",
        "SOPInstanceUID",
        "InstanceNumber",
        "SOPClassUID",
        root=root,
    )
    assert {str(ds.SOPInstanceUID) for ds in images} == {read_sop_uid(f) for f in series_files(MR)}
    assert {ds.SOPClassUID for ds in images} == {mr.SOPClassUID}


def test_wildcard_date_range_and_uid_list_matching(node: NodeProcess, tmp_path: Path) -> None:
    ct, mr = _first(CT), _first(MR)
    study = ["QueryRetrieveLevel=STUDY", "StudyInstanceUID"]
    wild = findscu(node, tmp_path / "wild", *study, f"PatientName={str(ct.PatientName)[:2].lower()}*")
    assert [ds.StudyInstanceUID for ds in wild] == [ct.StudyInstanceUID], "PN matching ignores case, as Orthanc"
    ranged = findscu(node, tmp_path / "range", *study, "StudyDate=20220101-20221231")
    assert [ds.StudyInstanceUID for ds in ranged] == [mr.StudyInstanceUID]
    open_ended = findscu(node, tmp_path / "open", *study, "StudyDate=-20151231")
    assert {ds.StudyInstanceUID for ds in open_ended} == {ct.StudyInstanceUID, _j2k().StudyInstanceUID}
    since = findscu(node, tmp_path / "since", *study, "StudyDate=20150206-")
    assert {ds.StudyInstanceUID for ds in since} == {ct.StudyInstanceUID, mr.StudyInstanceUID}
    listed = findscu(
        node,
        tmp_path / "list",
        "QueryRetrieveLevel=SERIES",
        "Modality",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}\\{mr.SeriesInstanceUID}\\1.2.3.4",
    )
    assert sorted(ds.Modality for ds in listed) == ["CT", "MR"]


def test_findscu_cancel_ends_the_find_with_fe00_or_comes_after_it(node: NodeProcess, tmp_path: Path) -> None:
    """findscu sends its C-CANCEL-RQ after the 2nd response. The node answers its ~60 matches in about a
    millisecond, usually before the C-CANCEL arrives: then the find completed (PS3.4 allows it) and the late
    C-CANCEL is ignored without harming the association. When it arrives in time the final is 0xFE00 after
    fewer matches. (A C-CANCEL that always arrives in time is pinned in tests/receive/test_acceptor_qr.py and
    tests/qr/test_service.py.)"""
    r = _run("findscu", node, "-S", "--cancel", "2", "-k", "QueryRetrieveLevel=IMAGE", "-k", "SOPInstanceUID")
    out = r.stdout + r.stderr
    [(total,)] = node.query("select count(*) from instance")
    pendings = len(re.findall(r"Received Find Response \d+", out))
    assert "Sending Cancel Request" in out, out[-3000:]
    assert (final_status(out), pendings < total) in ((0xFE00, True), (0x0000, False)), out[-3000:]
    assert r.returncode == 0 and "Releasing Association" in out, out[-3000:]
    assert "Association Aborted" not in out and "A-ABORT" not in out, out[-3000:]


def test_an_unknown_attribute_is_refused_with_a900_naming_it(node: NodeProcess) -> None:
    r = _run("findscu", node, "-S", "-k", "QueryRetrieveLevel=STUDY", "-k", "0009,0010=ACME")
    out = r.stdout + r.stderr
    assert final_status(out) == 0xA900, out[-3000:]
    assert re.search(r"\(0000,0901\) AT \(0009,0010\)", out), out[-3000:]
    assert "private attributes cannot be queried" in out


# -- C-MOVE and C-GET -----------------------------------------------------------------------------


def test_movescu_gets_the_series_to_the_storescp_destination_byte_identical(node: NodeProcess, scp: StoreSCP) -> None:
    files = series_files(CT)
    ct = _first(CT)
    r = _run(
        "movescu",
        node,
        "-S",
        "-aem",
        scp.ae_title,
        "-k",
        "QueryRetrieveLevel=SERIES",
        "-k",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
        "-k",
        f"SeriesInstanceUID={ct.SeriesInstanceUID}",
    )
    out = r.stdout + r.stderr
    assert final_status(out) == 0x0000 and counts(out) == (len(files), 0, 0), out[-3000:]
    received = {read_sop_uid(p): p for p in scp.received()}
    for f in files:
        assert dataset_bytes(received[read_sop_uid(f)]) == dataset_bytes(f)
    assert node.query("select state, count(*) from delivery where destination = 'scp' group by state") == [
        ("delivered", len(files))
    ]


def test_a_move_to_an_unknown_ae_is_refused_with_a801_and_says_why(node: NodeProcess) -> None:
    ct = _first(CT)
    r = _run(
        "movescu",
        node,
        "-S",
        "-aem",
        "NOWHERE",
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={ct.StudyInstanceUID}",
    )
    out = r.stdout + r.stderr
    assert final_status(out) == 0xA801, out[-3000:]
    assert "'NOWHERE' is not in the node's [[destinations]]" in out, "the Error Comment says why"
    assert "move destination 'NOWHERE' is not the ae_title of a DIMSE [[destinations]] entry" in node.log()


def test_getscu_gets_the_study_on_its_own_association_byte_identical(node: NodeProcess, tmp_path: Path) -> None:
    files = series_files(MR)
    mr = _first(MR)
    out_dir = tmp_path / "get"
    out_dir.mkdir()
    r = _run(
        "getscu",
        node,
        "-S",
        "+B",  # written as received (by default getscu writes the data set it decoded)
        "-od",
        str(out_dir),
        "-k",
        "QueryRetrieveLevel=STUDY",
        "-k",
        f"StudyInstanceUID={mr.StudyInstanceUID}",
    )
    out = r.stdout + r.stderr
    assert r.returncode == 0 and final_status(out) == 0x0000, out[-3000:]
    got = {read_sop_uid(p): p for p in out_dir.iterdir()}
    assert set(got) == {read_sop_uid(f) for f in files}
    for f in files:
        assert dataset_bytes(got[read_sop_uid(f)]) == dataset_bytes(f)


def test_getscu_gets_a_compressed_instance_only_in_a_syntax_it_accepts(node: NodeProcess, tmp_path: Path) -> None:
    """C-GET sends as stored (no transcoding): a requestor taking only uncompressed syntaxes is told why it got nothing."""
    study = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={_j2k().StudyInstanceUID}"]
    plain = tmp_path / "plain"
    plain.mkdir()
    r = _run("getscu", node, "-S", "+B", "-od", str(plain), *study)
    out = r.stdout + r.stderr
    assert final_status(out) == 0xA702 and counts(out) == (0, 1, 0), out[-3000:]
    assert "1 not sent: stored syntax not accepted (no transcoding)" in out
    assert not list(plain.iterdir())
    # DCMTK 3.6.7's getscu does not read the final response's identifier (it then fails to release the
    # association); pynetdicom does: the Failed SOP Instance UID List names the instance.
    [final] = _pynetdicom_get(node, _j2k().StudyInstanceUID)[-1:]
    assert final[0] == 0xA702 and final[1].FailedSOPInstanceUIDList == _j2k().SOPInstanceUID, final
    assert "no presentation context for 1.2.840.10008.5.1.4.1.1.4 in 1.2.840.10008.1.2.4.90" in node.log()

    j2k = tmp_path / "j2k"
    j2k.mkdir()
    r = _run("getscu", node, "-S", "+B", "+xv", "-od", str(j2k), *study)  # JPEG 2000 lossless proposed first
    out = r.stdout + r.stderr
    assert final_status(out) == 0x0000 and counts(out) == (1, 0, 0), out[-3000:]
    [got] = j2k.iterdir()
    [(path,)] = node.query("select file_path from instance where sop_instance_uid = ?", str(_j2k().SOPInstanceUID))
    assert dataset_bytes(got) == dataset_bytes(node.data_dir / path), "as the node stored it (storescu re-encodes)"


def _pynetdicom_get(node: NodeProcess, study_uid: str) -> list[tuple[int, pydicom.Dataset | None]]:
    """A C-GET of a study with pynetdicom taking only uncompressed MR images: each response's (status, identifier)."""
    from pynetdicom import AE, build_role, evt
    from pynetdicom.sop_class import MRImageStorage, StudyRootQueryRetrieveInformationModelGet

    ae = AE(ae_title="PYNETDICOM")
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
    ae.add_requested_context(MRImageStorage)
    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title=node.ae_title,
        ext_neg=[build_role(MRImageStorage, scp_role=True)],
        evt_handlers=[(evt.EVT_C_STORE, lambda _event: 0x0000)],
    )
    assert assoc.is_established
    ident = pydicom.Dataset()
    ident.QueryRetrieveLevel = "STUDY"
    ident.StudyInstanceUID = study_uid
    try:
        return [(int(st.Status), ds) for st, ds in assoc.send_c_get(ident, StudyRootQueryRetrieveInformationModelGet)]
    finally:
        assoc.release()


def test_a_move_to_a_destination_that_is_down_answers_at_once_and_is_delivered_once_it_is_up(tmp_path: Path) -> None:
    """The destination refuses connections: once its circuit is open the requestor hears at once (not after
    [qr] move_timeout, 600 s) what is still queued; the durable queue delivers it later."""
    scp = StoreSCP(tmp_path / "later", ae_title="LATER")  # not started yet: its port refuses connections
    retry = "[destinations.retry]\ninitial_delay = 0.5\nmax_delay = 1\n"
    node = NodeProcess(tmp_path / "node", extra_config=f"{scp.destination('later')}{retry}")
    try:
        node.start()
        assert storescu(node.port, [J2K], "-xv").returncode == 0
        uid = str(_j2k().SOPInstanceUID)
        t0 = time.monotonic()
        r = _run(
            "movescu",
            node,
            "-S",
            "-aem",
            "LATER",
            "-k",
            "QueryRetrieveLevel=IMAGE",
            "-k",
            f"StudyInstanceUID={_j2k().StudyInstanceUID}",
            "-k",
            f"SeriesInstanceUID={_j2k().SeriesInstanceUID}",
            "-k",
            f"SOPInstanceUID={uid}",
        )
        out = r.stdout + r.stderr
        assert time.monotonic() - t0 < 60, "the C-MOVE waited for move_timeout"
        assert final_status(out) == 0xA702 and counts(out) == (0, 1, 0), out[-3000:]
        assert "1 still queued for later: unreachable, delivered later" in out
        # still in the queue (or being tried again right now: the back-off here is 0.5-1 s)
        assert node.query("select state from delivery where destination = 'later'") in ([("queued",)], [("sending",)])
        assert re.search(
            r"C-MOVE to later: 1 instance\(s\) still queued after \d+ s \(later is unreachable, its next try is in",
            node.log(),
        )

        scp.start()
        node.wait_delivered(1, timeout=60)
        [got] = scp.received()
        assert read_sop_uid(got) == uid
    finally:
        code = node.stop()
        scp.stop()
    assert "Traceback" not in node.log(), node.log()[-4000:]
    assert code in (0, None), f"node exited with {code}\n{node.log()[-4000:]}"
