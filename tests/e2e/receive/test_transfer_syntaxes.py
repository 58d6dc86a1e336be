"""Every real series and transfer-syntax file arrives byte-identical and indexed with the right attributes.

Two senders: DCMTK storescu (the bytes it actually sends are captured by
DCMTK storescp in bit-preserving mode, so "identical" means identical to what
went over the wire) and pynetdicom streaming the file as stored (so the
stored data set must equal the file's bytes after its File Meta).
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from helpers import PEER_ENV, dataset_bytes, dcmtk, free_port, read_sop_uid
from pydicom.filereader import read_file_meta_info

from node.send.scu import Peer, send_files

#: DCMTK 3.6.7 predates these transfer syntaxes; pynetdicom sends them.
DCMTK_UNKNOWN_TS = {"1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203"}


def real_files(shared: Path) -> list[Path]:
    files = [p for p in sorted((shared / "series").rglob("*")) if p.is_file() and p.name != "DIRFILE"]
    files += [p for p in sorted((shared / "transfer-syntaxes").rglob("*")) if p.is_file()]
    return files


def _profile(files: list[Path], path: Path) -> Path:
    """DCMTK association profiles: ``SCU`` proposes exactly each file's (SOP class, transfer
    syntax) as its own context; ``SCP`` accepts, per SOP class, all of those syntaxes."""
    pairs = sorted(
        {(str(m.MediaStorageSOPClassUID), str(m.TransferSyntaxUID)) for m in map(read_file_meta_info, files)}
    )
    tss = sorted({ts for _c, ts in pairs})
    classes = sorted({c for c, _ts in pairs})
    lines = ["[[TransferSyntaxes]]"]
    for i, ts in enumerate(tss):
        lines += [f"[TS{i}]", f"TransferSyntax1 = {ts}"]
    lines += ["[ALL]"] + [f"TransferSyntax{i + 1} = {ts}" for i, ts in enumerate(tss)]
    lines += ["[[PresentationContexts]]", "[PCS]"]
    for i, (cls, ts) in enumerate(pairs):
        lines.append(f"PresentationContext{i + 1} = {cls}\\TS{tss.index(ts)}")
    lines += ["[PCA]"] + [f"PresentationContext{i + 1} = {cls}\\ALL" for i, cls in enumerate(classes)]
    lines += ["[[Profiles]]", "[SCU]", "PresentationContexts = PCS", "[SCP]", "PresentationContexts = PCA"]
    path.write_text("\n".join(lines) + "\n")
    return path


def check_indexed(node, src: Path) -> None:
    ds = pydicom.dcmread(src, stop_before_pixels=True)
    rows = node.query(
        "select i.sop_class_uid, i.transfer_syntax_uid, i.rows, i.columns, i.number_of_frames, i.instance_number, "
        "s.series_instance_uid, s.modality, st.study_instance_uid, p.patient_id, p.patient_name, i.file_path "
        "from instance i join series s on i.series_fk = s.id join study st on s.study_fk = st.id "
        "join patient p on st.patient_fk = p.id where i.sop_instance_uid = ?",
        str(ds.SOPInstanceUID),
    )
    assert len(rows) == 1, f"{src.name} not indexed"
    row = rows[0]
    frames = ds.get("NumberOfFrames")
    expected = (
        str(ds.SOPClassUID),
        str(ds.file_meta.TransferSyntaxUID),
        ds.get("Rows"),
        ds.get("Columns"),
        int(frames) if frames not in (None, "") else None,
        int(ds.InstanceNumber) if ds.get("InstanceNumber") not in (None, "") else None,
        str(ds.get("SeriesInstanceUID", "")),
        str(ds.get("Modality", "")),
        str(ds.get("StudyInstanceUID", "")),
        str(ds.get("PatientID", "")),
        str(ds.get("PatientName", "")),
    )
    assert row[:11] == expected, f"{src.name}: index {row[:11]} != file {expected}"


def unique_uid_groups(files: list[Path]) -> list[list[Path]]:
    """Split files so no group holds one SOP Instance UID twice (one-mr-slice is one slice in 9 syntaxes)."""
    groups: list[list[Path]] = []
    seen: list[set[str]] = []
    for f in files:
        uid = read_sop_uid(f)
        for g, uids in zip(groups, seen, strict=True):
            if uid not in uids:
                g.append(f)
                uids.add(uid)
                break
        else:
            groups.append([f])
            seen.append({uid})
    return groups


def test_storescu_bytes_on_the_wire_are_stored(node, shared_data, tmp_path):
    files = [
        f for f in real_files(shared_data) if str(read_file_meta_info(f).TransferSyntaxUID) not in DCMTK_UNKNOWN_TS
    ]
    profile = _profile(files, tmp_path / "profile.cfg")
    node.extra_config = 'duplicates = "overwrite"\n'  # later groups re-send the same slice in another syntax
    node.start()
    for n, group in enumerate(unique_uid_groups(files)):
        reference = tmp_path / f"storescp{n}"
        reference.mkdir()
        port = free_port()
        scp = subprocess.Popen(
            [dcmtk("storescp"), "-xf", str(profile), "SCP", "+B", "-od", str(reference), str(port)],
            env=PEER_ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(0.5)
            sent = subprocess.run(
                [
                    dcmtk("storescu"),
                    "-xf",
                    str(profile),
                    "SCU",
                    "-aec",
                    "ANY",
                    "127.0.0.1",
                    str(port),
                    *map(str, group),
                ],
                env=PEER_ENV,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert sent.returncode == 0, sent.stderr
        finally:
            scp.terminate()
            out = scp.communicate(timeout=10)[0]
        assert len(list(reference.iterdir())) == len(group), out
        r = subprocess.run(
            [
                dcmtk("storescu"),
                "-xf",
                str(profile),
                "SCU",
                "-aec",
                "DICOM_NODE",
                "127.0.0.1",
                str(node.port),
                *map(str, group),
            ],
            env=PEER_ENV,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert r.returncode == 0, r.stderr
        stored = dict(node.query("select sop_instance_uid, file_path from instance"))
        for ref in reference.iterdir():
            uid = read_sop_uid(ref)
            assert dataset_bytes(node.data_dir / stored[uid]) == dataset_bytes(ref), f"{uid} differs from the wire"
        for f in group:
            check_indexed(node, f)


def test_pynetdicom_file_bytes_are_stored(node, shared_data):
    files = real_files(shared_data)
    node.extra_config = 'duplicates = "overwrite"\n'
    node.start()
    warnings = 0
    for group in unique_uid_groups(files):
        summary = send_files(Peer("127.0.0.1", node.port, "DICOM_NODE", "PYNETDICOM"), group)
        assert summary.failed == 0 and not summary.skipped, summary.errors
        assert summary.sent == len(group)
        warnings += summary.warnings
        stored = dict(node.query("select sop_instance_uid, file_path from instance"))
        for f in group:
            uid = read_sop_uid(f)
            assert dataset_bytes(node.data_dir / stored[uid]) == dataset_bytes(f), f"{f.name} differs"
            check_indexed(node, f)
    # Files without a Study Instance UID are stored with warning 0xB007, not lost.
    no_study = [f for f in files if "StudyInstanceUID" not in pydicom.dcmread(f, stop_before_pixels=True)]
    assert warnings == len(no_study) > 0


def test_stored_file_meta_names_the_node_and_sender(node, shared_data):
    f = shared_data / "series" / "ct-head-philips-5mm" / "I10"
    node.start()
    assert send_files(Peer("127.0.0.1", node.port, "DICOM_NODE", "MODALITY1"), [f]).sent == 1
    (path,) = node.query("select file_path from instance")[0]
    meta = read_file_meta_info(node.data_dir / path)
    assert meta.SourceApplicationEntityTitle == "MODALITY1"
    assert meta.ImplementationVersionName.startswith("DICOMNODE_")
    assert meta.MediaStorageSOPInstanceUID == read_sop_uid(f)
    assert pydicom.dcmread(node.data_dir / path).pixel_array.shape == (512, 512)


def test_directory_file_is_refused(node, shared_data):
    """A DICOMDIR (Media Storage Directory) is not an instance: it has no SOP Class UID in its data set.

    (`dicom-node send` leaves DICOMDIRs out; a sender that does send one, as here, gets 0xA900.)"""
    from helpers import raw_c_store

    dirfile = shared_data / "series" / "ct-head-philips-5mm" / "DIRFILE"
    meta = read_file_meta_info(dirfile)
    node.start()
    r = raw_c_store(
        node.port,
        str(meta.MediaStorageSOPClassUID),
        str(meta.TransferSyntaxUID),
        dataset_bytes(dirfile),
        sop_instance_uid=str(meta.MediaStorageSOPInstanceUID),
    )
    assert r.context_accepted and r.status == 0xA900, r
    assert node.query("select count(*) from instance") == [(0,)]


@pytest.mark.parametrize("uid", ["../../etc/passwd", "1.2.3/../../../x", "..", "/tmp/evil"])
def test_hostile_uids_stay_inside_data_dir(node, tmp_path, uid):
    from helpers import make_ct_series, raw_c_store

    src = make_ct_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(src)
    ds.SOPInstanceUID = uid
    ds.file_meta.MediaStorageSOPInstanceUID = uid
    ds.save_as(src)
    node.start()
    r = raw_c_store(node.port, str(ds.SOPClassUID), "1.2.840.10008.1.2.1", dataset_bytes(src), sop_instance_uid=uid)
    assert r.status == 0
    (path,) = node.query("select file_path from instance where sop_instance_uid = ?", uid)[0]
    stored = (node.data_dir / path).resolve()
    assert stored.is_relative_to((node.data_dir / "storage").resolve())
    assert ".." not in path and "/" + uid not in path
    assert dataset_bytes(stored) == dataset_bytes(src)
