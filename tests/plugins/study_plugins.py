"""Test plugins for study rules: what a study plugin (and a series plugin in a study rule) was given.

Each writes a JSON report to ``params.report`` naming the inputs it got (name, Series Instance UID, slice
count), the primary, the study and its priors, and returns a bone segmentation of the primary series (so
the job has an output built on it).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicom_node_sdk import Segment, Segmentation, SeriesInput, StudyInput, codes, plugin


@dataclass
class Params:
    report: str = ""


def _series(s: SeriesInput) -> dict[str, Any]:
    return {"series_uid": str(s.first.SeriesInstanceUID), "slices": len(s)}


def _study(study: StudyInput) -> dict[str, Any]:
    return {
        "study_uid": study.study_uid,
        "study_date": study.study_date,
        "patient_id": study.patient_id,
        "inputs": {name: _series(s) for name, s in study.inputs.items()},
        "primary": str(study.primary.first.SeriesInstanceUID),
        "priors": [_study(p) for p in study.priors],
    }


def _bone(series: SeriesInput) -> list[Segmentation]:
    mask = series.rescaled() > 300
    return [Segmentation(mask, [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone)])]


@plugin(name="pair", version="1.0", params=Params, takes="study")
def pair(study: StudyInput, params: Params) -> list[Segmentation]:
    """A study plugin: reports its StudyInput, segments the primary."""
    Path(params.report).write_text(json.dumps({"takes": "study", **_study(study)}))
    return _bone(study.primary)


@plugin(name="one", version="1.0", params=Params)
def one(series: SeriesInput, params: Params) -> list[Segmentation]:
    """A series plugin: reports its series and the study it is the primary input of."""
    report = {"takes": "series", **_series(series), "study": _study(series.study) if series.study else None}
    Path(params.report).write_text(json.dumps(report))
    return _bone(series)
