"""DICOM Segmentation from a plugin's masks, with highdicom.

The SEG references every source image it was made from, lies in the source
study with its own series, and carries the algorithm (Algorithm
Identification per segment) and this node (Contributing Equipment).
"""

from __future__ import annotations

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, RLELossless

from node.derive.common import MANUFACTURER, Provenance
from node.derive.errors import OutputError
from node.derive.sources import library_errors, prepare
from node.plugins.api import Segmentation, SeriesInput

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
    """The masks checked against the series, as highdicom takes them, in source order."""
    m = np.asarray(result.masks)
    n, rows, cols = len(series), int(series.first.Rows), int(series.first.Columns)
    k = len(result.segments)
    if k == 0:
        raise OutputError("the segmentation has no segment descriptions")
    if m.shape[:3] != (n, rows, cols) or m.ndim not in (3, 4):
        raise OutputError(
            f"masks have shape {m.shape}; expected ({n}, {rows}, {cols}) as a label map or "
            f"({n}, {rows}, {cols}, {k}) as stacked masks"
        )
    if m.ndim == 4 and m.shape[3] != k:
        raise OutputError(f"{m.shape[3]} stacked masks but {k} segment descriptions")
    if result.kind == "fractional":
        if not np.issubdtype(m.dtype, np.floating):
            raise OutputError(f"a fractional segmentation needs float masks in [0, 1], got {m.dtype}")
        if m.size and (np.nanmin(m) < 0 or np.nanmax(m) > 1 or np.isnan(m).any()):
            raise OutputError("fractional masks must lie in [0, 1] (no NaN)")
        m = m.astype(np.float32)
    elif m.ndim == 3:
        if m.dtype == bool:
            if k != 1:
                raise OutputError(f"a boolean label map holds one segment, but {k} are described")
            m = m.astype(np.uint8)
        elif not np.issubdtype(m.dtype, np.integer):
            raise OutputError(f"a label map must hold integers (0 = background, 1..{k}), got {m.dtype}")
        top = int(m.max()) if m.size else 0
        if (m.size and int(m.min()) < 0) or top > k:
            raise OutputError(f"label values must be 0..{k}; found {int(m.min())}..{top}")
        m = m.astype(np.uint8 if k < 256 else np.uint16)
    else:
        if result.kind == "labelmap":
            if (m.astype(bool).sum(axis=3) > 1).any():
                raise OutputError('stacked masks overlap, so they cannot be one label map; use kind = "binary"')
            m = (np.argmax(m, axis=3) + 1) * m.astype(bool).any(axis=3)
            m = m.astype(np.uint8 if k < 256 else np.uint16)
        else:
            m = m.astype(bool)
    if series.frames is not None:  # one multi-frame source: back to the source's frame order
        out = np.empty_like(m)
        out[np.array(series.frames)] = m
        m = out
    return m


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
            software_versions=equipment[0].SoftwareVersions,
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
