"""Regressions found in review: each would have filed, stored or aborted something wrongly."""

from __future__ import annotations

import datetime as dt

import pydicom
from helpers import dataset_bytes, make_ct_series, raw_c_store
from pydicom.dataset import Dataset

from node.index.db import make_engine, migrate
from node.index.records import InstanceRecord, Recorder
from node.index.writer import IndexWriter

MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"


def _record(n: int, patient: str, study: str) -> InstanceRecord:
    return InstanceRecord(
        patient={
            "patient_id": patient,
            "issuer_of_patient_id": "",
            "patient_name": patient,
            "birth_date": "",
            "sex": "",
        },
        study={
            "study_instance_uid": study,
            "study_date": "",
            "study_time": "",
            "accession_number": "",
            "study_id": "",
            "study_description": "",
            "referring_physician_name": "",
        },
        series={
            "series_instance_uid": study + ".1",
            "modality": "CT",
            "series_number": 1,
            "series_description": "",
            "body_part_examined": "",
            "protocol_name": "",
            "manufacturer": "",
            "station_name": "",
            "frame_of_reference_uid": "",
            "series_date": "",
            "series_time": "",
        },
        instance={
            "sop_instance_uid": f"I-{n}",
            "sop_class_uid": CT,
            "transfer_syntax_uid": "1.2.840.10008.1.2.1",
            "instance_number": n,
            "acquisition_number": None,
            "image_type": "",
            "rows": None,
            "columns": None,
            "number_of_frames": None,
            "bits_allocated": None,
            "photometric_interpretation": "",
            "image_position_patient": "",
            "image_orientation_patient": "",
            "pixel_spacing": "",
            "slice_thickness": None,
            "slice_location": None,
            "file_path": f"p/{n}",
            "file_size": 1,
            "checksum": "x",
            "calling_ae": "",
            "called_ae": "",
            "peer_address": "",
            "association_id": "",
        },
        received_at=dt.datetime.now(dt.UTC),
    )


def test_a_failed_item_does_not_leave_stale_ids_for_the_rest_of_its_batch(tmp_path):
    engine = make_engine(f"sqlite:///{tmp_path / 'index.sqlite'}")
    migrate(engine)
    recorder = Recorder("keep_first")
    writer = IndexWriter(engine)

    def failing(tx):
        recorder.record(tx, _record(1, "ALICE", "STUDY-1"))
        raise ValueError("this item fails after creating its parent rows")

    # Queued before the writer starts, so all three land in one transaction.
    f1 = writer.submit(failing)
    f2 = writer.submit(lambda tx: recorder.record(tx, _record(2, "BOB", "STUDY-2")))
    f3 = writer.submit(lambda tx: recorder.record(tx, _record(3, "ALICE", "STUDY-1")))
    writer.start()
    assert isinstance(f1.exception(timeout=30), ValueError)
    assert f2.result(timeout=30).kind == f3.result(timeout=30).kind == "new"
    writer.stop()
    with engine.connect() as c:
        rows = c.exec_driver_sql(
            "select i.sop_instance_uid, st.study_instance_uid, p.patient_name from instance i "
            "join series s on i.series_fk = s.id join study st on s.study_fk = st.id "
            "join patient p on st.patient_fk = p.id order by i.sop_instance_uid"
        ).all()
    engine.dispose()
    assert rows == [("I-2", "STUDY-2", "BOB"), ("I-3", "STUDY-1", "ALICE")]


def test_file_meta_elements_inside_the_data_set_are_refused(node, tmp_path):
    src = make_ct_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(src)
    # A data set carrying its own (0002,0010): stored as is, every reader would take it for the file's.
    body = Dataset()
    body.add_new(0x00020010, "UI", "1.2.840.10008.1.2.2")
    raw = body  # encoded below in explicit VR LE, then the real data set
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, raw)
    payload = buf.getvalue() + dataset_bytes(src)
    node.start()
    r = raw_c_store(node.port, CT, "1.2.840.10008.1.2.1", payload, sop_instance_uid=str(ds.SOPInstanceUID))
    assert r.status == 0xC000 and "group 0002" in r.error_comment
    assert node.query("select count(*) from instance") == [(0,)]


def test_sop_class_must_match_the_presentation_context(node, tmp_path):
    src = make_ct_series(tmp_path / "src", 1)[0]
    ds = pydicom.dcmread(src)
    node.start()
    r = raw_c_store(
        node.port,
        MR,
        "1.2.840.10008.1.2.1",
        dataset_bytes(src),
        sop_class_uid=CT,
        sop_instance_uid=str(ds.SOPInstanceUID),
    )
    assert r.status == 0x0122
    assert node.query("select count(*) from instance") == [(0,)]
    assert node.temp_files() == []


def test_non_ascii_uid_gets_an_answer_not_an_abort(node, tmp_path):
    src = make_ct_series(tmp_path / "src", 1)[0]
    node.start()
    r = raw_c_store(node.port, CT, "1.2.840.10008.1.2.1", dataset_bytes(src), sop_instance_uid="1.2.3.\u00e9")
    assert r.status == 0xA900, r
    assert "Traceback" not in node.log()
