"""The DIMSE command sets both roles need (PS3.7 9.3, 10.3, E.1), done directly on bytes.

Command sets are always Implicit VR Little Endian group 0000 elements
(PS3.7 6.3.1): the acceptor reads C-ECHO, C-STORE, N-EVENT-REPORT, C-FIND,
C-MOVE, C-GET and C-CANCEL requests and writes their responses (and, for
C-GET, writes C-STORE sub-operation requests and reads their responses); the
requestor writes C-ECHO, C-STORE and N-ACTION requests and reads the responses. Building a pydicom Dataset for each (as a
general toolkit must) cost more than a millisecond per instance; these
functions cost microseconds. The File Meta written in front of each stored
data set is encoded here too, for the same reason.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from dataclasses import dataclass

# Command Field values (PS3.7 E.1)
C_STORE_RQ = 0x0001
C_STORE_RSP = 0x8001
C_ECHO_RQ = 0x0030
C_ECHO_RSP = 0x8030
C_CANCEL_RQ = 0x0FFF
C_FIND_RQ = 0x0020
C_FIND_RSP = 0x8020
C_GET_RQ = 0x0010
C_GET_RSP = 0x8010
C_MOVE_RQ = 0x0021
C_MOVE_RSP = 0x8021
N_EVENT_REPORT_RQ = 0x0100
N_EVENT_REPORT_RSP = 0x8100
N_ACTION_RQ = 0x0130
N_ACTION_RSP = 0x8130
NO_DATASET = 0x0101
HAS_DATASET = 0x0000

_ELEM = struct.Struct("<HHL")


class CommandError(ValueError):
    """The command set cannot be decoded."""


@dataclass(slots=True)
class Command:
    command_field: int
    message_id: int
    has_dataset: bool
    affected_sop_class_uid: str = ""
    affected_sop_instance_uid: str = ""
    priority: int = 0
    #: C-MOVE-RQ's Move Destination (0000,0600).
    move_destination: str = ""
    #: C-STORE-RQ sub-operations of a C-MOVE: Move Originator AE Title and Message ID (0000,1030/1031).
    move_originator_ae: str = ""
    move_originator_id: int | None = None
    #: N-EVENT-REPORT's Event Type ID (0000,1002).
    event_type_id: int = 0
    #: In responses: Message ID Being Responded To, Status and Error Comment.
    responding_to: int = 0
    status: int | None = None
    error_comment: str = ""
    #: C-FIND/C-MOVE/C-GET responses: Number of Remaining/Completed/Failed/Warning Sub-operations.
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None


def _us_or_none(fields: dict[int, bytes], elem: int) -> int | None:
    value = fields.get(elem)
    return int.from_bytes(value[:2], "little") if value is not None and len(value) >= 2 else None


def _counts(fields: dict[int, bytes]) -> dict[str, int | None]:
    """A C-MOVE/C-GET response's sub-operation counts (looked up only when there are some: C-STORE's path
    stays as short as it was)."""
    return {
        "remaining": _us_or_none(fields, 0x1020),
        "completed": _us_or_none(fields, 0x1021),
        "failed": _us_or_none(fields, 0x1022),
        "warning": _us_or_none(fields, 0x1023),
    }


def _uid(value: bytes) -> str:
    return value.rstrip(b"\x00 ").decode("ascii", "replace").strip()


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    """Decode the command set elements an SCP needs; others are skipped."""
    view = memoryview(data)
    n = len(view)
    pos = 0
    fields: dict[int, bytes] = {}
    while pos < n:
        if pos + 8 > n:
            raise CommandError(f"command set truncated at byte {pos}")
        group, elem, length = _ELEM.unpack_from(view, pos)
        pos += 8
        if group != 0x0000:
            raise CommandError(f"element ({group:04X},{elem:04X}) in a command set")
        if length == 0xFFFFFFFF or pos + length > n:
            raise CommandError(f"element (0000,{elem:04X}) has an impossible length {length}")
        fields[elem] = bytes(view[pos : pos + length])
        pos += length
    try:
        command_field = int.from_bytes(fields[0x0100][:2], "little")
        data_set_type = int.from_bytes(fields[0x0800][:2], "little")
    except KeyError as e:
        raise CommandError(f"command set has no (0000,{e.args[0]:04X})") from None
    message_id = int.from_bytes(fields.get(0x0110, b"\0\0")[:2], "little")
    return Command(
        command_field=command_field,
        message_id=message_id,
        has_dataset=data_set_type != NO_DATASET,
        affected_sop_class_uid=_uid(fields.get(0x0002, b"")),
        affected_sop_instance_uid=_uid(fields.get(0x1000, b"")),
        priority=int.from_bytes(fields.get(0x0700, b"\0\0")[:2], "little"),
        move_destination=fields.get(0x0600, b"").decode("ascii", "replace").strip(" \x00"),
        move_originator_ae=fields.get(0x1030, b"").decode("ascii", "replace").strip(" \x00"),
        move_originator_id=_us_or_none(fields, 0x1031) if 0x1031 in fields else None,
        event_type_id=int.from_bytes(fields.get(0x1002, b"\0\0")[:2], "little"),
        responding_to=int.from_bytes(fields.get(0x0120, b"\0\0")[:2], "little"),
        status=int.from_bytes(fields[0x0900][:2], "little") if 0x0900 in fields else None,
        error_comment=fields.get(0x0902, b"").decode("ascii", "replace").strip(" \x00"),
        **(_counts(fields) if 0x1021 in fields or 0x1020 in fields else {}),
    )


def _elem(elem: int, value: bytes) -> bytes:
    return _ELEM.pack(0x0000, elem, len(value)) + value


def _ui(value: str) -> bytes:
    b = value.encode("ascii", "replace")  # a peer's non-ASCII UID must not break our answer
    return b + b"\x00" if len(b) % 2 else b


def _text(value: str) -> bytes:
    b = value.encode("ascii", "replace")
    return b + b" " if len(b) % 2 else b


def _us(value: int) -> bytes:
    return value.to_bytes(2, "little")


def _ae_value(value: str) -> bytes:
    return _text(value.strip()[:16])


def encode_response(
    command_field: int,
    message_id: int,
    status: int,
    sop_class_uid: str,
    sop_instance_uid: str = "",
    error_comment: str = "",
    event_type_id: int | None = None,
    *,
    remaining: int | None = None,
    completed: int | None = None,
    failed: int | None = None,
    warning: int | None = None,
    offending: tuple[int, ...] | list[int] = (),
    has_dataset: bool = False,
) -> bytes:
    """A response command set, group length first: C-STORE, C-ECHO, N-EVENT-REPORT, and C-FIND, C-MOVE,
    C-GET with their sub-operation counts (0000,1020-1023), Offending Element (0000,0901: tags as
    ``0xGGGGEEEE``) and, for a pending C-FIND or a final with a Failed SOP Instance UID List, a data set."""
    body = [
        _elem(0x0002, _ui(sop_class_uid)),
        _elem(0x0100, _us(command_field)),
        _elem(0x0120, _us(message_id)),
        _elem(0x0800, _us(HAS_DATASET if has_dataset else NO_DATASET)),
        _elem(0x0900, _us(status)),
    ]
    if offending:
        body.append(_elem(0x0901, b"".join(struct.pack("<HH", t >> 16, t & 0xFFFF) for t in offending)))
    if error_comment:
        body.append(_elem(0x0902, _text(error_comment[:64])))
    if sop_instance_uid:
        body.append(_elem(0x1000, _ui(sop_instance_uid)))
    if event_type_id is not None:
        body.append(_elem(0x1002, _us(event_type_id)))
    if remaining is not None or completed is not None or failed is not None or warning is not None:
        for elem, count in ((0x1020, remaining), (0x1021, completed), (0x1022, failed), (0x1023, warning)):
            if count is not None:
                body.append(_elem(elem, _us(min(count, 0xFFFF))))
    rest = b"".join(body)
    return _elem(0x0000, len(rest).to_bytes(4, "little")) + rest


def _group(body: list[bytes]) -> bytes:
    rest = b"".join(body)
    return _elem(0x0000, len(rest).to_bytes(4, "little")) + rest


def encode_c_store_rq(
    message_id: int,
    sop_class_uid: str,
    sop_instance_uid: str,
    priority: int = 0,
    move_originator_ae: str = "",
    move_originator_id: int | None = None,
) -> bytes:
    """A C-STORE-RQ command set (a data set follows); a C-MOVE's sub-operation names its originator."""
    body = [
        _elem(0x0002, _ui(sop_class_uid)),
        _elem(0x0100, _us(C_STORE_RQ)),
        _elem(0x0110, _us(message_id)),
        _elem(0x0700, _us(priority)),
        _elem(0x0800, _us(HAS_DATASET)),
        _elem(0x1000, _ui(sop_instance_uid)),
    ]
    if move_originator_ae.strip():
        body.append(_elem(0x1030, _ae_value(move_originator_ae)))
    if move_originator_id is not None:
        body.append(_elem(0x1031, _us(move_originator_id)))
    return _group(body)


def encode_c_cancel_rq(message_id_being_responded_to: int) -> bytes:
    """A C-CANCEL-RQ command set (PS3.7 9.3.2.3) for the C-FIND, C-GET or C-MOVE with that Message ID."""
    return _group(
        [
            _elem(0x0100, _us(C_CANCEL_RQ)),
            _elem(0x0120, _us(message_id_being_responded_to)),
            _elem(0x0800, _us(NO_DATASET)),
        ]
    )


#: The Verification SOP Class (C-ECHO).
VERIFICATION = "1.2.840.10008.1.1"


def encode_c_echo_rq(message_id: int) -> bytes:
    return _group(
        [
            _elem(0x0002, _ui(VERIFICATION)),
            _elem(0x0100, _us(C_ECHO_RQ)),
            _elem(0x0110, _us(message_id)),
            _elem(0x0800, _us(NO_DATASET)),
        ]
    )


def encode_n_action_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str, action_type_id: int) -> bytes:
    """An N-ACTION-RQ command set (an action information data set follows)."""
    return _group(
        [
            _elem(0x0003, _ui(sop_class_uid)),
            _elem(0x0100, _us(N_ACTION_RQ)),
            _elem(0x0110, _us(message_id)),
            _elem(0x0800, _us(HAS_DATASET)),
            _elem(0x1001, _ui(sop_instance_uid)),
            _elem(0x1008, _us(action_type_id)),
        ]
    )


def encode_file_meta(
    sop_class_uid: str,
    sop_instance_uid: str,
    transfer_syntax: str,
    implementation_class_uid: str,
    implementation_version: str,
    source_ae: str = "",
) -> bytes:
    """Preamble, ``DICM`` and an Explicit VR Little Endian File Meta group (PS3.10 7.1)."""

    def short(elem: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    items = [
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\x00\x01",
        short(0x0002, b"UI", _ui(sop_class_uid)),
        short(0x0003, b"UI", _ui(sop_instance_uid)),
        short(0x0010, b"UI", _ui(transfer_syntax)),
        short(0x0012, b"UI", _ui(implementation_class_uid)),
        short(0x0013, b"SH", _text(implementation_version)),
    ]
    if source_ae.strip():
        items.append(short(0x0016, b"AE", _text(source_ae.strip())))
    group = b"".join(items)
    return b"\x00" * 128 + b"DICM" + short(0x0000, b"UL", len(group).to_bytes(4, "little")) + group


def dataset_offset(head: bytes, name: str) -> int:
    """Where a Part 10 file's data set starts (after the File Meta group), from its first 144 bytes."""
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise ValueError(f"{name} is not a DICOM file with a File Meta group")
    return 144 + int.from_bytes(head[140:144], "little")


# -- result identifiers -------------------------------------------------------------------------------

#: One data set element to write: (tag, VR, value). Value None, "" or [] = zero length; a str (UTF-8: the
#: data set's Specific Character Set must be ISO_IR 192), a list of str (values joined by backslashes), an
#: int (IS as text; US/SS/UL/SL binary). A SQ is written empty.
Element = tuple[int, str, "str | int | list[str] | None"]

_LONG_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"})
_BINARY_VRS = {"US": "<H", "SS": "<h", "UL": "<L", "SL": "<l"}
_EXPLICIT = struct.Struct("<HH2sH")
_EXPLICIT_LONG = struct.Struct("<HH2s2xL")
_IMPLICIT = struct.Struct("<HHL")


def encode_identifier(elements: Iterable[Element], implicit: bool) -> bytes:
    """A data set of plain elements in Implicit or Explicit VR Little Endian, in the order given (ascending tags).

    What a C-FIND answers per match: a handful of text values from the index. pydicom's writer (through a
    Dataset per match) cost about 200 us per result; this costs a few. Text is padded to even length
    (UI with a NUL, others with a space), as PS3.5 6.2 asks.
    """
    out: list[bytes] = []
    for tag, vr, value in elements:
        if value is None or value == "" or value == [] or vr == "SQ":
            data = b""
        elif vr in _BINARY_VRS:
            data = struct.pack(_BINARY_VRS[vr], int(value))  # type: ignore[arg-type]
        else:
            text = "\\".join(value) if isinstance(value, list) else str(value)
            data = text.encode("utf-8")
            if len(data) % 2:
                data += b"\x00" if vr == "UI" else b" "
        group, elem = tag >> 16, tag & 0xFFFF
        if implicit:
            out.append(_IMPLICIT.pack(group, elem, len(data)))
        elif vr in _LONG_VRS:
            out.append(_EXPLICIT_LONG.pack(group, elem, vr.encode("ascii"), len(data)))
        elif len(data) > 0xFFFF:
            raise ValueError(f"({group:04X},{elem:04X}) {vr}: {len(data)} bytes do not fit a 2-byte length")
        else:
            out.append(_EXPLICIT.pack(group, elem, vr.encode("ascii"), len(data)))
        out.append(data)
    return b"".join(out)
