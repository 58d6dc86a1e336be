"""Reading DICOM files (node.dicom.files): the header walker and the checks, on real files and damaged copies.

The damaged files are made from real ones (cut short, a VR overwritten, the File Meta stripped); each check
must refuse them with a reason that says what is wrong, and every intact file must read as pydicom reads it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.filereader import read_file_meta_info

from node.dicom.files import (
    KEYWORDS,
    DatasetHeaderView,
    RawHeaderView,
    Rejected,
    file_checksum,
    read_file_header,
    read_header,
)
from node.dicom.status import Status
from node.receive.rxfile import ReceivedFile

INTACT = [
    "transfer-syntaxes/misc/CT_small.dcm",  # explicit VR little endian
    "transfer-syntaxes/misc/emri_small_big_endian.dcm",
    "transfer-syntaxes/misc/JPEG2000.dcm",  # encapsulated
    "transfer-syntaxes/misc/eCT_Supplemental.dcm",  # enhanced multi-frame, deep sequences
    "transfer-syntaxes/misc/image_dfl.dcm",  # deflated: pydicom's reader
    "malformed/nested_priv_SQ.dcm",  # nested private sequences, empty UIDs: intact all the same
]
CT = "transfer-syntaxes/misc/CT_small.dcm"


def _dataset_offset(path: Path) -> int:
    meta = read_file_meta_info(path)
    return 132 + 12 + int(meta.FileMetaInformationGroupLength)


def _damaged(tmp_path: Path, data: bytes, name: str) -> Path:
    out = tmp_path / name
    out.write_bytes(data)
    return out


def _rejected(path: Path) -> Rejected:
    with pytest.raises(Rejected) as info:
        read_file_header(path)
    assert info.value.status == Status.CANNOT_UNDERSTAND
    return info.value


@pytest.mark.parametrize("name", INTACT)
def test_intact_files_read_as_pydicom_reads_them(shared_data: Path, name: str) -> None:
    path = shared_data / name
    header, size, meta = read_file_header(path)
    ds = dcmread(path, stop_before_pixels=True)
    assert size == path.stat().st_size
    assert header.transfer_syntax == meta.TransferSyntaxUID
    for keyword in ("SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "Modality"):
        assert header.text(keyword) == str(ds.get(keyword, "")).strip(), keyword
    for keyword in ("Rows", "Columns", "BitsAllocated"):
        assert header.int(keyword) == ds.get(keyword), keyword


def test_fast_and_general_readers_agree(shared_data: Path) -> None:
    """The byte walker (used for speed) and pydicom's reader (used for what the walker declines) read the same values."""
    path = shared_data / CT
    fast, size, meta = read_file_header(path)
    assert isinstance(fast, RawHeaderView)
    general = DatasetHeaderView(dcmread(path, stop_before_pixels=True), meta.TransferSyntaxUID)
    for keyword in KEYWORDS:
        assert fast.text(keyword) == general.text(keyword), keyword
        assert fast.int(keyword) == general.int(keyword), keyword


def test_deflated_file_is_read_by_the_general_reader(shared_data: Path) -> None:
    header, _, _ = read_file_header(shared_data / "transfer-syntaxes/misc/image_dfl.dcm")
    assert isinstance(header, DatasetHeaderView)


def test_a_data_set_cut_anywhere_inside_an_element_is_refused(shared_data: Path, tmp_path: Path) -> None:
    """Cut inside an element header or value, the data set is refused as truncated; pydicom alone would
    take several of these cuts (it stops quietly at a short header, and decodes a short Specific Character Set)."""
    source = shared_data / CT
    data = source.read_bytes()
    start = _dataset_offset(source)
    for cut in (start + 12, start + 20, start + 301, start + 310):  # value, header, header, value
        reason = _rejected(_damaged(tmp_path, data[:cut], f"cut-{cut}.dcm")).reason
        assert "truncated" in reason and "ends inside" in reason, (cut, reason)


def test_pixel_data_cut_short_is_refused_with_both_lengths(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / CT
    data = source.read_bytes()
    cut = data.find(b"\xe0\x7f\x10\x00") + 12 + 1000  # Pixel Data header (OW: 12 bytes) + 1000 bytes of it
    reason = _rejected(_damaged(tmp_path, data[:cut], "short-pixels.dcm")).reason
    assert reason == "Pixel Data says 32768 bytes but the data set ends 1000 bytes after it starts"


def test_native_pixel_data_shorter_than_the_image_is_refused(shared_data: Path) -> None:
    reason = _rejected(shared_data / "malformed/MR_truncated.dcm").reason
    assert "the data set ends" in reason or "the image is truncated" in reason


def test_encapsulated_pixel_data_without_its_delimiter_is_refused(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / "transfer-syntaxes/misc/JPEG2000.dcm"
    reason = _rejected(_damaged(tmp_path, source.read_bytes()[:-8], "no-delimiter.dcm")).reason
    assert "without a sequence delimiter" in reason


def test_a_bad_vr_where_explicit_vr_is_required_is_refused(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / CT
    data = bytearray(source.read_bytes())
    start = _dataset_offset(source)
    data[start + 4 : start + 6] = b"\x00\x00"  # the first element's VR
    _rejected(_damaged(tmp_path, bytes(data), "bad-vr.dcm"))


def test_implicit_vr_data_under_an_explicit_syntax_is_refused(shared_data: Path) -> None:
    reason = _rejected(shared_data / "malformed/SC_rgb_jpeg.dcm").reason
    assert "is not encoded in explicit VR" in reason


def test_an_unknown_vr_inside_the_data_set_is_judged_by_the_general_reader(shared_data: Path, tmp_path: Path) -> None:
    """A VR the walker does not know hands the file to pydicom, which reads it; nothing is lost."""
    source = shared_data / CT
    data = bytearray(source.read_bytes())
    at = data.find(b"\x08\x00\x60\x00CS")  # Modality
    data[at + 4 : at + 6] = b"ZZ"
    header, _, _ = read_file_header(_damaged(tmp_path, bytes(data), "unknown-vr.dcm"))
    assert isinstance(header, DatasetHeaderView)
    assert header.text("SOPInstanceUID") == "1.3.6.1.4.1.5962.1.1.1.1.1.20040119072730.12322"


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("malformed/no_meta.dcm", "no File Meta Information"),
        ("malformed/meta_missing_tsyntax.dcm", "the File Meta has no Transfer Syntax UID (0002,0010)"),
    ],
)
def test_files_without_usable_file_meta_are_refused_with_the_reason(shared_data: Path, name: str, reason: str) -> None:
    assert reason in _rejected(shared_data / name).reason


def test_a_transfer_syntax_nobody_knows_is_refused(shared_data: Path, tmp_path: Path) -> None:
    """(Deflated Image Frame Compression itself becomes known once pynetdicom is imported: a UID nobody knows.)"""
    data = (shared_data / "malformed/liver_deflate.dcm").read_bytes()
    assert data.count(b"1.2.840.10008.1.2.8.1") == 1
    unknown = _damaged(tmp_path, data.replace(b"1.2.840.10008.1.2.8.1", b"1.2.840.99999.1.2.8.1"), "unknown-ts.dcm")
    assert "transfer syntax 1.2.840.99999.1.2.8.1 is not one this node can read" in _rejected(unknown).reason


def test_file_meta_stripped_from_a_real_file_is_refused(shared_data: Path, tmp_path: Path) -> None:
    source = shared_data / CT
    stripped = source.read_bytes()[_dataset_offset(source) :]
    assert "no File Meta Information" in _rejected(_damaged(tmp_path, stripped, "bare.dcm")).reason


def test_file_meta_elements_inside_the_data_set_are_refused(shared_data: Path, tmp_path: Path) -> None:
    """Group 0002 in the data set would be taken for the file's own File Meta by readers."""
    source = shared_data / CT
    data = source.read_bytes()
    start = _dataset_offset(source)
    uid = b"1.2.3\x00"
    element = b"\x02\x00\x03\x00UI" + len(uid).to_bytes(2, "little") + uid  # (0002,0003) in the data set
    damaged = _damaged(tmp_path, data[:start] + element + data[start:], "group2.dcm")
    assert "File Meta elements (group 0002)" in _rejected(damaged).reason


def test_the_head_in_memory_gives_the_same_answer_as_the_file(shared_data: Path) -> None:
    """Receiving passes the first bytes it kept; a head shorter than the header falls back to the file."""
    path = shared_data / "transfer-syntaxes/misc/eCT_Supplemental.dcm"
    data = path.read_bytes()
    meta = read_file_meta_info(path)
    offset, size = _dataset_offset(path), len(data)
    whole = read_header(str(path), meta.TransferSyntaxUID, size, offset)
    for head in (data[: offset + 64], data[:65536]):
        got = read_header(str(path), meta.TransferSyntaxUID, size, offset, head=head)
        assert [got.text(k) for k in KEYWORDS] == [whole.text(k) for k in KEYWORDS]


def test_file_checksum_matches_what_receiving_records(shared_data: Path, tmp_path: Path) -> None:
    """Recovery and the output store checksum files on disk; it must equal the one computed while receiving."""
    data = (shared_data / CT).read_bytes()
    rx = ReceivedFile(tmp_path)
    for at in range(0, len(data), 7000):
        rx.write(data[at : at + 7000])
    rx.close()
    assert file_checksum(Path(rx.name)) == rx.checksum()
    assert rx.checksum().startswith("xxh3_128:")
    rx.discard()


@pytest.mark.parametrize("padding", [b"\x00", b"\x00\x00", b"\x00" * 4, b"  \x00", b"\x00" * 7])
def test_padding_after_the_last_element_is_not_a_truncation(shared_data: Path, tmp_path: Path, padding: bytes) -> None:
    """An object without Pixel Data (as an SR or a KOS is) that a sender padded after its last element is stored:
    refusing it (0xC000, a permanent failure) would lose it. Bytes that are not padding are still a cut."""
    ds = dcmread(shared_data / CT)
    del ds.PixelData
    plain = tmp_path / "no-pixels.dcm"
    ds.save_as(plain, enforce_file_format=True)
    padded = _damaged(tmp_path, plain.read_bytes() + padding, "padded.dcm")
    header, _, _ = read_file_header(padded)
    assert header.text("SOPInstanceUID") == ds.SOPInstanceUID
    cut = _damaged(tmp_path, plain.read_bytes() + b"\x10\x00\x10", "cut.dcm")
    assert "truncated" in _rejected(cut).reason
