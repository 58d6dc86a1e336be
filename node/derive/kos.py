"""A Key Object Selection document (KOS) listing a job's outputs, with highdicom.

A viewer or worklist that shows key objects then finds a job's results (SEG, SR, SC, derived
images) as one selection under a title ("Of Interest" by default), without knowing the node's
series numbers. It lies in the source study with its own series; the observer is the node's
plugin(s) as a device, as in the SR (node.derive.sr).

Its UIDs are derived from the job and the objects it lists: a retry that makes the same outputs
makes the same KOS (a re-send, not a second selection); other outputs, another KOS.
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from node.derive.common import MANUFACTURER, Provenance
from node.derive.errors import OutputError
from node.derive.sr import device_observer
from node.dicom.identity import DERIVED_UID_ROOT

#: The title when the action says only ``key_objects = true`` (CID 7010).
DEFAULT_TITLE = codes.DCM.OfInterest


def build_kos(
    objects: Sequence[Dataset],
    prov: Provenance,
    *,
    title: Code = DEFAULT_TITLE,
    description: str = "",
    series_number: int = 9999,
) -> Dataset:
    """The KOS listing ``objects`` (the job's outputs, headers are enough), made by the job of ``prov``."""
    if not objects:
        raise OutputError("a Key Object Selection lists at least one object; the job wrote none")
    studies = {str(ds.StudyInstanceUID) for ds in objects}
    if len(studies) > 1:
        raise OutputError(f"a Key Object Selection lists objects of one study; the outputs lie in {len(studies)}")
    uids = sorted(str(ds.SOPInstanceUID) for ds in objects)

    def uid(kind: str) -> UID:
        return generate_uid(prefix=DERIVED_UID_ROOT, entropy_srcs=[*map(str, prov.job_key), kind, *uids])

    device = device_observer(prov)
    text = description or f"results of {prov.algorithm} {prov.algorithm_version}".strip()
    content = hd.ko.KeyObjectSelection(
        document_title=title, referenced_objects=list(objects), observer_device_context=device, description=text
    )
    equipment = prov.contributing_equipment()
    try:
        kos = hd.ko.KeyObjectSelectionDocument(
            evidence=list(objects),
            content=content,
            series_instance_uid=uid("kos-series"),
            series_number=series_number,
            sop_instance_uid=uid("kos"),
            instance_number=1,
            manufacturer=MANUFACTURER,
            contributing_equipment=equipment,
            series_description=(prov.series_description or title.meaning)[:64],
            manufacturer_model_name=MANUFACTURER,
            software_versions=equipment[0].SoftwareVersions,
            device_serial_number=equipment[0].DeviceSerialNumber,
        )
    except (ValueError, TypeError, AttributeError) as e:
        raise OutputError(f"highdicom could not build the Key Object Selection: {type(e).__name__}: {e}") from e
    return kos
