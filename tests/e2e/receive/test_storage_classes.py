"""A router accepts what a PACS would: every standard storage class, and private ones unless told not to.

DCMTK 3.6.7's storescu refuses to send SOP classes its own dictionary lacks (Label Map Segmentation
is newer than it, a private class is unknown to it); with a configuration file (``-xf``) it proposes
whatever the profile lists, which is what a modality with a newer or private class does.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from helpers import PEER_ENV, dataset_bytes, dcmtk
from pynetdicom import AE, build_context

LABEL_MAP_SEG = "1.2.840.10008.5.1.4.1.1.66.7"
#: Under the project's own root: a private SOP class no standard will ever define.
PRIVATE_CLASS = "1.2.826.0.1.3680043.10.1431.99.1"
#: A query the node never answers (Query/Retrieve FIND is answered when [qr] is enabled).
WORKLIST_FIND = "1.2.840.10008.5.1.4.31"

#: Storage classes added to the standard in 2023-2025 (none is in pydicom 3.0's UID dictionary).
NEW_STANDARD_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.7": "Label Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.66.8": "Height Map Segmentation",
    "1.2.840.10008.5.1.4.1.1.6.3": "Photoacoustic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.7": "Dermoscopic Photography Image",
    "1.2.840.10008.5.1.4.1.1.77.1.8": "Confocal Microscopy Image",
    "1.2.840.10008.5.1.4.1.1.77.1.9": "Confocal Microscopy Tiled Pyramidal Image",
    "1.2.840.10008.5.1.4.1.1.77.1.5.8": "Ophthalmic OCT B-scan Volume Analysis",
    "1.2.840.10008.5.1.4.1.1.200.2": "CT Performed Procedure Protocol",
    "1.2.840.10008.5.1.4.1.1.200.8": "XA Performed Procedure Protocol",
    "1.2.840.10008.5.1.4.1.1.201.1": "Inventory",
}


def label_map_seg(source_dir: Path, out: Path) -> Path:
    """A LABELMAP Segmentation (two segments) of the real 4-slice CT, as the node's plugins make them."""
    sources = sorted((pydicom.dcmread(p) for p in source_dir.iterdir()), key=lambda d: float(d.ImagePositionPatient[2]))
    mask = np.zeros((len(sources), sources[0].Rows, sources[0].Columns), np.uint8)
    mask[:, 4:12, 4:12] = 1
    mask[1:3, 0:3, 0:3] = 2
    segments = [
        hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=f"region {i}",
            segmented_property_category=hd.sr.CodedConcept("91723000", "SCT", "Anatomical Structure"),
            segmented_property_type=hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i in (1, 2)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.LABELMAP,
        segment_descriptions=segments,
        series_instance_uid=hd.UID(),
        series_number=90,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="dicom-node tests",
        manufacturer_model_name="labelmap",
        software_versions="1",
        device_serial_number="1",
    )
    assert seg.SOPClassUID == LABEL_MAP_SEG
    seg.save_as(out)
    return out


def private_class_copy(source: Path, out: Path) -> Path:
    """A real CT slice relabelled with a private SOP class (vendors' private objects look like this)."""
    ds = pydicom.dcmread(source)
    ds.SOPClassUID = PRIVATE_CLASS
    ds.file_meta.MediaStorageSOPClassUID = PRIVATE_CLASS
    ds.save_as(out)
    return out


def scu_config(path: Path) -> Path:
    """A storescu profile proposing the Label Map SEG, the private class and a query (never storage)."""
    path.write_text(
        "[[TransferSyntaxes]]\n[Uncompressed]\nTransferSyntax1 = LittleEndianExplicit\n"
        "TransferSyntax2 = LittleEndianImplicit\n\n"
        "[[PresentationContexts]]\n[Contexts]\n"
        f"PresentationContext1 = {LABEL_MAP_SEG}\\Uncompressed\n"
        f"PresentationContext2 = {PRIVATE_CLASS}\\Uncompressed\n"
        f"PresentationContext3 = {WORKLIST_FIND}\\Uncompressed\n\n"
        "[[Profiles]]\n[Contexts]\nPresentationContexts = Contexts\n"
    )
    return path


@pytest.fixture
def files(shared_data: Path, tmp_path: Path) -> dict[str, Path]:
    ct2 = shared_data / "seg" / "ct2-source"
    return {
        "labelmap": label_map_seg(ct2, tmp_path / "labelmap.dcm"),
        "private": private_class_copy(sorted(ct2.iterdir())[0], tmp_path / "private.dcm"),
        "config": scu_config(tmp_path / "scu.cfg"),
    }


def send_with_profile(port: int, files: list[Path], config: Path) -> str:
    """storescu with the profile of ``config`` (-R cannot go with -xf); returns its output."""
    cmd = [
        dcmtk("storescu"),
        "-v",
        "-nh",
        "-aec",
        "DICOM_NODE",
        "-xf",
        str(config),
        "Contexts",
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    r = subprocess.run(cmd, capture_output=True, text=True, env=PEER_ENV, timeout=120)
    return f"exit {r.returncode}\n{r.stdout}{r.stderr}"


def store_responses(output: str) -> list[str]:
    return re.findall(r"Received Store Response \(([^)]*)\)", output)


def test_label_map_seg_and_private_class_stored_byte_identical_and_indexed(node, files):
    node.start()
    out = send_with_profile(node.port, [files["labelmap"], files["private"]], files["config"])
    assert out.startswith("exit 0") and store_responses(out) == ["Success", "Success"], out

    rows = {cls: path for cls, path in node.query("select sop_class_uid, file_path from instance")}
    assert set(rows) == {LABEL_MAP_SEG, PRIVATE_CLASS}
    assert dataset_bytes(node.data_dir / rows[LABEL_MAP_SEG]) == dataset_bytes(files["labelmap"])
    assert dataset_bytes(node.data_dir / rows[PRIVATE_CLASS]) == dataset_bytes(files["private"])
    log = node.log()
    # The private class is accepted on purpose, and the log says which class it was.
    assert re.search(
        rf"accepted presentation context \d+ for {re.escape(PRIVATE_CLASS)} \(not a standard SOP "
        r"class: private or unknown\) as a storage class",
        log,
    ), log[-3000:]
    # A query is never taken for a storage class, even with unknown classes accepted.
    assert re.search(
        rf"refused presentation context {re.escape(WORKLIST_FIND)} \(Modality Worklist Information Model - "
        r"FIND\).*not a storage service",
        log,
    ), log[-3000:]
    assert node.temp_files() == []


def test_private_class_refused_when_configured_standard_ones_still_taken(node, files):
    node.extra_config = "accept_unknown_sop_classes = false"
    node.start()
    out = send_with_profile(node.port, [files["labelmap"], files["private"]], files["config"])
    assert store_responses(out) == ["Success"], out  # the private one is not even sent: no context for it
    assert re.search(
        rf"no presentation context for.*{re.escape(str(files['private']))}|"
        rf"no presentation context for.*{re.escape(PRIVATE_CLASS)}",
        out,
        re.I | re.S,
    ), out
    assert [c for (c,) in node.query("select sop_class_uid from instance")] == [LABEL_MAP_SEG]
    assert re.search(
        rf"refused presentation context {re.escape(PRIVATE_CLASS)} .*node.accept_unknown_sop_classes "
        "is false",
        node.log(),
    ), node.log()[-3000:]


def test_storage_classes_of_2023_to_2025_accepted_at_negotiation(node):
    """Each class the standard added lately gets its presentation context accepted (pynetdicom as the SCU)."""
    node.extra_config = "accept_unknown_sop_classes = false"  # accepted because known, not as unknown
    node.start()
    ae = AE(ae_title="NEWCLASSES")
    contexts = [build_context(uid) for uid in NEW_STANDARD_CLASSES]
    assoc = ae.associate("127.0.0.1", node.port, contexts=contexts, ae_title="DICOM_NODE")
    try:
        assert assoc.is_established
        accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    finally:
        assoc.release()
    missing = {uid: name for uid, name in NEW_STANDARD_CLASSES.items() if uid not in accepted}
    assert not missing, f"refused: {missing}"
