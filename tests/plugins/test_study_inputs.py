"""A study rule's job in the plugin runtime (node.plugins.worker.run), in this process: no node, no index.

The series are made from the real shared CT (a plain and a contrast copy in one study, and a prior study
of the same patient). What a plugin author relies on: a ``takes="study"`` plugin gets a StudyInput whose
named inputs are the series the rule chose, with the primary and the priors; a series plugin in the same
job gets the primary with ``.study`` and ``.priors``; the outputs are built on the primary; a study
plugin run from a series rule fails with a message saying what to change.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from dicom_node_sdk import SeriesInput, StudyInput
from helpers import TEST_PLUGINS
from helpers.studies import series_uid, study_series
from pydicom import dcmread

from node.plugins.worker import StepSpec, WorkSpec, run

sys.path.insert(0, str(TEST_PLUGINS))


@pytest.fixture
def study(tmp_path: Path) -> dict[str, list[Path]]:
    return {
        "ct_plain": study_series(tmp_path / "plain", 2, contrast=False, count=2),
        "ct_contrast": study_series(tmp_path / "contrast", 3, contrast=True, count=3),
    }


def _spec(tmp_path: Path, series: dict[str, list[Path]], plugin: str, **extra: object) -> WorkSpec:
    out = tmp_path / f"out-{plugin}"
    out.mkdir()
    primary = series["ct_contrast"]
    spec = WorkSpec(
        [str(f) for f in primary],
        [StepSpec(plugin, f"study_plugins:{plugin}", {"report": str(tmp_path / f"{plugin}.json")})],
        str(out),
        (series_uid(primary), 1, "enhancement", 0),
    )
    for key, value in extra.items():
        setattr(spec, key, value)
    return spec


def _study_fields(study: dict[str, list[Path]]) -> dict[str, object]:
    first = dcmread(study["ct_plain"][0], stop_before_pixels=True)
    return {
        "inputs": {name: [str(f) for f in files] for name, files in study.items()},
        "primary": "ct_contrast",
        "study": {"study_uid": str(first.StudyInstanceUID), "study_date": "20260101", "patient_id": "P1"},
    }


def test_a_study_plugin_gets_every_named_input_and_the_priors(tmp_path: Path, study: dict[str, list[Path]]) -> None:
    prior = study_series(tmp_path / "prior", 5, contrast=False, count=2)
    priors = [{"study_uid": "1.2.3.4", "study_date": "20240101", "series": [[str(f) for f in prior]]}]
    result = run(_spec(tmp_path, study, "pair", priors=priors, **_study_fields(study)))
    assert result.ok, result.error

    report = json.loads((tmp_path / "pair.json").read_text())
    assert report["inputs"] == {
        "ct_plain": {"series_uid": series_uid(study["ct_plain"]), "slices": 2},
        "ct_contrast": {"series_uid": series_uid(study["ct_contrast"]), "slices": 3},
    }
    assert report["primary"] == series_uid(study["ct_contrast"])
    assert (report["study_date"], report["patient_id"]) == ("20260101", "P1")
    [p] = report["priors"]
    assert (p["study_uid"], p["study_date"]) == ("1.2.3.4", "20240101")
    assert p["inputs"] == {series_uid(prior): {"series_uid": series_uid(prior), "slices": 2}}
    [seg] = result.outputs
    referenced = {s.SeriesInstanceUID for s in dcmread(seg.file).ReferencedSeriesSequence}
    assert referenced == {series_uid(study["ct_contrast"])}  # built on the primary


def test_a_series_plugin_in_a_study_job_gets_the_primary_with_its_study(
    tmp_path: Path, study: dict[str, list[Path]]
) -> None:
    result = run(_spec(tmp_path, study, "one", **_study_fields(study)))
    assert result.ok, result.error
    report = json.loads((tmp_path / "one.json").read_text())
    assert report["series_uid"] == series_uid(study["ct_contrast"]) and report["slices"] == 3
    assert set(report["study"]["inputs"]) == {"ct_plain", "ct_contrast"}


def test_a_study_plugin_from_a_series_rule_fails_saying_what_to_change(
    tmp_path: Path, study: dict[str, list[Path]]
) -> None:
    result = run(_spec(tmp_path, study, "pair"))
    assert not result.ok and not result.retryable
    assert 'plugin pair takes a study (takes = "study"): run it from a study rule (scope = "study")' in result.error


def test_an_input_that_cannot_form_a_volume_is_named(tmp_path: Path, study: dict[str, list[Path]]) -> None:
    broken = study_series(tmp_path / "broken", 9, contrast=False, count=2)
    ds = dcmread(broken[1])
    ds.Rows, ds.Columns = 256, 256  # a slice of another size: no volume
    ds.PixelData = bytes(256 * 256 * 2)
    ds.save_as(broken[1])
    inputs = {"ct_plain": [str(f) for f in broken], "ct_contrast": [str(f) for f in study["ct_contrast"]]}
    result = run(_spec(tmp_path, study, "pair", **{**_study_fields(study), "inputs": inputs}))
    assert not result.ok
    assert "input ct_plain:" in result.error, result.error


def test_study_input_names_its_inputs() -> None:
    a, b = SeriesInput([]), SeriesInput([])
    study = StudyInput({"ct_plain": a, "ct_contrast": b}, primary_name="ct_contrast")
    assert study.primary is b and study["ct_plain"] is a and list(study) == ["ct_plain", "ct_contrast"]
    assert StudyInput({"x": a}).primary is a  # no primary named: the first input
    with pytest.raises(KeyError, match="no input named 'ct' \\(inputs: ct_plain, ct_contrast\\)"):
        study["ct"]


def test_a_study_plugin_in_a_plugin_environment_is_refused_saying_why(
    tmp_path: Path, study: dict[str, list[Path]]
) -> None:
    spec = _spec(tmp_path, study, "pair", **_study_fields(study))
    remote = {"name": "pair", "version": "1.0", "takes": "study"}
    spec.steps = [StepSpec("pair", "study_plugins:pair", {}, kind="environment", environment="torch", remote=remote)]
    result = run(spec)
    assert not result.ok and not result.retryable
    assert 'plugin pair takes a study (takes = "study") and runs in environment torch' in result.error, result.error
    assert "install it in the node's own environment" in result.error
