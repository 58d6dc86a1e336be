"""DICOM Segmentation from a plugin's masks, with highdicom.

The SEG references every source image it was made from, lies in the source
study with its own series, and carries the algorithm (Algorithm
Identification per segment) and this node (Contributing Equipment).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import highdicom as hd
import numpy as np
from dicom_node_sdk.api import Segmentation, SeriesInput
from dicom_node_sdk.results import transpose_hint
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from node.derive.common import MANUFACTURER, Provenance
from node.derive.errors import OutputError
from node.derive.sources import library_errors, prepare

#: Label Map Segmentation Storage (Sup 243, 2024): highdicom writes it; pydicom 3.0 has no name for it.
LABEL_MAP_SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"

#: A default palette (RGB) for segments without a colour: distinct and readable on grey.
PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (255, 225, 25),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (250, 190, 212),
]


def _masks(series: SeriesInput, result: Segmentation) -> np.ndarray:
    """The masks as highdicom takes them, in source order.

    The result checked its own dtype, values and segments when it was made (dicom_node_sdk.results);
    left to check here: the shape against the series, and that something describes the segments.
    """
    m = result.masks
    k = len(result.segments)
    if k == 0:  # a plugin may leave them to a segment template, and none was given
        raise OutputError(
            "the segmentation has no segment descriptions: give a Segment for each label, or a segment "
            "template (the rule's segment_template, or the plugin's own)"
        )
    expected = (len(series), int(series.first.Rows), int(series.first.Columns))
    if m.shape[:3] != expected:
        want = expected if m.ndim == 3 else (*expected, k)
        form = "(slices, rows, columns)" if m.ndim == 3 else "(slices, rows, columns, segments)"
        raise OutputError(
            f"Segmentation.masks must be {form} = {want} like the series; got {m.shape}"
            + (transpose_hint(m.shape, want) or ": one mask value per voxel of every slice, in slice order")
        )
    if result.kind == "fractional":
        m = m.astype(np.float32)
    elif m.ndim == 3:
        m = m.astype(np.uint8 if k < 256 else np.uint16)
    elif result.kind == "labelmap":  # stacked masks that do not overlap: one label map
        m = ((np.argmax(m, axis=3) + 1) * m.astype(bool).any(axis=3)).astype(np.uint8 if k < 256 else np.uint16)
    else:
        m = m.astype(bool)
    if series.frames is not None:  # one multi-frame source: back to the source's frame order
        out = np.empty_like(m)
        out[np.array(series.frames)] = m
        m = out
    return m


def _versions(value: str | Sequence[str]) -> tuple[str]:
    """Software Versions as highdicom takes them (it annotates one value; it writes every value given)."""
    return cast("tuple[str]", (value,) if isinstance(value, str) else tuple(str(v) for v in value))


def _descriptions(result: Segmentation, prov: Provenance) -> list[hd.seg.SegmentDescription]:
    algo = prov.algorithm_identification()
    out = []
    for i, s in enumerate(result.segments, 1):
        rgb = s.color or PALETTE[(i - 1) % len(PALETTE)]
        manual = s.algorithm_type == "MANUAL"
        desc = hd.seg.SegmentDescription(
            segment_number=i,
            segment_label=s.label[:64],
            segmented_property_category=s.category,
            segmented_property_type=s.type,
            algorithm_type=s.algorithm_type,
            algorithm_identification=None if manual else algo,
            anatomic_regions=[s.anatomic_region] if s.anatomic_region else None,
            display_color=hd.color.CIELabColor.from_rgb(*rgb),
        )
        if s.type_modifier is not None:
            desc.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
                hd.sr.CodedConcept(s.type_modifier.value, s.type_modifier.scheme_designator, s.type_modifier.meaning)
            ]
        if s.anatomic_region is not None and s.anatomic_region_modifier is not None:
            m = s.anatomic_region_modifier
            desc.AnatomicRegionSequence[0].AnatomicRegionModifierSequence = [
                hd.sr.CodedConcept(m.value, m.scheme_designator, m.meaning)
            ]
        if s.description:
            desc.SegmentDescription = s.description[:1024]
        out.append(desc)
    return out


def build_seg(
    series: SeriesInput,
    result: Segmentation,
    prov: Provenance,
    *,
    index: int = 0,
    transfer_syntax: UID = ExplicitVRLittleEndian,
    keep_empty_frames: bool = False,
    as_binary: bool = False,
) -> Dataset:
    """The SEG for one segmentation result (``index``: its place among the job's outputs).

    ``as_binary``: a label map result written as a BINARY SEG (Segmentation Storage), for destinations
    that do not accept Label Map Segmentation Storage (PS3.3 C.8.20, 2024); same segments, own UIDs,
    uncompressed when RLE was asked (1-bit frames cannot be RLE-coded).
    """
    masks = _masks(series, result)
    kind = {
        "binary": hd.seg.SegmentationTypeValues.BINARY,
        "labelmap": hd.seg.SegmentationTypeValues.LABELMAP,
        "fractional": hd.seg.SegmentationTypeValues.FRACTIONAL,
    }[result.kind]
    uid_tag = "seg"
    if as_binary:
        if result.kind != "labelmap":
            raise OutputError("as_binary is for label map results")
        kind, uid_tag = hd.seg.SegmentationTypeValues.BINARY, "seg-binary"
        if transfer_syntax == RLELossless:
            transfer_syntax = ExplicitVRLittleEndian
    if kind == hd.seg.SegmentationTypeValues.BINARY and transfer_syntax == RLELossless:
        raise OutputError(
            "a BINARY segmentation (1 bit per pixel) cannot be RLE-compressed; use compression = "
            '"jpeg2000" or "none" for this plugin, or a labelmap result'
        )
    # highdicom cannot leave out every frame: an all-empty result keeps its (empty) frames. Fractional
    # values count as empty when they round to 0 in the stored 8 bits.
    stored = np.rint(masks * 255) if result.kind == "fractional" else masks
    omit = not keep_empty_frames and bool(np.any(stored))
    # The rule's series_description wins over the plugin's own: the site names its series.
    description = (prov.series_description or result.description or f"{prov.algorithm} segmentation")[:64]
    equipment = prov.contributing_equipment()
    sources = prepare(series)
    with library_errors(series, "SEG"):
        seg = hd.seg.Segmentation(
            source_images=sources.datasets,
            pixel_array=masks,
            segmentation_type=kind,
            segment_descriptions=_descriptions(result, prov),
            series_instance_uid=prov.uid(f"{uid_tag}-series", index),
            series_number=prov.series_number + index,
            sop_instance_uid=prov.uid(uid_tag, index),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=_versions(equipment[0].SoftwareVersions),
            device_serial_number=equipment[0].DeviceSerialNumber,
            content_description=description,
            content_label="SEGMENTATION",
            content_creator_name=None,
            transfer_syntax_uid=transfer_syntax,
            omit_empty_frames=omit,
            contributing_equipment=equipment,
            max_fractional_value=255,
        )
    seg.SeriesDescription = description
    return seg
