"""Measurements check themselves when made (a wrong value is an error at the plugin's line) and cross the
warm-worker protocol unchanged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from dicom_node_sdk import (
    Code,
    Measurement,
    MeasurementGroup,
    Measurements,
    QualitativeFinding,
    ResultError,
    codes,
)
from dicom_node_sdk.protocol import WorkerClient, encode_series, result_from_json, result_to_json

ML = Code("ml", "UCUM", "milliliter")
HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")


def _report() -> Measurements:
    return Measurements(
        [
            MeasurementGroup(
                "Liver",
                codes.SCT.Liver,
                [Measurement(codes.SCT.Volume, np.float32(1523.25), ML), Measurement(codes.SCT.Mean, 61.123456789, HU)],
                qualitative=[QualitativeFinding(Code("RID5705", "RADLEX", "Malignancy"), codes.SCT.Malignant)],
                segment=1,
                segmentation=0,
                finding_site=codes.SCT.Abdomen,
            ),
            MeasurementGroup(
                "Nodule 1", codes.SCT.Nodule, [Measurement(codes.SCT.Volume, 2, ML)], source_slices=[3, 4]
            ),
        ],
        description="liver volume",
    )


def test_numbers_become_floats_and_lists_become_lists():
    m = _report()
    v = m.groups[0].measurements[0].value
    assert type(v) is float and v == 1523.25
    assert m.groups[1].source_slices == [3, 4] and isinstance(m.groups[0].qualitative, list)


def test_measurements_cross_the_protocol_unchanged(tmp_path):
    m = _report()
    back = result_from_json(json.loads(json.dumps(result_to_json(m, tmp_path, "r"))))
    assert back == m
    m.evidence_series = ["1.2.3.4"]  # the prior series a plugin compared with
    assert result_from_json(json.loads(json.dumps(result_to_json(m, tmp_path, "r")))) == m


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Measurement(codes.SCT.Volume, float("nan"), ML), "finite number"),
        (lambda: Measurement(codes.SCT.Volume, "3", ML), "value must be a number"),
        (lambda: Measurement(codes.SCT.Volume, True, ML), "value must be a number"),
        (lambda: Measurement(codes.SCT.Volume, 1.0, Code("ml", "SCT", "ml")), 'UCUM code (scheme "UCUM")'),
        (lambda: Measurement("volume", 1.0, ML), "name must be a pydicom Code"),
        (
            lambda: Measurement(codes.SCT.Volume, 1.0, ML, derivation="mean"),
            "derivation must be a pydicom Code or None",
        ),
        (lambda: QualitativeFinding(codes.SCT.Nodule, "solid"), "value must be a pydicom Code"),
        (lambda: MeasurementGroup("", codes.SCT.Liver, [Measurement(codes.SCT.Volume, 1, ML)]), "non-empty string"),
        (lambda: MeasurementGroup("x" * 65, codes.SCT.Liver, [Measurement(codes.SCT.Volume, 1, ML)]), "at most 64"),
        (lambda: MeasurementGroup("Liver", codes.SCT.Liver, []), "no measurements and no qualitative"),
        (lambda: MeasurementGroup("Liver", codes.SCT.Liver, [1.0]), "measurements[0] must be a Measurement"),
        (lambda: MeasurementGroup("Liver", codes.SCT.Liver, [Measurement(codes.SCT.Volume, 1, ML)], segment=0), ">= 1"),
        (
            lambda: MeasurementGroup("Liver", codes.SCT.Liver, [Measurement(codes.SCT.Volume, 1, ML)], segmentation=0),
            "segment is not",
        ),
        (
            lambda: MeasurementGroup(
                "Liver", codes.SCT.Liver, [Measurement(codes.SCT.Volume, 1, ML)], segment=1, source_slices=[0]
            ),
            "not both",
        ),
        (
            lambda: MeasurementGroup(
                "Liver", codes.SCT.Liver, [Measurement(codes.SCT.Volume, 1, ML)], source_slices=[-1]
            ),
            "source_slices[] must be an integer >= 0",
        ),
        (lambda: Measurements([_report().groups[0], _report().groups[0]]), "two groups have tracking_id 'Liver'"),
        (lambda: Measurements([_report()]), "groups[0] must be a MeasurementGroup"),
        (lambda: Measurements([]), "Measurements holds no groups"),
        (lambda: Measurements(_report().groups, evidence_series="1.2.3"), "evidence_series is a list of Series"),
    ],
)
def test_a_wrong_field_says_what_to_change(make, message):
    with pytest.raises(ResultError, match=None) as e:
        make()
    assert message in str(e.value)


def test_measurements_come_back_from_a_warm_worker_with_numpy_1_and_pydicom_2(old_python, workers, ct_series, exchange):
    """The Segmentation of an earlier step goes to the worker as ``previous``; its Measurements come back equal."""
    import measure_sdk_plugin

    from node.plugins.builtin.threshold import Params, threshold_seg

    (seg,) = threshold_seg(ct_series, Params())
    ct_series.previous = [seg]
    w = workers(old_python, "measure=measure_sdk_plugin:measure")
    assert w.ready["ready"] is True, w.stderr()
    with WorkerClient(w.socket, timeout=120) as client:
        reply = client.run(encode_series(ct_series, exchange / "voxels.npy"), {}, out_dir=exchange, previous=[seg])
    (got,) = reply.results
    want = measure_sdk_plugin.compute(ct_series, seg)
    assert got.description.startswith("numpy 1.")  # computed in the old environment
    # Codes, references and counts exactly; means as numpy 1 sums them (float64, in another order).
    assert [(g.tracking_id, g.finding, g.segment) for g in got.groups] == [
        (g.tracking_id, g.finding, g.segment) for g in want.groups
    ]
    for g, w_ in zip(got.groups, want.groups, strict=True):
        assert [(m.name, m.unit, m.derivation) for m in g.measurements] == [
            (m.name, m.unit, m.derivation) for m in w_.measurements
        ]
        assert [m.value for m in g.measurements] == pytest.approx([m.value for m in w_.measurements], rel=1e-12)
