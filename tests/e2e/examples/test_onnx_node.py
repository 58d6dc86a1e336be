"""The example ONNX model as an administrator would run it: a node, its own environment, Orthanc downstream.

The example package is installed in a venv with numpy 1 and pydicom 2 (the node runs numpy 2 and pydicom
3) and found there through its entry point. Three CT series arrive; one warm worker serves the three jobs
(its ``setup`` ran once), each multi-segment SEG reaches Orthanc exactly once, with the example's codes,
and its masks equal the numpy reference computed here.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest

from node.plugins.series import load_series
from tests.helpers import REPO, NodeProcess, storescu, wait_for
from tests.helpers.variants import make_files

EXAMPLE = REPO / "examples" / "onnx-organs"
#: Segment labels and their SNOMED CT types, as the example declares them.
SEGMENTS = {"Fat": "55603005", "Soft tissue": "87784001", "Bone": "3138006"}

pytestmark = pytest.mark.filterwarnings("ignore:.*unlikely to represent the intended person name:UserWarning")


def test_the_example_model_runs_warm_in_its_environment_and_its_segs_reach_orthanc(
    tmp_path: Path, onnx_python: Path, reference, module_orthanc
) -> None:
    orthanc = module_orthanc
    model = tmp_path / "models" / "tissue.onnx"
    node = NodeProcess(
        tmp_path / "node",
        extra_config=f"""
[tracker]
stable_after = 1
[plugins.environments.onnx]
python = "{onnx_python}"
env = {{ DICOM_NODE_ONNX_TISSUE_MODEL = "{model}" }}
{orthanc.destination("orthanc")}
[[rules]]
name = "tissue"
match = {{ Modality = "CT" }}
actions = [{{ type = "plugin", plugin = "onnx-tissue", send_to = ["orthanc"] }}]
""",
    )
    node.start()
    try:
        sent = [
            make_files(tmp_path / "-".join(v or ("original",)), "ct-head", *v)
            for v in [(), ("anonymised",), ("uneven",)]
        ]
        for n, files in enumerate(sent, 1):
            assert storescu(node.port, files).returncode == 0
            wait_for(
                lambda n=n: (
                    len(node.query("select id from job")) == n
                    and node.query("select state from job order by id")[-1][0] in ("succeeded", "failed")
                ),
                240,
                f"job {n}",
            )
        rows = node.query("select state, result, last_error from job order by id")
        assert [r[0] for r in rows] == ["succeeded"] * 3, rows
        assert model.exists()  # setup made the model with the package's own script (no download)
        node.wait_delivered(3)
        uids = [u for (u,) in node.query("select sop_instance_uid from instance where job_fk is not null order by id")]
        assert len(uids) == 3
        pids = set()
        for k, (uid, files) in enumerate(zip(uids, sent, strict=True), 1):
            ds = pydicom.dcmread(io.BytesIO(orthanc.file(uid)))
            # "onnx-tissue setup #1 in pid N, job k (CPU)": one setup, one worker, its k-th job.
            assert ds.SeriesDescription.startswith("onnx-tissue setup #1 in pid "), ds.SeriesDescription
            assert f", job {k} " in ds.SeriesDescription, ds.SeriesDescription
            pids.add(ds.SeriesDescription.split(" pid ")[1].split(",")[0])
            assert {
                s.SegmentLabel: s.SegmentedPropertyTypeCodeSequence[0].CodeValue for s in ds.SegmentSequence
            } == SEGMENTS
            assert all(s.SegmentedPropertyCategoryCodeSequence[0].CodeValue == "85756007" for s in ds.SegmentSequence)
            # The label map the node encoded equals the reference model's, computed here in numpy 2.
            src = load_series(files)
            want, margin = reference.labels(src.rescaled())
            got = _labels(ds, src)
            differ = got != want
            assert differ.sum() <= 1e-5 * want.size and np.all(margin[differ] < 1e-3), int(differ.sum())
        assert len(pids) == 1, pids
        assert orthanc.count() == len(set(orthanc.instances()))
    finally:
        node.stop()


def _labels(seg: pydicom.Dataset, src) -> np.ndarray:
    """A SEG's segments as one label map (segment numbers) on the source's slice order."""
    import highdicom as hd

    s = hd.seg.Segmentation.from_dataset(seg) if not isinstance(seg, hd.seg.Segmentation) else seg
    uids = [str(d.SOPInstanceUID) for d in src.datasets]
    numbers = [int(x.SegmentNumber) for x in seg.SegmentSequence]
    vol = s.get_pixels_by_source_instance(
        source_sop_instance_uids=uids,
        segment_numbers=numbers,
        combine_segments=True,
        relabel=False,
        skip_overlap_checks=True,
    )
    return np.asarray(vol).astype(np.uint8)
