"""What every derived object shares: who made it, with which algorithm, and its UIDs.

UIDs are deterministic for a job's outputs (derived from the job's identity and
the output's place in it), so running a job again (after a crash, a retry) makes
the *same* objects: the index keeps one copy and a PACS sees a re-send, not a
second result.
"""

from __future__ import annotations

import datetime as dt
import socket
from dataclasses import dataclass, field

import highdicom as hd
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import UID, generate_uid

from node import __version__
from node.dicom.identity import DERIVED_UID_ROOT

MANUFACTURER = "dicom-node"


@dataclass(frozen=True)
class Provenance:
    """Where an output comes from: the job that made it and the algorithm that ran."""

    #: Stable identity of the job: (source series UID, revision, rule, action index).
    job_key: tuple[str, int, str, int]
    algorithm: str
    algorithm_version: str
    #: The plugin's parameters, shown in Algorithm Parameters.
    parameters: dict[str, str] = field(default_factory=dict)
    station_name: str = ""
    #: Algorithm Family (CID 7162).
    family: Code = codes.cid7162.ArtificialIntelligence
    series_number: int = 9000
    series_description: str = ""

    def uid(self, *parts: object) -> UID:
        # The plugin's version is part of it: an upgraded plugin's result is a new object, not a re-send.
        return generate_uid(
            prefix=DERIVED_UID_ROOT,
            entropy_srcs=[*map(str, self.job_key), self.algorithm, self.algorithm_version, *map(str, parts)],
        )

    def algorithm_identification(self) -> hd.AlgorithmIdentificationSequence:
        params = {k: str(v)[:64] for k, v in self.parameters.items()} or None
        return hd.AlgorithmIdentificationSequence(
            name=self.algorithm[:64],
            family=self.family,
            version=self.algorithm_version[:64],
            source=MANUFACTURER,
            parameters=params,
        )

    def contributing_equipment(self) -> list[hd.ContributingEquipment]:
        """This node, as IHE AI Results asks: who processed the images, with what software."""
        return [
            hd.ContributingEquipment(
                manufacturer=MANUFACTURER,
                purpose_of_reference=codes.DCM.ProcessingEquipment,
                manufacturer_model_name=MANUFACTURER,
                software_versions=[__version__, f"{self.algorithm} {self.algorithm_version}"[:64]],
                device_serial_number=socket.gethostname()[:64] or "unknown",
                station_name=self.station_name[:16] or None,
                contribution_datetime=dt.datetime.now(dt.UTC).strftime("%Y%m%d%H%M%S+0000"),
                contribution_description=f"{self.algorithm} {self.algorithm_version} run by dicom-node"[:64],
            )
        ]
