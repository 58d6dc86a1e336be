"""A command plugin for the tests: builds a ready DICOM SEG of the input with highdicom (run with the node's python).

usage: make_seg.py INPUT OUTPUT [--other-series | --other-study | --without KEYWORD]
--other-series: the SEG references a series that is not the input (its sources get a new Series UID);
--other-study: the SEG belongs to another study;
--without KEYWORD: the SEG lacks that (top-level) attribute, e.g. a Type 1 one: an invalid object.
"""

import sys
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid


def main():
    inp, out = Path(sys.argv[1]), Path(sys.argv[2])
    flag = sys.argv[3] if len(sys.argv) > 3 else ""
    sources = [pydicom.dcmread(p) for p in sorted(inp.glob("*.dcm"))]
    if flag == "--other-series":
        uid = generate_uid()
        for ds in sources:
            ds.SeriesInstanceUID = uid
    mask = np.stack([ds.pixel_array > ds.pixel_array.mean() for ds in sources])
    desc = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="Bright",
        segmented_property_category=codes.SCT.Tissue,
        segmented_property_type=codes.SCT.Tissue,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name="make_seg", version="1", family=codes.cid7162.ArtificialIntelligence
        ),
    )
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[desc],
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="test",
        manufacturer_model_name="make_seg",
        software_versions="1",
        device_serial_number="1",
    )
    if flag == "--other-study":
        seg.StudyInstanceUID = generate_uid()
    if flag == "--without":
        del seg[sys.argv[4]]
    seg.save_as(out / "seg.dcm")
    print("wrote", out / "seg.dcm", mask.sum(), "voxels")


if __name__ == "__main__":
    main()
