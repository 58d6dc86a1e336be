"""Segment templates in dcmqi's ``metainfo.json`` format: read, apply to a plugin's masks, and export from a SEG.

The format is the one dcmqi's ``itkimage2segimage``, its web editor and
pydicom-seg read: top-level series attributes, and ``segmentAttributes``, a
list (one per input label file) of lists of segments, each with its
``labelID`` (the value in the label map), label, coded category and type
(with an optional modifier), anatomic region, algorithm type/name and
``recommendedDisplayRGBValue``. A rule names one with ``segment_template``;
its entries then describe the plugin's segments, whatever the plugin said.
``SegmentAlgorithmName`` is read but not written: the SEG names the plugin
(and version) that actually ran.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import numpy as np
from dicom_node_sdk.api import Segment, Segmentation
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from pydicom.dataset import Dataset
from pydicom.sr.coding import Code

from node.config import error_text, first_repeated


class TemplateError(ValueError):
    """A template file that cannot be used (the message names the segment and the field)."""


class CodeItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    CodeValue: str = Field(min_length=1)
    CodingSchemeDesignator: str = Field(min_length=1)
    CodeMeaning: str = Field(min_length=1)

    def code(self) -> Code:
        return Code(self.CodeValue, self.CodingSchemeDesignator, self.CodeMeaning)

    @classmethod
    def of(cls, item: Dataset) -> dict[str, str]:
        return {
            "CodeValue": str(item.CodeValue),
            "CodingSchemeDesignator": str(item.CodingSchemeDesignator),
            "CodeMeaning": str(item.CodeMeaning),
        }


class SegmentEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")

    labelID: int = Field(ge=1, le=65535)
    SegmentLabel: str | None = Field(None, max_length=64)
    SegmentDescription: str | None = None
    SegmentAlgorithmType: Literal["AUTOMATIC", "SEMIAUTOMATIC", "MANUAL"] = "AUTOMATIC"
    SegmentAlgorithmName: str | None = None
    SegmentedPropertyCategoryCodeSequence: CodeItem
    SegmentedPropertyTypeCodeSequence: CodeItem
    SegmentedPropertyTypeModifierCodeSequence: CodeItem | None = None
    AnatomicRegionSequence: CodeItem | None = None
    AnatomicRegionModifierSequence: CodeItem | None = None
    recommendedDisplayRGBValue: tuple[int, int, int] | None = None
    TrackingIdentifier: str | None = None
    TrackingUniqueIdentifier: str | None = None

    @model_validator(mode="after")
    def _rgb(self) -> SegmentEntry:
        if self.recommendedDisplayRGBValue is not None and not all(
            0 <= c <= 255 for c in self.recommendedDisplayRGBValue
        ):
            raise ValueError(f"recommendedDisplayRGBValue {list(self.recommendedDisplayRGBValue)}: each value 0-255")
        return self

    def segment(self) -> Segment:
        label = self.SegmentLabel or self.SegmentDescription or self.SegmentedPropertyTypeCodeSequence.CodeMeaning
        return Segment(
            label=label[:64],
            category=self.SegmentedPropertyCategoryCodeSequence.code(),
            type=self.SegmentedPropertyTypeCodeSequence.code(),
            color=self.recommendedDisplayRGBValue,
            anatomic_region=self.AnatomicRegionSequence.code() if self.AnatomicRegionSequence else None,
            type_modifier=(
                self.SegmentedPropertyTypeModifierCodeSequence.code()
                if self.SegmentedPropertyTypeModifierCodeSequence
                else None
            ),
            anatomic_region_modifier=(
                self.AnatomicRegionModifierSequence.code() if self.AnatomicRegionModifierSequence else None
            ),
            description=self.SegmentDescription or "",
            algorithm_type=self.SegmentAlgorithmType,
        )


class Template(BaseModel):
    """A metainfo.json: series attributes (kept as given) and the segments."""

    model_config = ConfigDict(extra="allow")

    segmentAttributes: list[list[SegmentEntry]] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique(self) -> Template:
        label = first_repeated(e.labelID for e in self.entries)
        if label is not None:
            raise ValueError(f"labelID {label} is used by two segments")
        return self

    @property
    def entries(self) -> list[SegmentEntry]:
        return [e for group in self.segmentAttributes for e in group]


def _where(data: Any, loc: tuple[Any, ...]) -> str:
    """``segmentAttributes[0][1] ("Liver").SegmentedPropertyTypeCodeSequence.CodeValue``: the config's
    key notation (``config.loc_to_key``) with each segment's label, so the user finds it in the file."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and part < len(node) else None
            if isinstance(node, dict) and ("SegmentLabel" in node or "labelID" in node):
                name = node.get("SegmentLabel") or node.get("SegmentDescription") or f"labelID {node.get('labelID')}"
                out += f' ("{name}")'
        else:
            out += ("." if out else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def load_template(path: Path | str) -> Template:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as e:
        raise TemplateError(f"cannot read the segment template {path}: {e.strerror or e}") from None
    except json.JSONDecodeError as e:
        raise TemplateError(f"{path} is not JSON: {e}") from None
    try:
        return Template.model_validate(data)
    except ValidationError as e:
        problems = [f"{_where(data, err['loc'])}: {error_text(err)}" for err in e.errors()]
        raise TemplateError(f"{path}: " + "; ".join(problems)) from None


def apply_template(result: Segmentation, template: Template, unknown: str = "error", source: str = "") -> Segmentation:
    """The result's masks described by the template's segments (matched by label value).

    Label maps: each value present is a ``labelID``; stacked masks: mask ``i`` is ``labelID i + 1``.
    A label without an entry fails (``unknown = "error"``) or is dropped (``"skip"``).
    """
    by_id = {e.labelID: e for e in template.entries}
    m = np.asarray(result.masks)
    stacked = m.ndim == 4 or m.dtype == bool or np.issubdtype(m.dtype, np.floating)
    labels = (
        list(range(1, (m.shape[-1] if m.ndim == 4 else 1) + 1)) if stacked else [int(v) for v in np.unique(m) if v != 0]
    )
    missing = [v for v in labels if v not in by_id]
    if missing and unknown == "error":
        raise TemplateError(
            f"label value(s) {missing} in the plugin's result have no entry in the segment template "
            f'{source} (its labelIDs: {sorted(by_id)}); add them, or set unknown_labels = "skip"'
        )
    kept = [v for v in labels if v in by_id]
    if not kept:
        raise TemplateError(f"none of the plugin's label values {labels} is in the segment template {source}")
    if stacked:
        masks = m if m.ndim == 4 else m[..., None]
        masks = masks[..., [v - 1 for v in kept]]
    else:
        lut = np.zeros(int(m.max()) + 1, dtype=np.uint16)
        for n, v in enumerate(kept, 1):
            lut[v] = n
        masks = lut[m]
    return Segmentation(masks, [by_id[v].segment() for v in kept], kind=result.kind, description=result.description)


def export_template(seg: Dataset) -> dict[str, Any]:
    """A SEG's segments as a dcmqi metainfo.json (what :func:`load_template` reads back)."""
    import highdicom as hd

    entries = []
    for s in seg.SegmentSequence:
        if int(s.SegmentNumber) == 0:  # a LABELMAP SEG's background
            continue
        e: dict[str, Any] = {"labelID": int(s.SegmentNumber), "SegmentLabel": str(s.SegmentLabel)}
        if s.get("SegmentDescription"):
            e["SegmentDescription"] = str(s.SegmentDescription)
        e["SegmentAlgorithmType"] = str(s.SegmentAlgorithmType)
        algo = s.get("SegmentationAlgorithmIdentificationSequence")
        if algo:
            e["SegmentAlgorithmName"] = str(algo[0].AlgorithmName)
        e["SegmentedPropertyCategoryCodeSequence"] = CodeItem.of(s.SegmentedPropertyCategoryCodeSequence[0])
        t = s.SegmentedPropertyTypeCodeSequence[0]
        e["SegmentedPropertyTypeCodeSequence"] = CodeItem.of(t)
        if t.get("SegmentedPropertyTypeModifierCodeSequence"):
            e["SegmentedPropertyTypeModifierCodeSequence"] = CodeItem.of(t.SegmentedPropertyTypeModifierCodeSequence[0])
        if s.get("AnatomicRegionSequence"):
            region = s.AnatomicRegionSequence[0]
            e["AnatomicRegionSequence"] = CodeItem.of(region)
            if region.get("AnatomicRegionModifierSequence"):
                e["AnatomicRegionModifierSequence"] = CodeItem.of(region.AnatomicRegionModifierSequence[0])
        if s.get("RecommendedDisplayCIELabValue"):
            lab = hd.color.CIELabColor.from_dicom_value(tuple(int(v) for v in s.RecommendedDisplayCIELabValue))
            e["recommendedDisplayRGBValue"] = [int(round(c)) for c in lab.to_rgb()]
        entries.append(e)
    out: dict[str, Any] = {}
    for key in ("ContentCreatorName", "SeriesDescription", "SeriesNumber", "BodyPartExamined"):
        if seg.get(key):
            out[key] = str(seg.get(key))
    out["segmentAttributes"] = [entries]
    return out
