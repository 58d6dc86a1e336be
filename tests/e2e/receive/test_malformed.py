"""Every broken file in shared/data/malformed gets the right answer, a log line, and leaves nothing behind.

DCMTK storescu refuses to send most of them (as a careful sender should), so
they are sent as raw P-DATA on the presentation context their File Meta
names; a less careful sender would do exactly that.
"""

from __future__ import annotations

from pathlib import Path

import pydicom
import pytest
from helpers import dataset_bytes, make_ct_series, raw_c_store, storescu

SUCCESS, CANNOT_UNDERSTAND, MISMATCH = 0x0000, 0xC000, 0xA900
REJECTED_CONTEXT = "context rejected"

# file -> (transfer syntax to send it with, expected answer, why)
EXPECTED = {
    "CTImageStorage_bad_meta.dcm": (None, SUCCESS, "only the File Meta lacks the SOP Class; the data set is fine"),
    "JPEG-lossy.dcm": (None, SUCCESS, "valid structure; the node stores compressed streams as sent, undecoded"),
    "JPEG2000-embedded-sequence-delimiter.dcm": (None, SUCCESS, "delimiter bytes inside a fragment are data"),
    "bad_sequence.dcm": (None, SUCCESS, "pydicom and DCMTK both read it; stored as sent"),
    "badVR.dcm": (None, SUCCESS, "odd values (IS '1A', long UI) are the sender's; pixel data is long enough"),
    "rtstruct.dcm": ("1.2.840.10008.1.2", SUCCESS, "no File Meta in the file, but a valid implicit VR data set"),
    "MR_truncated.dcm": (None, CANNOT_UNDERSTAND, "Pixel Data shorter than its declared length"),
    "rtplan_truncated.dcm": (None, CANNOT_UNDERSTAND, "the data set ends inside an element"),
    "emri_small_jpeg_2k_lossless_too_short.dcm": (None, CANNOT_UNDERSTAND, "encapsulated Pixel Data cut short"),
    "SC_rgb_jpeg.dcm": (None, CANNOT_UNDERSTAND, "implicit VR data under an explicit VR transfer syntax"),
    "no_meta.dcm": ("1.2.840.10008.1.2.1", CANNOT_UNDERSTAND, "not parseable as the negotiated syntax"),
    "meta_missing_tsyntax.dcm": ("1.2.840.10008.1.2", MISMATCH, "the data set has no SOP Class/Instance UID"),
    "nested_priv_SQ.dcm": (None, MISMATCH, "the data set has no SOP Class/Instance UID"),
    "liver_deflate.dcm": (None, REJECTED_CONTEXT, "transfer syntax 1.2.840.10008.1.2.8.1 unknown to pydicom 3.0"),
}


def _identity(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
    meta = getattr(ds, "file_meta", None) or {}
    ts = str(meta.get("TransferSyntaxUID", "") or "1.2.840.10008.1.2")
    sop_class = str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or "1.2.840.10008.5.1.4.1.1.7")
    sop_inst = str(ds.get("SOPInstanceUID", "") or meta.get("MediaStorageSOPInstanceUID", "") or "1.2.826.0.1.99.1")
    return ts, sop_class, sop_inst


def test_every_malformed_file_is_listed(shared_data: Path):
    assert sorted(p.name for p in (shared_data / "malformed").iterdir()) == sorted(EXPECTED)


@pytest.fixture(scope="module")
def malformed_results(tmp_path_factory, shared_data):
    from helpers import NodeProcess

    node = NodeProcess(tmp_path_factory.mktemp("malformed") / "node").start()
    results = {}
    try:
        for name, (ts_override, _expected, _why) in EXPECTED.items():
            path = shared_data / "malformed" / name
            ts, sop_class, sop_inst = _identity(path)
            ts = ts_override or ts
            r = raw_c_store(node.port, sop_class, ts, dataset_bytes(path), sop_instance_uid=sop_inst)
            results[name] = (r, sop_inst, path)
        # The node is still serving everyone else afterwards.
        good = make_ct_series(node.root / "good", 3)
        after = storescu(node.port, good)
        yield node, results, after
    finally:
        node.stop()


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_malformed_answer(malformed_results, name):
    node, results, _after = malformed_results
    r, sop_inst, path = results[name]
    _ts, expected, why = EXPECTED[name]
    rows = node.query("select file_path from instance where sop_instance_uid = ?", sop_inst)
    if expected == REJECTED_CONTEXT:
        assert not r.context_accepted, why
        assert rows == []
        return
    assert r.context_accepted
    assert r.status == expected, f"{name}: got 0x{r.status:04X} {r.error_comment!r}, expected 0x{expected:04X}: {why}"
    if expected == SUCCESS:
        assert len(rows) == 1
        stored = node.data_dir / rows[0][0]
        assert dataset_bytes(stored) == dataset_bytes(path)
    else:
        assert r.error_comment, "a failure carries an Error Comment saying why"
        assert rows == [], "no row for a refused instance"
        assert f"0x{expected:04X}" in node.log() and sop_inst in node.log(), "the log says what was refused and why"


def test_nothing_partial_left_and_node_keeps_serving(malformed_results):
    node, results, after = malformed_results
    assert after.returncode == 0, after.stderr
    assert node.temp_files() == []
    n_success = sum(1 for r, *_ in results.values() if r.status == SUCCESS)
    (n_rows,) = node.query("select count(*) from instance")[0]
    assert n_rows == n_success + 3
    assert len(node.stored_files()) == n_rows, "every stored file has its row and no refused file stays"
    assert "Traceback" not in node.log()


def test_storescu_sends_what_it_can(node, shared_data):
    """The files DCMTK itself agrees to send arrive byte-identical (same answer as the raw sender)."""
    node.start()
    files = [shared_data / "malformed" / n for n in ("CTImageStorage_bad_meta.dcm", "badVR.dcm")]
    r = storescu(node.port, files)
    assert r.returncode == 0, r.stderr
    assert node.query("select count(*) from instance")[0][0] == 2
