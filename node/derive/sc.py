"""Secondary Capture images from a plugin's pictures, with highdicom.

One series per result, consecutive instance numbers, grey or RGB. An image
that shows one source slice references it (Source Image Sequence) and keeps
its plane (Image Position/Orientation are not part of SC, so the slice's
position goes in the Source Image reference and the description); a derived
view (a projection) references the whole source series.
"""

from __future__ import annotations

from typing import cast

import highdicom as hd
import numpy as np
from dicom_node_sdk import geometry
from dicom_node_sdk.api import Images, SeriesInput
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, JPEG2000Lossless

from node.derive.common import MANUFACTURER, Provenance
from node.derive.errors import OutputError


def _ref(ds: Dataset, frame: int | None = None) -> Dataset:
    item = Dataset()
    item.ReferencedSOPClassUID = ds.SOPClassUID
    item.ReferencedSOPInstanceUID = ds.SOPInstanceUID
    if frame is not None:
        item.ReferencedFrameNumber = frame + 1
    return item


def copy_laterality(sc: Dataset, source: Dataset) -> None:
    """Body part and laterality as the source has them.

    Laterality (General Series, Type 2C) is needed unless the body part is a
    known unpaired one or Image Laterality is sent: copy what the source says,
    and send it empty when the body part is unknown.
    """
    if "BodyPartExamined" in source and "BodyPartExamined" not in sc:
        sc.BodyPartExamined = source.BodyPartExamined
    if source.get("Laterality"):
        sc.Laterality = source.Laterality
    elif source.get("ImageLaterality"):
        sc.ImageLaterality = source.ImageLaterality
    elif not sc.get("BodyPartExamined"):
        sc.Laterality = ""


def build_sc(
    series: SeriesInput,
    result: Images,
    prov: Provenance,
    *,
    index: int = 0,
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> list[Dataset]:
    """The SC instances of one image result (``index``: its place among the job's outputs)."""
    # The result checked its shape, dtype and source_slices when it was made (dicom_node_sdk.results);
    # only what needs the series is left to check here.
    px = result.pixels
    rgb = px.ndim == 4
    sources = list(result.source_slices) if result.source_slices is not None else [None] * len(px)
    for s in sources:
        if s is not None and s >= len(series):
            raise OutputError(
                f"Images.source_slices holds {s}, outside the series: slice indices are 0..{len(series) - 1}"
            )
    series_uid = prov.uid("sc-series", index)
    # The rule's series_description wins over the plugin's own: the site names its series.
    description = (prov.series_description or result.description or f"{prov.algorithm} images")[:64]
    out: list[Dataset] = []
    for n, (img, src) in enumerate(zip(px, sources, strict=True)):
        if src is None:
            ref = series.first
            refs = [_ref(d) for d in series.datasets] if series.frames is None else [_ref(series.first)]
        else:
            ref = series.datasets[src] if series.frames is None else series.first
            refs = [_ref(ref, series.frames[src] if series.frames is not None else None)]
        orientation = result.patient_orientation
        if orientation is None:
            iop = series.orientation
            orientation = geometry.patient_orientation([*iop[0], *iop[1]]) if iop else None
        orientation = orientation or ("L", "P")
        spacing = result.pixel_spacing
        if (
            spacing is None
            and src is not None
            and series.pixel_spacing
            and img.shape[:2] == (int(series.first.Rows), int(series.first.Columns))
        ):
            spacing = (float(series.pixel_spacing[0]), float(series.pixel_spacing[1]))
        sc = hd.sc.SCImage.from_ref_dataset(
            ref_dataset=ref,
            pixel_array=np.ascontiguousarray(img),
            # JPEG 2000 lossless keeps colour with the reversible colour transform (PS3.5 8.2.4).
            photometric_interpretation=("YBR_RCT" if transfer_syntax == JPEG2000Lossless else "RGB")
            if rgb
            else "MONOCHROME2",
            bits_allocated=8 if img.dtype == np.uint8 else 16,
            coordinate_system="PATIENT",
            patient_orientation=(orientation[0][:1], orientation[1][:1]),
            series_instance_uid=series_uid,
            series_number=prov.series_number + index,
            sop_instance_uid=prov.uid("sc", index, n),
            instance_number=n + 1,
            manufacturer=MANUFACTURER,
            # (highdicom annotates integers; Pixel Spacing is DS, and it writes floats as they are)
            pixel_spacing=cast("tuple[int, int] | None", spacing),
            transfer_syntax_uid=transfer_syntax,
            contributing_equipment=prov.contributing_equipment(),
        )
        sc.PatientOrientation = list(orientation)  # the full letters, e.g. "LP" for an oblique row
        sc.SeriesDescription = description
        sc.ImageType = ["DERIVED", "SECONDARY"]
        sc.DerivationDescription = f"{prov.algorithm} {prov.algorithm_version} (dicom-node)"[:1024]
        sc.SourceImageSequence = refs
        copy_laterality(sc, series.first)
        out.append(sc)
    return out
