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


def test_qr_responses_are_what_a_peer_reads():
    """Counts, Offending Element and the data set flag of C-FIND/C-MOVE/C-GET responses, read by pydicom."""
    raw = dimse.encode_response(
        dimse.C_MOVE_RSP,
        5,
        0xB000,
        "1.2.840.10008.5.1.4.1.2.2.2",
        error_comment="1 instance failed",
        remaining=0,
        completed=27,
        failed=1,
        warning=0,
        has_dataset=True,
    )
    ds = as_dataset(raw)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status, ds.CommandDataSetType) == (0x8021, 5, 0xB000, 0)
    counts = (
        ds.NumberOfRemainingSuboperations,
        ds.NumberOfCompletedSuboperations,
        ds.NumberOfFailedSuboperations,
        ds.NumberOfWarningSuboperations,
    )
    assert counts == (0, 27, 1, 0)
    assert ds.CommandGroupLength == len(raw) - 12
    cmd = dimse.decode_command(raw)
    assert (cmd.remaining, cmd.completed, cmd.failed, cmd.warning, cmd.has_dataset) == (0, 27, 1, 0, True)

    find = as_dataset(
        dimse.encode_response(dimse.C_FIND_RSP, 2, 0xA900, "1.2.840.10008.5.1.4.1.2.1.1", offending=[0x00100010])
    )
    assert (find.Status, find.OffendingElement, find.CommandDataSetType) == (0xA900, 0x00100010, 0x0101)
    assert "NumberOfRemainingSuboperations" not in find  # C-FIND responses carry no counts


def test_a_peers_c_move_rq_and_c_cancel_rq_decode():
    ds = Dataset()
    ds.AffectedSOPClassUID = "1.2.840.10008.5.1.4.1.2.2.2"
    ds.CommandField = 0x0021
    ds.MessageID = 11
    ds.MoveDestination = "STORESCP"
    ds.Priority = 0
    ds.CommandDataSetType = 0x0000
    cmd = dimse.decode_command(encode(ds, True, True))
    assert (cmd.command_field, cmd.message_id, cmd.move_destination, cmd.has_dataset) == (0x0021, 11, "STORESCP", True)
    cancel = Dataset()
    cancel.CommandField = 0x0FFF
    cancel.MessageIDBeingRespondedTo = 11
    cancel.CommandDataSetType = 0x0101
    mine = dimse.encode_c_cancel_rq(11)
    assert dimse.decode_command(encode(cancel, True, True)) == dimse.decode_command(mine)
    assert as_dataset(mine).CommandGroupLength == len(mine) - 12


def test_c_store_sub_operation_names_its_move_originator():
    ds = as_dataset(dimse.encode_c_store_rq(3, CT, "1.2.3.45", 0, "FINDSCU", 17))
    assert (ds.MoveOriginatorApplicationEntityTitle, ds.MoveOriginatorMessageID) == ("FINDSCU", 17)
    cmd = dimse.decode_command(dimse.encode_c_store_rq(3, CT, "1.2.3.45", 0, "FINDSCU", 17))
    assert (cmd.move_originator_ae, cmd.move_originator_id) == ("FINDSCU", 17)
    assert "MoveOriginatorMessageID" not in as_dataset(dimse.encode_c_store_rq(3, CT, "1.2.3.45"))


def test_dataset_offset_is_where_the_file_meta_ends():
    meta = dimse.encode_file_meta(CT, "1.2.3.45", "1.2.840.10008.1.2.1", "1.2.3.9", "NODE_1")
    assert dimse.dataset_offset(meta + b"\x08\x00", "f.dcm") == len(meta)
    with pytest.raises(ValueError, match="not-dicom.bin is not a DICOM file"):
        dimse.dataset_offset(b"\x00" * 200, "not-dicom.bin")
