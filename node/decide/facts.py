"""What rules look at: a series' first instance, its counts and who sent it.

Attributes come from the first instance's header (lowest Instance Number),
read with pydicom when a rule asks for them, so any keyword works without
the index storing it. Counts come from the index (or from the files, for a
dry run on files).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from pydicom.filereader import dcmread
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import IS, DSdecimal, DSfloat, PersonName
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from node.decide.conditions import Facts, orientation
from node.dicom.files import is_dicomdir
from node.index.models import Instance, Series, Study

#: SOP classes whose one instance usually is the whole series (PS3.3 enhanced multi-frame IODs).
_ENHANCED = ("Enhanced", "Legacy Converted Enhanced", "Breast Tomosynthesis", "Volume")


def _convert(value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [_convert(v) for v in value]
    if isinstance(value, IS):
        return int(value)
    if isinstance(value, (DSfloat, DSdecimal)):
        return float(value)
    if isinstance(value, (PersonName, UID)):
        return str(value)
    if isinstance(value, bytes):
        return f"<{len(value)} bytes>"
    if isinstance(value, (str, int, float)):
        return value.strip() if isinstance(value, str) else value
    return str(value)


def dataset_value(ds: Dataset, keyword: str) -> Any:
    """A data set attribute as a rule sees it: None when missing, a list when multi-valued."""
    if keyword not in ds:
        return None
    elem = ds.data_element(keyword)
    if elem is None:
        return None
    if elem.VR == "SQ":
        return f"<{len(elem.value)} items>" if elem.value else None
    v = _convert(elem.value)
    if v == "" or v == []:
        return None
    return v


def dataset_facts(ds: Dataset, **extra: Any) -> Facts:
    """Facts about a series from one of its data sets plus ``extra`` (counts, AE titles, revision)."""
    values = dict(extra)
    values.setdefault("orientation", orientation(dataset_value(ds, "ImageOrientationPatient")))
    return Facts(values, lambda kw: dataset_value(ds, kw))


def read_dataset(path: Path) -> Dataset:
    return dcmread(path, stop_before_pixels=True, force=True)


def expected_instances(ds: Dataset) -> tuple[int | None, str]:
    """How many instances the series will have, when its first one says so, and how we know."""
    sop = ds.get("SOPClassUID")
    frames = dataset_value(ds, "NumberOfFrames")
    name = UID(str(sop)).name if sop else ""
    if isinstance(frames, int) and frames > 1 and any(k in name for k in _ENHANCED):
        return 1, f"a single {name} instance with {frames} frames"
    n = dataset_value(ds, "ImagesInAcquisition")
    if isinstance(n, int) and n > 0:
        return n, f"ImagesInAcquisition = {n}"
    t, s = dataset_value(ds, "NumberOfTemporalPositions"), dataset_value(ds, "NumberOfSlices")
    if isinstance(t, int) and isinstance(s, int) and t > 0 and s > 0:
        return t * s, f"NumberOfTemporalPositions x NumberOfSlices = {t} x {s}"
    return None, ""


@dataclass
class SeriesSnapshot:
    """A series in the index as the rules see it at one moment."""

    series_id: int
    series_uid: str
    study_uid: str
    modality: str
    description: str
    state: str
    revision: int
    instance_count: int
    revision_instances: int
    last_received_at: dt.datetime
    first_file: str
    facts: Facts
    extra: dict[str, Any] = field(default_factory=dict)


def first_instance(session: Session, series_id: int, revision: int | None = None) -> Instance | None:
    q = select(Instance).where(Instance.series_fk == series_id)
    if revision is not None:
        q = q.where(Instance.revision == revision)
    q = q.order_by(Instance.instance_number.is_(None), Instance.instance_number, Instance.id).limit(1)
    return session.execute(q).scalars().first()


def series_snapshot(
    session: Session, data_dir: Path, series_id: int, revision: int | None = None
) -> SeriesSnapshot | None:
    """The facts of a series in the index (as of ``revision``, default the latest), or None without instances."""
    row = session.execute(
        select(Series, Study.study_instance_uid).join(Study, Study.id == Series.study_fk).where(Series.id == series_id)
    ).first()
    if row is None:
        return None
    series, study_uid = row
    revision = revision or series.revision
    first = first_instance(session, series_id)
    if first is None:
        return None
    sender = first_instance(session, series_id, revision) or first
    frames = session.execute(
        select(func.sum(func.coalesce(Instance.number_of_frames, 1))).where(Instance.series_fk == series_id)
    ).scalar_one()
    ds = read_dataset(data_dir / first.file_path)
    facts = dataset_facts(
        ds,
        instances=series.instance_count,
        frames=int(frames or 0),
        revision=revision,
        calling_ae=sender.calling_ae,
        called_ae=sender.called_ae,
    )
    return SeriesSnapshot(
        series_id=series.id,
        series_uid=series.series_instance_uid,
        study_uid=study_uid,
        modality=series.modality,
        description=series.series_description,
        state=series.state,
        revision=revision,
        instance_count=series.instance_count,
        revision_instances=series.revision_instances,
        last_received_at=series.last_received_at,
        first_file=first.file_path,
        facts=facts,
    )


@dataclass
class FileSeries:
    """A series found among files on disk (for ``rules test``)."""

    series_uid: str
    files: list[Path]
    first: Dataset
    frames: int

    def facts(self, **extra: Any) -> Facts:
        return dataset_facts(self.first, instances=len(self.files), frames=self.frames, revision=1, **extra)


def series_from_files(paths: Iterable[Path]) -> tuple[list[FileSeries], list[tuple[Path, str]]]:
    """Group DICOM files by series; returns the series and the files that could not be read."""
    groups: dict[str, list[tuple[Any, Path, Dataset]]] = {}
    bad: list[tuple[Path, str]] = []
    for p in paths:
        try:
            ds = read_dataset(p)
        except Exception as e:  # any unreadable file is reported, not fatal
            bad.append((p, f"not readable as DICOM: {type(e).__name__}: {e}"))
            continue
        if is_dicomdir(str(ds.file_meta.get("MediaStorageSOPClassUID", ""))):
            bad.append((p, "a DICOMDIR (an index of the files, not an instance)"))
            continue
        uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not uid:
            bad.append((p, "no Series Instance UID (a DICOMDIR or a non-image object?)"))
            continue
        num = dataset_value(ds, "InstanceNumber")
        groups.setdefault(uid, []).append((num if isinstance(num, int) else 2**31, p, ds))
    out = []
    for uid, items in groups.items():
        items.sort(key=lambda t: (t[0], str(t[1])))
        frames = sum(max(1, dataset_value(ds, "NumberOfFrames") or 1) for _, _, ds in items)
        out.append(FileSeries(uid, [p for _, p, _ in items], items[0][2], frames))
    return out, bad
