"""Volumes on the source grid: derived image series of the source's own kind, and parametric maps.

Each output slice is the source slice's data set with what no longer holds
replaced: new SOP Instance and Series UIDs (deterministic, see
:class:`Provenance`), Image Type ``DERIVED\\SECONDARY``, the pixel data and its
description, window, Derivation Description and a Source Image Sequence
pointing at the slice it was computed from. Everything that describes the
patient, the study, the frame of reference and the slice's plane (Image
Position/Orientation, Pixel Spacing, Slice Thickness) stays the source's, so
the series stacks and measures exactly like the original.

Values are stored in 16 bits: integers that fit, exactly; anything else with
a Rescale Slope and Intercept chosen from the value range, whose rounding
error (half a step) is the precision reported. Rescale values are DS (at
most 16 characters), so the stored integers are computed from the values as
written, not from the unrounded ones.
"""

from __future__ import annotations

import copy
import datetime as dt
from dataclasses import dataclass
from typing import Any

import highdicom as hd
import numpy as np
from dicom_node_sdk.api import SeriesInput, Volume
from dicom_node_sdk.geometry import Grid, grid_from_affine
from dicom_node_sdk.results import transpose_hint
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import (
    UID,
    CTImageStorage,
    EnhancedCTImageStorage,
    EnhancedMRImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
)
from pydicom.valuerep import format_number_as_ds

from node.derive.common import MANUFACTURER, Provenance
from node.derive.errors import OutputError
from node.derive.sc import copy_laterality
from node.derive.sources import TYPE2_COPIED, library_errors, prepare

#: Source SOP classes a derived image series is written in (single-frame, one instance per slice).
SUPPORTED = {str(CTImageStorage): "CT Image", str(MRImageStorage): "MR Image"}
#: Enhanced multi-frame sources: the derived image is one instance of the same class, frame for frame.
ENHANCED = {str(EnhancedCTImageStorage): "Enhanced CT Image", str(EnhancedMRImageStorage): "Enhanced MR Image"}

#: Source attributes that describe the source's pixels or its own identity, not the derived image.
_REPLACED = {
    "PixelData",
    "SmallestImagePixelValue",
    "LargestImagePixelValue",
    "WindowCenter",
    "WindowWidth",
    "WindowCenterWidthExplanation",
    "VOILUTSequence",
    "ModalityLUTSequence",
    "RescaleType",
    "IconImageSequence",
    "SOPInstanceUID",
    "SeriesInstanceUID",
    "SeriesNumber",
    "SeriesDescription",
    "InstanceNumber",
    "ImageType",
    "DerivationDescription",
    "DerivationCodeSequence",
    "SourceImageSequence",
    "ReferencedImageSequence",
    "ContributingEquipmentSequence",
    "InstanceCreationDate",
    "InstanceCreationTime",
    "ContentDate",
    "ContentTime",
    "PixelPaddingValue",
    "PixelPaddingRangeLimit",
    "RescaleIntercept",
    "RescaleSlope",
    "BitsAllocated",
    "BitsStored",
    "HighBit",
    "PixelRepresentation",
    "SeriesDate",
    "SeriesTime",
    "IrradiationEventUID",
    "DataSetTrailingPadding",
    "RequestAttributesSequence",
    "StorageMediaFileSetUID",
    "StorageMediaFileSetID",
    "VOILUTFunction",
}


#: Type 2 (or 2C, required for these classes) attributes of the CT and MR Image IODs that a source may lack:
#: sent empty rather than missing.
_TYPE2 = (
    *TYPE2_COPIED,
    "PatientPosition",
    "SliceThickness",
    "AcquisitionNumber",
)
_TYPE2_BY_CLASS = {
    str(CTImageStorage): ("KVP",),
    str(MRImageStorage): ("ScanOptions", "MRAcquisitionType", "RepetitionTime", "EchoTime", "EchoTrainLength"),
}


@dataclass(frozen=True)
class Encoding:
    """How values are stored: ``stored * slope + intercept`` is within ``error`` of each value."""

    stored: np.ndarray
    slope: float
    intercept: float
    signed: bool
    #: The largest difference between a value and what the stored integer means (0: exact).
    error: float


def encode_values(values: np.ndarray, precision: float | None = None) -> Encoding:
    """16-bit storage for a volume: exact for integers that fit, else a slope/intercept over the range.

    ``values`` are a Volume's: real, finite and not empty (checked when the Volume was made).
    """
    v = np.asarray(values)
    lo, hi = float(v.min()), float(v.max())
    integral = np.issubdtype(v.dtype, np.integer) or bool(np.all(v == np.round(v)))
    if integral and lo >= -32768 and hi <= 32767:
        return Encoding(v.astype(np.int16), 1.0, 0.0, True, 0.0)
    if integral and lo >= 0 and hi <= 65535:
        return Encoding(v.astype(np.uint16), 1.0, 0.0, False, 0.0)
    # Signed 16 bits over [lo, hi]: stored -32767..32767, step = slope.
    centre = (lo + hi) / 2
    slope = float(format_number_as_ds((hi - lo) / 65534.0 * (1 + 1e-9) or 1.0))
    intercept = float(format_number_as_ds(centre))
    stored = np.clip(np.round((v.astype(np.float64) - intercept) / slope), -32768, 32767)
    error = float(np.max(np.abs(stored * slope + intercept - v)))
    if precision is not None and error > precision:
        raise OutputError(
            f"values from {lo:g} to {hi:g} cannot be kept within {precision:g} in 16 bits (the step "
            f"is {slope:g}, error up to {error:g}); ask for a coarser precision"
        )
    return Encoding(stored.astype(np.int16), slope, intercept, True, error)


def _nearest_sources(series: SeriesInput, grid: Grid) -> list[int]:
    """For each output slice, the source slice closest to it (what Source Image Sequence names)."""
    if series.positions is None:
        return [0] * len(grid.positions)
    d = np.linalg.norm(series.positions[None, :, :] - grid.positions[:, None, :], axis=2)
    return [int(i) for i in np.argmin(d, axis=1)]


@dataclass(frozen=True)
class Window:
    """A VOI window over the values' 1st to 99th percentile.

    A width below 1 is valid only with VOI LUT Function LINEAR_EXACT (PS3.3 C.11.2.1.2.1), which maps
    the window exactly instead of LINEAR's "width - 1": small-valued maps (probabilities, ADC in mm2/s)
    get it.
    """

    center: float
    width: float
    function: str | None

    def apply(self, ds: Dataset) -> None:
        """Window Center/Width (and the function, when needed) in the VOI LUT module of a data set."""
        ds.WindowCenter = format_number_as_ds(self.center)
        ds.WindowWidth = format_number_as_ds(self.width)
        if self.function:
            ds.VOILUTFunction = self.function

    def transformation(self) -> hd.VOILUTTransformation:
        return hd.VOILUTTransformation(
            window_center=self.center, window_width=self.width, voi_lut_function=self.function
        )


def _window(values: np.ndarray) -> Window:
    lo, hi = np.percentile(values, [1, 99]) if values.size > 100 else (values.min(), values.max())
    width = max(float(hi - lo), 1e-6)
    # The value as written (DS, 16 characters) decides, not the float.
    written = float(format_number_as_ds(width))
    return Window(float(lo + hi) / 2, written, "LINEAR_EXACT" if written < 1 else None)


def _check_shape(
    values: np.ndarray, expected: tuple[int, ...], affine: np.ndarray | None, own_grid: bool = True
) -> None:
    """On the input's grid the volume has its shape; on its own (an affine) any 3-D shape (checked when made)."""
    if affine is None and values.shape != expected:
        raise OutputError(
            f"Volume.values must be (slices, rows, columns) = {expected} like the series; got {values.shape}"
            + (
                transpose_hint(values.shape, expected)
                or (" (or give its affine: a grid of its own)" if own_grid else "")
            )
        )


def _derived_from(
    src: Dataset, prov: Provenance, volume: Volume, index: int, number: int, when: dt.datetime
) -> Dataset:
    """The source data set without what describes its own pixels and identity, with the output's identity."""
    ds = Dataset()
    for elem in src:
        if elem.tag.group == 0x0002 or elem.tag.is_private or elem.keyword in _REPLACED:
            continue
        ds.add(elem)
    ds = copy.deepcopy(ds)
    date, time = when.strftime("%Y%m%d"), when.strftime("%H%M%S.%f")
    ds.SOPClassUID = src.SOPClassUID
    ds.SOPInstanceUID = prov.uid("image", index, number - 1)
    ds.SeriesInstanceUID = prov.uid("image-series", index)
    ds.SeriesNumber = prov.series_number + index
    ds.SeriesDescription = (prov.series_description or volume.name or prov.algorithm)[:64]
    ds.SeriesDate, ds.SeriesTime = date, time
    ds.InstanceNumber = number
    ds.InstanceCreationDate = ds.ContentDate = date
    ds.InstanceCreationTime = ds.ContentTime = time
    ds.ContributingEquipmentSequence = prov.contributing_equipment()
    return ds


def _source_ref(src: Dataset, frame: int | None = None) -> Dataset:
    ref = Dataset()
    ref.ReferencedSOPClassUID = src.SOPClassUID
    ref.ReferencedSOPInstanceUID = src.SOPInstanceUID
    if frame is not None:
        ref.ReferencedFrameNumber = frame
    purpose = codes.DCM.SourceImageForImageProcessingOperation
    ref.PurposeOfReferenceCodeSequence = [hd.sr.CodedConcept(purpose.value, purpose.scheme_designator, purpose.meaning)]
    return ref


def _set_pixels(ds: Dataset, stored: np.ndarray, enc: Encoding, transfer_syntax: UID) -> None:
    """Grey 16-bit pixel data, then File Meta, then the transfer syntax (compressed if asked)."""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
    ds.PixelRepresentation = 1 if enc.signed else 0
    ds.PixelData = np.ascontiguousarray(stored).tobytes()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    if transfer_syntax != ExplicitVRLittleEndian:
        ds.compress(transfer_syntax, generate_instance_uid=False)


def _description(volume: Volume, prov: Provenance) -> str:
    return (volume.description or f"{prov.algorithm} {prov.algorithm_version} by dicom-node")[:1024]


def build_image_series(
    series: SeriesInput,
    volume: Volume,
    prov: Provenance,
    *,
    index: int = 0,
    transfer_syntax: UID = ExplicitVRLittleEndian,
) -> tuple[list[Dataset], float]:
    """The derived series (one data set per slice) and the largest storage error of its values."""
    values = np.asarray(volume.values)
    first = series.datasets[0]
    sop_class = str(first.SOPClassUID)
    if series.frames is not None and sop_class in ENHANCED and volume.affine is None:
        return _build_enhanced(series, volume, prov, index, transfer_syntax)
    if sop_class not in SUPPORTED or series.frames is not None:
        kind = UID(sop_class).name if sop_class else "unknown"
        raise OutputError(
            f"a derived image series is written for single-frame CT and MR sources and, on their own "
            f"grid, enhanced CT and MR; this series is {kind}" + (" (multi-frame)" if series.frames is not None else "")
        )
    _check_shape(values, (len(series.datasets), int(first.Rows), int(first.Columns)), volume.affine)
    grid = grid_from_affine(volume.affine, values.shape[0]) if volume.affine is not None else None
    sources = _nearest_sources(series, grid) if grid is not None else list(range(len(series.datasets)))
    enc = encode_values(values, volume.precision)
    window = _window(values)
    when = dt.datetime.now()
    rest = list(first.get("ImageType", []))[2:] or (["AXIAL"] if sop_class == str(CTImageStorage) else [])
    out = []
    for i, k in enumerate(sources):
        src = series.datasets[k]
        ds = _derived_from(src, prov, volume, index, i + 1, when)
        if grid is not None:  # its own plane, not the nearest source slice's
            ds.ImagePositionPatient = [format_number_as_ds(float(x)) for x in grid.positions[i]]
            ds.ImageOrientationPatient = [format_number_as_ds(x) for x in grid.orientation]
            ds.PixelSpacing = [format_number_as_ds(x) for x in grid.pixel_spacing]
            ds.SliceThickness = format_number_as_ds(grid.thickness)
            ds.Rows, ds.Columns = int(values.shape[1]), int(values.shape[2])
            for keyword in ("SliceLocation", "SpacingBetweenSlices"):
                ds.pop(keyword, None)
        ds.ImageType = ["DERIVED", "SECONDARY", *(list(src.get("ImageType", []))[2:] or rest)]
        ds.DerivationDescription = _description(volume, prov)
        ds.SourceImageSequence = [_source_ref(src)]
        if not ds.get("Manufacturer"):
            ds.Manufacturer = MANUFACTURER
        for keyword in _TYPE2 + _TYPE2_BY_CLASS.get(sop_class, ()):
            if keyword not in ds:  # the IOD needs it; empty when the source does not say (Type 2)
                setattr(ds, keyword, None)
        if not (sop_class == str(MRImageStorage) and enc.slope == 1.0 and enc.intercept == 0.0):
            # (not part of the MR Image IOD, so left out when not needed)
            ds.RescaleIntercept = format_number_as_ds(enc.intercept)
            ds.RescaleSlope = format_number_as_ds(enc.slope)
        window.apply(ds)
        _set_pixels(ds, enc.stored[i], enc, transfer_syntax)
        out.append(ds)
    return out, enc.error


def _set_in_groups(ds: Dataset, sequence: str, **values: Any) -> bool:
    """Set attributes in a functional group macro wherever the data set has it (shared or per frame)."""
    found = False
    for groups in (ds.get("SharedFunctionalGroupsSequence", []), ds.get("PerFrameFunctionalGroupsSequence", [])):
        for g in groups:
            for item in g.get(sequence, []):
                for k, v in values.items():
                    setattr(item, k, v)
                found = True
    return found


def _build_enhanced(
    series: SeriesInput, volume: Volume, prov: Provenance, index: int, transfer_syntax: UID
) -> tuple[list[Dataset], float]:
    """One enhanced multi-frame instance like the source, frame for frame, with the volume's values."""
    from pydicom import dcmread

    assert series.frames is not None
    values = np.asarray(volume.values)
    src = dcmread(series.files[0], stop_before_pixels=True)
    frames = int(src.NumberOfFrames)
    _check_shape(values, (frames, int(src.Rows), int(src.Columns)), None, own_grid=False)
    enc = encode_values(values, volume.precision)
    stored = np.empty_like(enc.stored)
    stored[np.array(series.frames)] = enc.stored  # back to the source's frame order
    window = _window(values)
    ds = _derived_from(src, prov, volume, index, 1, dt.datetime.now())
    # Value 2 stays the source's: the enhanced IODs allow only PRIMARY or MIXED there.
    ds.ImageType = ["DERIVED", *list(src.get("ImageType", ["", "PRIMARY"]))[1:]]
    for frame_type in ("CTImageFrameTypeSequence", "MRImageFrameTypeSequence"):
        for groups in (ds.get("SharedFunctionalGroupsSequence", []), ds.get("PerFrameFunctionalGroupsSequence", [])):
            for g in groups:
                for item in g.get(frame_type, []):
                    item.FrameType = ["DERIVED", *list(item.FrameType)[1:]]
    # Source Image Evidence (1C with a Derivation Image Sequence): the source, by study and series.
    inst = Dataset()
    inst.ReferencedSOPClassUID, inst.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
    ser = Dataset()
    ser.SeriesInstanceUID = src.SeriesInstanceUID
    ser.ReferencedSOPSequence = [inst]
    evidence = Dataset()
    evidence.StudyInstanceUID = src.StudyInstanceUID
    evidence.ReferencedSeriesSequence = [ser]
    ds.SourceImageEvidenceSequence = [evidence]
    rescale = dict(RescaleIntercept=format_number_as_ds(enc.intercept), RescaleSlope=format_number_as_ds(enc.slope))
    if str(src.SOPClassUID) == str(EnhancedCTImageStorage):
        rescale["RescaleType"] = "HU"  # the only value the Enhanced CT IOD allows
    if not _set_in_groups(ds, "PixelValueTransformationSequence", **rescale) and (enc.slope, enc.intercept) != (1, 0):
        item = Dataset()
        for k, v in {**rescale, "RescaleType": rescale.get("RescaleType", "US")}.items():
            setattr(item, k, v)
        ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence = [item]
    for groups in (ds.get("SharedFunctionalGroupsSequence", []), ds.get("PerFrameFunctionalGroupsSequence", [])):
        for g in groups:
            g.pop("RealWorldValueMappingSequence", None)  # the meaning of the source's values, not these
    # The source's window items describe its values: each becomes one window for these values, with no
    # explanation or function of the source's left over.
    for groups in (ds.get("SharedFunctionalGroupsSequence", []), ds.get("PerFrameFunctionalGroupsSequence", [])):
        for g in groups:
            if "FrameVOILUTSequence" in g:
                item = Dataset()
                window.apply(item)
                g.FrameVOILUTSequence = [item]
    processing = codes.DCM.ImageProcessing
    for frame, g in enumerate(ds.PerFrameFunctionalGroupsSequence):
        derivation = Dataset()
        derivation.DerivationDescription = _description(volume, prov)
        derivation.DerivationCodeSequence = [
            hd.sr.CodedConcept(processing.value, processing.scheme_designator, processing.meaning)
        ]
        derivation.SourceImageSequence = [_source_ref(src, frame + 1)]
        g.DerivationImageSequence = [derivation]
    _set_pixels(ds, stored, enc, transfer_syntax)
    return [ds], enc.error


NO_UNITS = Code("1", "UCUM", "no units")


def build_parametric_map(series: SeriesInput, volume: Volume, prov: Provenance, *, index: int = 0) -> Dataset:
    """One Parametric Map instance (highdicom) with the volume as 32-bit floats on the source grid.

    The values are stored as they are (Float Pixel Data), so nothing is lost; the Real World Value
    Mapping carries the units. Frames follow the source slices (their positions and orientation).
    """
    values = np.asarray(volume.values)
    shape = (len(series.datasets), int(series.first.Rows), int(series.first.Columns))
    if series.frames is not None:
        raise OutputError(
            "a parametric map is written for single-frame sources; this series is one multi-frame instance"
        )
    _check_shape(values, shape, volume.affine)
    geometry: dict[str, Any] = {}
    if volume.affine is not None:
        grid = grid_from_affine(volume.affine, values.shape[0])
        geometry = dict(
            plane_positions=[
                hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, [float(x) for x in p])
                for p in grid.positions
            ],
            plane_orientation=hd.PlaneOrientationSequence(hd.CoordinateSystemNames.PATIENT, grid.orientation),
            pixel_measures=hd.PixelMeasuresSequence(pixel_spacing=grid.pixel_spacing, slice_thickness=grid.thickness),
        )
    values = values.astype(np.float32)
    lo, hi = float(values.min()), float(values.max())
    label = (volume.name or prov.algorithm)[:16]
    mapping = hd.pm.RealWorldValueMapping(
        lut_label=label,
        lut_explanation=(volume.description or volume.name or prov.algorithm)[:64],
        unit=volume.units or NO_UNITS,
        value_range=(lo, hi),
        slope=1.0,
        intercept=0.0,
    )
    eq = prov.contributing_equipment()
    sources = prepare(series)
    with library_errors(series, "Parametric Map"):
        pm = hd.pm.ParametricMap(
            source_images=sources.datasets,
            pixel_array=values,
            series_instance_uid=prov.uid("map-series", index),
            series_number=prov.series_number + index,
            sop_instance_uid=prov.uid("map", index),
            instance_number=1,
            manufacturer=MANUFACTURER,
            manufacturer_model_name=MANUFACTURER,
            software_versions=f"{prov.algorithm} {prov.algorithm_version}"[:64],
            device_serial_number=str(eq[0].DeviceSerialNumber),
            contains_recognizable_visual_features=False,
            real_world_value_mappings=[mapping],
            voi_lut_transformations=[_window(values).transformation()],
            content_label="MAP",
            content_description=(volume.description or volume.name or prov.algorithm)[:64],
            contributing_equipment=eq,
            **geometry,
        )
    copy_laterality(pm, series.first)  # General Series' Laterality (2C), as for Secondary Capture
    pm.SeriesDescription = (prov.series_description or volume.name or prov.algorithm)[:64]
    pm.DerivationDescription = (volume.description or f"{prov.algorithm} {prov.algorithm_version} by dicom-node")[:1024]
    return pm
