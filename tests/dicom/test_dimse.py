"""DIMSE command sets: ours read as pynetdicom reads them, and pynetdicom's (as a peer sends them) read by ours."""

from __future__ import annotations

from io import BytesIO

import pytest
from pydicom.dataset import Dataset
from pydicom.filereader import dcmread, read_dataset
from pynetdicom.dsutils import encode

from node.dicom import dimse

CT = "1.2.840.10008.5.1.4.1.1.2"


def as_dataset(command: bytes) -> Dataset:
    return read_dataset(BytesIO(command), is_implicit_VR=True, is_little_endian=True)


def test_c_store_rq_is_what_a_peer_reads():
    ds = as_dataset(dimse.encode_c_store_rq(7, CT, "1.2.3.45", priority=2))
    assert (ds.CommandField, ds.MessageID, ds.Priority, ds.CommandDataSetType) == (0x0001, 7, 2, 0x0000)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT, "1.2.3.45")
    assert ds.CommandGroupLength == len(dimse.encode_c_store_rq(7, CT, "1.2.3.45", priority=2)) - 12


def test_a_peers_c_store_rsp_decodes():
    ds = Dataset()
    ds.AffectedSOPClassUID = CT
    ds.CommandField = 0x8001
    ds.MessageIDBeingRespondedTo = 7
    ds.CommandDataSetType = 0x0101
    ds.Status = 0xB007
    ds.ErrorComment = "not quite a CT"
    ds.AffectedSOPInstanceUID = "1.2.3.45"
    cmd = dimse.decode_command(encode(ds, True, True))
    assert (cmd.command_field, cmd.responding_to, cmd.status, cmd.has_dataset) == (0x8001, 7, 0xB007, False)
    assert (cmd.error_comment, cmd.affected_sop_instance_uid) == ("not quite a CT", "1.2.3.45")


def test_responses_and_requests_round_trip():
    rsp = dimse.decode_command(
        dimse.encode_response(dimse.N_EVENT_REPORT_RSP, 3, 0x0000, "1.2.840.10008.1.20.1", "1.2.3", event_type_id=2)
    )
    assert (rsp.command_field, rsp.responding_to, rsp.status, rsp.event_type_id) == (0x8100, 3, 0, 2)
    echo = dimse.decode_command(dimse.encode_c_echo_rq(9))
    assert (echo.command_field, echo.message_id, echo.has_dataset) == (dimse.C_ECHO_RQ, 9, False)
    action = as_dataset(dimse.encode_n_action_rq(4, "1.2.840.10008.1.20.1", "1.2.840.10008.1.20.1.1", 1))
    assert (action.RequestedSOPInstanceUID, action.ActionTypeID) == ("1.2.840.10008.1.20.1.1", 1)


@pytest.mark.parametrize(
    "data, match",
    [
        (dimse.encode_c_echo_rq(1)[:-3], "truncated|impossible length"),
        (b"\x08\x00\x16\x00\x02\x00\x00\x00ab", r"element \(0008,0016\) in a command set"),
        (b"\x00\x00\x10\x01\x02\x00\x00\x00\x01\x00", r"no \(0000,0100\)"),
    ],
)
def test_broken_command_sets_are_errors(data, match):
    with pytest.raises(dimse.CommandError, match=match):
        dimse.decode_command(data)


def test_file_meta_reads_as_part_10():
    meta = dimse.encode_file_meta(CT, "1.2.3.45", "1.2.840.10008.1.2.1", "1.2.3.9", "NODE_1", "MODALITY")
    ds = dcmread(BytesIO(meta + b"\x08\x00\x18\x00UI\x08\x001.2.3.45"))
    fm = ds.file_meta
    assert (fm.MediaStorageSOPClassUID, fm.TransferSyntaxUID, fm.SourceApplicationEntityTitle) == (
        CT,
        "1.2.840.10008.1.2.1",
        "MODALITY",
    )
    assert ds.SOPInstanceUID == "1.2.3.45"
