"""DICOM SR measurement report (TID 1500) from a plugin's :class:`Measurements`, with highdicom.

One Comprehensive 3D SR per result, in the source study with its own series. Each group is
one finding: a TID 1411 volumetric ROI group referencing the segment of a SEG the same job
wrote (the SEG's own UIDs, so it is built first), or a TID 1501 group referencing the input
slices it was measured on (or nothing: a measurement of the whole series). The source images
(and the SEGs) are the report's Current Requested Procedure Evidence.

A finding's Tracking UID is derived from the patient and the plugin's ``tracking_id`` only, not
from the job or the plugin: the same finding measured in a follow-up study, or by another plugin
that tracks it under the same id (segment-stats and volume-change both use the segment's label),
carries the same UID, so a viewer or a registry can line the reports up over time. The observer is
the device (the plugin and its version, manufacturer "dicom-node"), not a person.

Series the plugin used beside the one it measured (``Measurements.evidence_series``: a prior
study's series, another input of a study rule) are listed in the evidence too: a prior study's
under Pertinent Other Evidence. Codes of the node's local scheme ``99DICOMNODE`` are declared in
the Coding Scheme Identification Sequence.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence

import highdicom as hd
from dicom_node_sdk.api import SeriesInput, StudyInput
from dicom_node_sdk.results import MeasurementGroup, Measurements
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import generate_uid

from node.derive.common import MANUFACTURER, Provenance
from node.derive.errors import OutputError
from node.derive.sources import library_errors, prepare
from node.dicom.identity import DERIVED_UID_ROOT

#: The namespace of Tracking UIDs (uuid5): fixed forever, or follow-ups lose their findings' identity.
TRACKING_NAMESPACE = uuid.UUID("5b0f8a52-3c1e-5d0e-9a57-6e6f64652d74")

#: Procedure Reported (CID 100) by the source's modality; others are "Imaging procedure".
_PROCEDURES = {
    "CT": codes.cid100.CTUnspecifiedBodyRegion,
    "MR": codes.cid100.MRIUnspecifiedBodyRegion,
    "PT": codes.cid100.PETUnspecifiedBodyRegion,
    "NM": codes.cid100.NMUnspecifiedBodyRegion,
    "CR": codes.cid100.XRUnspecifiedBodyRegion,
    "DX": codes.cid100.XRUnspecifiedBodyRegion,
}


#: The node's local coding scheme (codes no standard has, e.g. volume-change's "Volume in prior study").
LOCAL_SCHEME = "99DICOMNODE"


def tracking_uid(patient_id: str, tracking_id: str) -> str:
    """The Tracking UID of a finding: the same for the same patient and tracking id, in any study, by any plugin."""
    return "2.25." + str(uuid.uuid5(TRACKING_NAMESPACE, f"{patient_id}|{tracking_id}").int)


def _patient_key(ds: Dataset) -> str:
    """Whose findings: the Patient ID; without one (anonymised), the study, so that patients without an ID never
    share a Tracking UID (their findings are then tracked within the study only)."""
    patient_id = str(ds.get("PatientID", "") or "").strip()
    return patient_id or f"study {ds.get('StudyInstanceUID', '')}"


def device_uid(plugin: str) -> str:
    """Device Observer UID: the plugin as the observing device (stable across its jobs and versions)."""
    return str(generate_uid(prefix=DERIVED_UID_ROOT, entropy_srcs=["device observer", plugin]))


def device_observer(prov: Provenance) -> hd.sr.ObserverContext:
    """The plugin of ``prov`` as the observing device (TID 1004), as SRs and KOSs name it."""
    return hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(prov.algorithm),
            name=prov.algorithm[:64],
            manufacturer_name=MANUFACTURER,
            model_name=f"{prov.algorithm} {prov.algorithm_version}".strip()[:64],
        ),
    )


def _other_evidence(result: Measurements, series: SeriesInput, study: StudyInput | None) -> list[Dataset]:
    """The instances of the series ``result.evidence_series`` names, found among the job's inputs and priors."""
    if not result.evidence_series:
        return []
    known: dict[str, SeriesInput] = {}
    for s in [
        *(study.inputs.values() if study is not None else ()),
        *(p for prior in series.priors for p in prior.inputs.values()),
    ]:
        known.setdefault(str(s.first.get("SeriesInstanceUID", "")), s)
    current = str(series.first.get("SeriesInstanceUID", ""))
    missing = [u for u in result.evidence_series if u not in known and u != current]
    if missing:
        raise OutputError(
            f"Measurements.evidence_series names {', '.join(missing)}, which is not among the job's inputs or "
            f"priors (those are: {', '.join(known) or 'none'}): name only series the plugin was given"
        )
    return [ds for u in result.evidence_series if u != current for ds in known[u].datasets]


def _declare_local_codes(sr: Dataset) -> None:
    """Declare the local scheme in the Coding Scheme Identification Sequence when the report uses it (PS3.3 C.12.1)."""

    def uses(ds: Dataset) -> bool:
        return any(
            (e.keyword == "CodingSchemeDesignator" and e.value == LOCAL_SCHEME)
            or (e.VR == "SQ" and any(uses(item) for item in e.value))
            for e in ds
        )

    if not uses(sr):
        return
    item = Dataset()
    item.CodingSchemeDesignator = LOCAL_SCHEME
    item.CodingSchemeName = "dicom-node local codes"
    item.CodingSchemeResponsibleOrganization = MANUFACTURER
    declared = list(sr.get("CodingSchemeIdentificationSequence", []))
    if not any(d.get("CodingSchemeDesignator") == LOCAL_SCHEME for d in declared):
        sr.CodingSchemeIdentificationSequence = [*declared, item]


def _segmentation_for(group: MeasurementGroup, index: int, segs: Mapping[int, Dataset]) -> Dataset:
    """The SEG a group's segment lies in: the one it names, else the last one built before result ``index``."""
    owner = f"measurement group {group.tracking_id!r}"
    if group.segmentation is None:
        before = [k for k in segs if k < index]
        if not before:
            raise OutputError(
                f"{owner} names segment {group.segment} but the job made no Segmentation before it: return the "
                "Segmentation first (or in an earlier step), or set segmentation to its index among the results"
            )
        return segs[max(before)]
    if group.segmentation not in segs:
        made = f"results {', '.join(map(str, sorted(segs)))}" if segs else "none"
        raise OutputError(
            f"{owner}: segmentation = {group.segmentation} is not a Segmentation this job wrote (the SEGs it wrote: "
            f"{made}, counting every result of the chain from 0; a Segmentation that failed to build is not "
            "among them)"
        )
    return segs[group.segmentation]


def _referenced_segment(group: MeasurementGroup, seg: Dataset) -> hd.sr.ReferencedSegment:
    numbers = [int(s.SegmentNumber) for s in seg.SegmentSequence]
    if group.segment not in numbers:
        raise OutputError(
            f"measurement group {group.tracking_id!r}: segment {group.segment} is not in the Segmentation it "
            f"measures (its segments are {', '.join(map(str, numbers))})"
        )
    images = _segment_sources(seg, int(group.segment))
    if images:
        # The segment and the source images its frames lie on. Not its frame numbers: an image reference
        # names frames or segments, not both (PS3.3 C.18.3.1.1, Referenced Segment Number).
        return hd.sr.ReferencedSegment(
            sop_class_uid=seg.SOPClassUID,
            sop_instance_uid=seg.SOPInstanceUID,
            segment_number=int(group.segment),
            source_images=images,
        )
    # A label map's frames hold every segment, and an empty segment has no frames: the source series.
    return hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=int(group.segment),
        source_series=hd.sr.SourceSeriesForSegmentation(seg.ReferencedSeriesSequence[0].SeriesInstanceUID),
    )


def _segment_sources(seg: Dataset, number: int) -> list[hd.sr.SourceImageForSegmentation]:
    """The source images the frames of segment ``number`` lie on (BINARY/FRACTIONAL; [] for a label map).

    Not highdicom's ``ReferencedSegment.from_segmentation``: it reads the segment number from each
    frame's functional groups only, and a one-segment SEG keeps it in the shared ones. [] too when
    a source is multi-frame (the reference then names the source series).
    """
    if seg.SegmentationType == "LABELMAP":
        return []
    shared = seg.SharedFunctionalGroupsSequence[0].get("SegmentIdentificationSequence")
    images: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for f in seg.PerFrameFunctionalGroupsSequence:
        ident = f.get("SegmentIdentificationSequence", shared)
        if ident is None or int(ident[0].ReferencedSegmentNumber) != number:
            continue
        for d in f.get("DerivationImageSequence", []):
            for src in d.get("SourceImageSequence", []):
                if "ReferencedFrameNumber" in src:
                    return []
                uid = str(src.ReferencedSOPInstanceUID)
                images.setdefault(uid, hd.sr.SourceImageForSegmentation(str(src.ReferencedSOPClassUID), uid))
    return list(images.values())


def _source_images(
    group: MeasurementGroup, series: SeriesInput, sources: Sequence[Dataset]
) -> list[hd.sr.SourceImageForMeasurementGroup] | None:
    """The input slices a group without a segment was measured on (frame numbers for a multi-frame source)."""
    if group.source_slices is None:
        return None
    n = len(series)
    bad = [s for s in group.source_slices if s >= n]
    if bad:
        raise OutputError(
            f"measurement group {group.tracking_id!r}: source_slices {bad} out of range; the series has {n} slices "
            f"(0..{n - 1})"
        )
    if series.frames is not None:  # one multi-frame source: slice i is frame frames[i] + 1
        frames = sorted({int(series.frames[s]) + 1 for s in group.source_slices})
        return [hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[0], frames)]
    return [
        hd.sr.SourceImageForMeasurementGroup.from_source_image(sources[s]) for s in sorted(set(group.source_slices))
    ]


def _group(
    group: MeasurementGroup,
    index: int,
    patient_id: str,
    prov: Provenance,
    series: SeriesInput,
    sources: Sequence[Dataset],
    segs: Mapping[int, Dataset],
) -> tuple[
    hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations,
    Dataset | None,
]:
    """One group as TID 1411 (a segment) or TID 1501 (slices or the whole series), and the SEG it references."""
    tracking = hd.sr.TrackingIdentifier(uid=tracking_uid(patient_id, group.tracking_id), identifier=group.tracking_id)
    # TID 4019: the plugin, its version and every parameter it ran with (defaults included). Not its family:
    # a coded item beside the findings reads back (highdicom) as one more qualitative evaluation.
    algorithm = hd.sr.AlgorithmIdentification(
        name=prov.algorithm[:64],
        version=prov.algorithm_version[:64] or "unknown",
        parameters=[f"{k}={v}" for k, v in prov.parameters.items()] or None,
    )
    sites = None if group.finding_site is None else [hd.sr.FindingSite(group.finding_site)]
    measurements = [
        hd.sr.Measurement(name=m.name, value=m.value, unit=m.unit, derivation=m.derivation) for m in group.measurements
    ] or None
    qualitative = [hd.sr.QualitativeEvaluation(q.name, q.value) for q in group.qualitative] or None
    if group.segment is not None:
        seg = _segmentation_for(group, index, segs)
        volumetric = hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=tracking,
            referenced_segment=_referenced_segment(group, seg),
            finding_type=group.finding,
            algorithm_id=algorithm,
            finding_sites=sites,
            measurements=measurements,
            qualitative_evaluations=qualitative,
        )
        return volumetric, seg
    image_level = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=tracking,
        finding_type=group.finding,
        algorithm_id=algorithm,
        finding_sites=sites,
        measurements=measurements,
        qualitative_evaluations=qualitative,
        source_images=_source_images(group, series, sources),
    )
    return image_level, None


def build_sr(
    series: SeriesInput,
    result: Measurements,
    prov: Provenance,
    *,
    index: int = 0,
    segs: Mapping[int, Dataset] | None = None,
    study: StudyInput | None = None,
    binary: bool = False,
) -> Dataset:
    """The SR for one Measurements result (``index``: its place among the job's results).

    ``segs`` maps the index of each Segmentation result of the job to the SEG built from it: a
    group's ``segment`` refers to one of them. ``study``: a study rule's inputs (where
    ``evidence_series`` may point). ``binary``: the twin SR for destinations that get the BINARY
    copies of label map SEGs (``segs`` then holds those copies): its own UIDs.
    """
    segs = segs or {}
    tag = "sr-binary" if binary else "sr"
    sources = prepare(series).datasets
    others = _other_evidence(result, series, study)
    patient_id = _patient_key(series.first)
    groups = []
    referenced: dict[str, Dataset] = {}
    for g in result.groups:
        item, seg = _group(g, index, patient_id, prov, series, sources, segs)
        groups.append(item)
        if seg is not None:
            referenced[str(seg.SOPInstanceUID)] = seg
    device = device_observer(prov)
    modality = str(series.first.get("Modality", ""))
    procedure: Code = _PROCEDURES.get(modality, codes.cid100.ImagingProcedure)
    description = (prov.series_description or result.description or f"{prov.algorithm} measurements")[:64]
    equipment = prov.contributing_equipment()
    with library_errors(series, "SR"):
        report = hd.sr.MeasurementReport(
            observation_context=hd.sr.ObservationContext(observer_device_context=device),
            procedure_reported=procedure,
            imaging_measurements=groups or None,
            title=result.title,
        )
        sr = hd.sr.Comprehensive3DSR(
            evidence=[*sources, *referenced.values(), *others],
            content=report[0],
            series_instance_uid=prov.uid(f"{tag}-series", index),
            series_number=prov.series_number + index,
            sop_instance_uid=prov.uid(tag, index),
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            series_description=description,
            manufacturer_model_name=MANUFACTURER,
            software_versions=equipment[0].SoftwareVersions,
            device_serial_number=equipment[0].DeviceSerialNumber,
            contributing_equipment=equipment,
        )
    _declare_local_codes(sr)
    return sr
