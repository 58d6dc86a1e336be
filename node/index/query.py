"""The query engine: C-FIND identifiers and QIDO-RS parameters matched against the index (PS3.4 C.2.2.2).

One engine serves DIMSE Query/Retrieve (C-FIND, and the instances a C-MOVE or C-GET sends) and QIDO/WADO-RS,
so both answer the same query the same way. A query is turned into one SQL statement over the index tables
(patient, study, series, instance, joined down to the query's level); derived counts and the sets a study
holds (ModalitiesInStudy, SOPClassesInStudy) are computed only when asked for and only for the matched rows,
so a query over a large index reads what it returns, not the whole table.

Matching (PS3.4 C.2.2.2): single value (Person Name case-insensitive, as Orthanc does by default, with
the database's lower(); on SQLite, which folds ASCII letters only, a stored "ÅSTRÖM" is not found as
"åström": see _foldings; other text case-sensitive; leading and trailing spaces ignored), wildcard ``*`` ``?``, range for dates and times
(``a-b``, ``-b``, ``a-``), a list of values separated by ``\\`` (QIDO: ``,`` too for UIDs), universal
(empty). Hierarchical and relational queries are answered alike: keys of the levels above the query's
level can be matched and returned at any level (a SERIES query needs no StudyInstanceUID).
A standard attribute the index does not keep is returned zero-length and not matched (PS3.4 allows this;
:func:`unsupported` lists them); sequence matching is not supported either (the key is returned empty).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterator, Mapping
from collections.abc import Sequence as SequenceABC
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast, get_args, overload

from pydicom import Dataset, config
from pydicom.datadict import dictionary_VR, keyword_dict, keyword_for_tag, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from sqlalchemy import ColumnElement, Connection, Select, and_, func, or_, select
from sqlalchemy.sql import FromClause

from node.dicom.dimse import Element
from node.index.models import Instance, Patient, Series, Study

Level = Literal["PATIENT", "STUDY", "SERIES", "IMAGE"]
Root = Literal["patient", "study"]
LEVELS: tuple[Level, ...] = get_args(Level)

#: The character set of every result: index values are unicode.
CHARSET = "ISO_IR 192"


class QueryError(ValueError):
    """A query the node cannot run; the message says what to change.

    ``keyword``/``tag`` name the offending attribute when there is one: C-FIND answers 0xA900 with it as
    Offending Element (0000,0901) and the message as Error Comment; QIDO-RS answers 400 with the message.
    """

    def __init__(self, message: str, *, keyword: str | None = None, tag: int | None = None) -> None:
        super().__init__(message)
        self.keyword = keyword
        self.tag = tag if tag is not None or keyword is None else tag_for_keyword(keyword)


@dataclass
class Query:
    """What to find: the level, the information model and the keys as the client sent them."""

    level: Level
    root: Root = "study"
    #: {keyword: value} as the client sent them (str; "" = universal matching / return key only).
    keys: dict[str, str] = field(default_factory=dict)
    limit: int | None = None
    offset: int = 0
    #: "dimse" results carry QueryRetrieveLevel (0008,0052); QIDO-RS results do not.
    origin: Literal["dimse", "qido"] = "dimse"


@dataclass(frozen=True)
class InstanceRef:
    """One stored instance a C-MOVE, C-GET or WADO-RS sends."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    #: Relative to the storage's data directory.
    file_path: str
    file_size: int
    instance_id: int


# -- what the index keeps ---------------------------------------------------------------------------

_patient = Patient.__table__
_study = Study.__table__
_series = Series.__table__
_instance = Instance.__table__
_TABLES = {"PATIENT": _patient, "STUDY": _study, "SERIES": _series, "IMAGE": _instance}

#: How a key matches: text (case-sensitive), pn (case-insensitive), uid (list, no wildcard), date/time
#: (ranges), int, count (a derived count: returned only), set (a study's modalities or SOP classes),
#: multi (a multi-valued attribute kept joined by backslashes: any of its values).
Kind = Literal["text", "pn", "uid", "date", "time", "int", "count", "set", "multi"]


@dataclass(frozen=True)
class _Key:
    level: Level
    kind: Kind
    #: The column, or the expression of a derived count given the level's table.
    column: Callable[[], ColumnElement[Any]]


def _col(table: Any, name: str) -> Callable[[], ColumnElement[Any]]:
    return lambda: cast(ColumnElement[Any], table.c[name])


# Derived counts, built once: a correlated subquery per count, correlated on the enclosing query's patient or
# study (aliases keep them apart from the tables the query itself joins). Building them per call cost about
# 0.3 ms each (every alias rebuilds its column proxies).
_cs, _cse = _study.alias("cs"), _series.alias("cse")
_COUNT_STUDIES = select(func.count()).where(_cs.c.patient_fk == _patient.c.id).scalar_subquery()
_COUNT_PATIENT_SERIES = (
    select(func.count())
    .select_from(_cse.join(_cs, _cse.c.study_fk == _cs.c.id))
    .where(_cs.c.patient_fk == _patient.c.id)
    .scalar_subquery()
)
_COUNT_PATIENT_INSTANCES = (
    select(func.coalesce(func.sum(_cse.c.instance_count), 0))
    .select_from(_cse.join(_cs, _cse.c.study_fk == _cs.c.id))
    .where(_cs.c.patient_fk == _patient.c.id)
    .scalar_subquery()
)
_COUNT_STUDY_SERIES = select(func.count()).where(_cse.c.study_fk == _study.c.id).scalar_subquery()
_COUNT_STUDY_INSTANCES = (
    select(func.coalesce(func.sum(_cse.c.instance_count), 0)).where(_cse.c.study_fk == _study.c.id).scalar_subquery()
)


def _fixed(expression: ColumnElement[Any]) -> Callable[[], ColumnElement[Any]]:
    return lambda: expression


_KEYS: dict[str, _Key] = {
    # PATIENT
    "PatientName": _Key("PATIENT", "pn", _col(_patient, "patient_name")),
    "PatientID": _Key("PATIENT", "text", _col(_patient, "patient_id")),
    "IssuerOfPatientID": _Key("PATIENT", "text", _col(_patient, "issuer_of_patient_id")),
    "PatientBirthDate": _Key("PATIENT", "date", _col(_patient, "birth_date")),
    "PatientSex": _Key("PATIENT", "text", _col(_patient, "sex")),
    "NumberOfPatientRelatedStudies": _Key("PATIENT", "count", _fixed(_COUNT_STUDIES)),
    "NumberOfPatientRelatedSeries": _Key("PATIENT", "count", _fixed(_COUNT_PATIENT_SERIES)),
    "NumberOfPatientRelatedInstances": _Key("PATIENT", "count", _fixed(_COUNT_PATIENT_INSTANCES)),
    # STUDY
    "StudyInstanceUID": _Key("STUDY", "uid", _col(_study, "study_instance_uid")),
    "StudyDate": _Key("STUDY", "date", _col(_study, "study_date")),
    "StudyTime": _Key("STUDY", "time", _col(_study, "study_time")),
    "AccessionNumber": _Key("STUDY", "text", _col(_study, "accession_number")),
    "StudyID": _Key("STUDY", "text", _col(_study, "study_id")),
    "StudyDescription": _Key("STUDY", "text", _col(_study, "study_description")),
    "ReferringPhysicianName": _Key("STUDY", "pn", _col(_study, "referring_physician_name")),
    "ModalitiesInStudy": _Key("STUDY", "set", _col(_series, "modality")),
    "SOPClassesInStudy": _Key("STUDY", "set", _col(_instance, "sop_class_uid")),
    "NumberOfStudyRelatedSeries": _Key("STUDY", "count", _fixed(_COUNT_STUDY_SERIES)),
    "NumberOfStudyRelatedInstances": _Key("STUDY", "count", _fixed(_COUNT_STUDY_INSTANCES)),
    # SERIES
    "SeriesInstanceUID": _Key("SERIES", "uid", _col(_series, "series_instance_uid")),
    "Modality": _Key("SERIES", "text", _col(_series, "modality")),
    "SeriesNumber": _Key("SERIES", "int", _col(_series, "series_number")),
    "SeriesDescription": _Key("SERIES", "text", _col(_series, "series_description")),
    "BodyPartExamined": _Key("SERIES", "text", _col(_series, "body_part_examined")),
    "ProtocolName": _Key("SERIES", "text", _col(_series, "protocol_name")),
    "SeriesDate": _Key("SERIES", "date", _col(_series, "series_date")),
    "SeriesTime": _Key("SERIES", "time", _col(_series, "series_time")),
    "Manufacturer": _Key("SERIES", "text", _col(_series, "manufacturer")),
    "StationName": _Key("SERIES", "text", _col(_series, "station_name")),
    "FrameOfReferenceUID": _Key("SERIES", "uid", _col(_series, "frame_of_reference_uid")),
    "NumberOfSeriesRelatedInstances": _Key("SERIES", "count", _col(_series, "instance_count")),
    # IMAGE
    "SOPInstanceUID": _Key("IMAGE", "uid", _col(_instance, "sop_instance_uid")),
    "SOPClassUID": _Key("IMAGE", "uid", _col(_instance, "sop_class_uid")),
    "InstanceNumber": _Key("IMAGE", "int", _col(_instance, "instance_number")),
    "AcquisitionNumber": _Key("IMAGE", "int", _col(_instance, "acquisition_number")),
    "Rows": _Key("IMAGE", "int", _col(_instance, "rows")),
    "Columns": _Key("IMAGE", "int", _col(_instance, "columns")),
    "NumberOfFrames": _Key("IMAGE", "int", _col(_instance, "number_of_frames")),
    "BitsAllocated": _Key("IMAGE", "int", _col(_instance, "bits_allocated")),
    "ImageType": _Key("IMAGE", "multi", _col(_instance, "image_type")),
    "PhotometricInterpretation": _Key("IMAGE", "text", _col(_instance, "photometric_interpretation")),
    "AvailableTransferSyntaxUID": _Key("IMAGE", "uid", _col(_instance, "transfer_syntax_uid")),
}

#: The keys the node matches and returns, per level (keys of the levels above work too: see the module doc).
SUPPORTED: dict[Level, tuple[str, ...]] = {
    level: tuple(k for k, spec in _KEYS.items() if spec.level == level) for level in LEVELS
}

#: The unique key of each level (PS3.4 C.2.2.1).
UNIQUE: dict[Level, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}

#: Keys every result carries whatever was asked; their values in a query are not matched.
_RESULT_ONLY = frozenset(
    {"SpecificCharacterSet", "QueryRetrieveLevel", "RetrieveAETitle", "InstanceAvailability", "RetrieveURL"}
)

#: QIDO-RS default return attributes (PS3.18 Table 10.6.3-3..5) that the index keeps.
_QIDO_DEFAULT: dict[Level, tuple[str, ...]] = {
    "PATIENT": (),
    "STUDY": (
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ModalitiesInStudy",
        "ReferringPhysicianName",
        "PatientName",
        "PatientID",
        "PatientBirthDate",
        "PatientSex",
        "StudyInstanceUID",
        "StudyID",
        "NumberOfStudyRelatedSeries",
        "NumberOfStudyRelatedInstances",
    ),
    "SERIES": ("Modality", "SeriesDescription", "SeriesInstanceUID", "SeriesNumber", "NumberOfSeriesRelatedInstances"),
    "IMAGE": ("SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns", "BitsAllocated", "NumberOfFrames"),
}


def _above(level: Level) -> tuple[Level, ...]:
    """The levels from PATIENT down to ``level``."""
    return LEVELS[: LEVELS.index(level) + 1]


def _available(level: Level, keyword: str) -> bool:
    spec = _KEYS.get(keyword)
    return spec is not None and spec.level in _above(level)


def unsupported(q: Query) -> list[str]:
    """The keys of ``q`` the node neither matches nor returns at its level (they are returned zero-length).

    C-FIND answers 0xFF01 instead of 0xFF00 when there are any: "one or more Optional Keys were not
    supported for existence and/or matching" (PS3.4 C.4.1.1.4).
    """
    return [k for k in q.keys if k not in _RESULT_ONLY and not _available(q.level, k)]


# -- reading the client's query ---------------------------------------------------------------------


def _tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


def _standard_keyword(tag: int) -> str:
    """The keyword of a standard attribute; QueryError for a private or unknown one."""
    if (tag >> 16) % 2 == 1:
        raise QueryError(f"{_tag_text(tag)} private attributes cannot be queried: leave it out of the query", tag=tag)
    keyword = keyword_for_tag(tag)
    if not keyword:
        raise QueryError(
            f"{_tag_text(tag)} is not a DICOM attribute in the data dictionary: leave it out of the query", tag=tag
        )
    return keyword


def _check_keyword(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        close = difflib.get_close_matches(keyword, keyword_dict, n=1, cutoff=0.8)
        hint = f" (did you mean {close[0]}?)" if close else " (keywords are spelled as in PS3.6, e.g. PatientName)"
        raise QueryError(f"{keyword} is not a DICOM attribute keyword{hint}", keyword=keyword)
    return keyword


def _value_text(elem: DataElement) -> str:
    """The element's value as the query string: multiple values joined by ``\\``, sequences empty."""
    value = elem.value
    if value is None or isinstance(value, (bytes, bytearray, DicomSequence)) or elem.VR == "SQ":
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join("" if v is None else str(v) for v in value)
    return str(value)


def from_identifier(ds: Dataset, root: Root) -> Query:
    """The query of a C-FIND, C-MOVE or C-GET identifier under Patient Root or Study Root.

    pydicom decodes the text values with the identifier's Specific Character Set when they are read.
    """
    try:
        level_text = str(ds.get("QueryRetrieveLevel", "") or "").strip().upper()
    except Exception as exc:  # a value pydicom cannot decode
        raise QueryError(f"QueryRetrieveLevel (0008,0052) cannot be read: {exc}", keyword="QueryRetrieveLevel") from exc
    level = _level(level_text, root)
    keys: dict[str, str] = {}
    for base_tag in list(ds.keys()):
        tag = int(base_tag)
        group, element = tag >> 16, tag & 0xFFFF
        if element == 0 or group in (0x0000, 0x0002):  # group lengths, command and file meta elements
            continue
        keyword = _standard_keyword(tag)
        if keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        try:  # pydicom decodes a value read from the network on first access
            keys[keyword] = _value_text(ds[tag]).strip()
        except Exception as exc:  # undecodable bytes, a malformed number
            raise QueryError(f"{keyword} {_tag_text(tag)}: the value cannot be read: {exc}", tag=tag) from exc
    q = Query(level=level, root=root, keys=keys)
    _validate(q)
    return q


def _level(text: str, root: Root) -> Level:
    if not text:
        raise QueryError(
            "QueryRetrieveLevel (0008,0052) is missing: set it to PATIENT, STUDY, SERIES or IMAGE",
            keyword="QueryRetrieveLevel",
        )
    if text not in LEVELS:
        raise QueryError(
            f"QueryRetrieveLevel (0008,0052) '{text}' is not PATIENT, STUDY, SERIES or IMAGE",
            keyword="QueryRetrieveLevel",
        )
    if text == "PATIENT" and root == "study":
        raise QueryError(
            "the Study Root information model has no PATIENT level: query at STUDY level or use Patient Root",
            keyword="QueryRetrieveLevel",
        )
    return text


#: QIDO-RS query parameters that are not attributes.
_QIDO_PARAMS = frozenset({"includefield", "limit", "offset", "fuzzymatching"})
_HEX_TAG = re.compile(r"^[0-9A-Fa-f]{8}$")


def _qido_keyword(name: str) -> str:
    if "." in name:
        raise QueryError(f"{name}: sequence matching (attribute paths with '.') is not supported")
    if _HEX_TAG.match(name):
        return _standard_keyword(int(name, 16))
    return _check_keyword(name)


def from_qido(
    level: Level,
    params: Mapping[str, list[str]],
    *,
    study: str | None = None,
    series: str | None = None,
) -> tuple[Query, list[str]]:
    """The query of a QIDO-RS request (PS3.18 8.3.4) and its includefield keywords (or ``["all"]``).

    ``study``/``series`` are the UIDs of the request path. The query's keys are the matching keys, the
    default return attributes of the level that the node keeps and the included fields, so :func:`find`
    returns what the response must hold. ``fuzzymatching=true`` is accepted and matching stays exact.
    """
    if level not in LEVELS or level == "PATIENT":
        raise QueryError(f"QIDO-RS searches studies, series or instances, not {level}")
    keys: dict[str, str] = {}
    include: list[str] = []
    limit: int | None = None
    offset = 0
    for name, values in params.items():
        if name == "includefield":
            include = _qido_include(values)
        elif name == "limit":
            limit = _qido_int(name, values)
        elif name == "offset":
            offset = _qido_int(name, values)
        elif name == "fuzzymatching":
            if any(v.strip().lower() not in ("true", "false") for v in values):
                raise QueryError(f"fuzzymatching must be true or false, not {values[-1]!r}")
        else:
            keyword = _qido_keyword(name)
            parts = [v.strip() for v in values]
            if _vr(keyword) == "UI":  # PS3.18: a list of UIDs is separated by commas
                parts = [p.strip() for v in parts for p in v.split(",")]
            keys[keyword] = "\\".join(parts)
    for keyword, uid in (("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
        if uid is not None:
            keys[keyword] = uid
    for keyword in _qido_shown(level, include, study, series):
        keys.setdefault(keyword, "")
    q = Query(level=level, root="study", keys=keys, limit=limit, offset=offset, origin="qido")
    _validate(q)
    return q, include


def _qido_include(values: list[str]) -> list[str]:
    """includefield values (repeated or comma-separated keywords or tags) as keywords, or ``["all"]``."""
    items = [item.strip() for v in values for item in v.split(",") if item.strip()]
    keywords = [_qido_keyword(item) for item in items if item != "all"]  # each checked, even with "all"
    return ["all"] if "all" in items else list(dict.fromkeys(keywords))


def _qido_shown(level: Level, include: list[str], study: str | None, series: str | None) -> list[str]:
    """The attributes a QIDO-RS response holds: the level's defaults (PS3.18 10.6.3.3), those of the
    levels above unless the path names them, and the included ones (``all``: every key the node keeps
    at this level and above, less the PATIENT-level counts, which QIDO-RS has no level for)."""
    shown = list(_QIDO_DEFAULT[level])
    if level != "STUDY" and study is None:
        shown += _QIDO_DEFAULT["STUDY"]
    if level == "IMAGE" and series is None:
        shown += _QIDO_DEFAULT["SERIES"]
    if include == ["all"]:
        return shown + [k for lv in _above(level) for k in SUPPORTED[lv] if not k.startswith("NumberOfPatient")]
    return shown + include


def _qido_int(name: str, values: list[str]) -> int:
    try:
        number = int(values[-1])
    except ValueError:
        raise QueryError(f"{name} must be a whole number, not {values[-1]!r}") from None
    if number < 0:
        raise QueryError(f"{name} must not be negative, not {number}")
    return number


# -- matching ---------------------------------------------------------------------------------------


def _vr(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    assert tag is not None
    return str(dictionary_VR(tag)).split(" or ")[0]


_DATE = re.compile(r"^\d{8}$")
#: ACR-NEMA dates (YYYY.MM.DD), which old peers still send: read as YYYYMMDD.
_LEGACY_DATE = re.compile(r"\b\d{4}\.\d{2}\.\d{2}\b")
_TIME = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def _validate(q: Query) -> None:
    """Refuse values that cannot match anything as sent (a malformed date), naming the key."""
    for keyword, value in q.keys.items():
        spec = _KEYS.get(keyword)
        if spec is None or not value or not _available(q.level, keyword):
            continue
        if spec.kind == "set":
            _study_has_value(keyword, value, "sqlite")  # the value only: the EXISTS is built by _where
        else:
            _condition(keyword, spec, value, "sqlite")


def _like_pattern(value: str) -> str:
    escaped = value.replace("!", "!!").replace("%", "!%").replace("_", "!_")
    return escaped.replace("*", "%").replace("?", "_")


#: SQLite's built-in lower() folds the ASCII letters only.
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def _foldings(value: str, dialect: str) -> list[Any]:
    """``value`` case-folded as the database folds the column with lower(), so that both sides agree.

    PostgreSQL folds by the database's locale: lower() of the value, a constant (indexes still serve it).
    SQLite folds ASCII letters only: the value folded so matches a name as stored; folded fully as well,
    it also matches a stored name whose other letters are lower case ("MÜLLER" finds "Müller"). Only a
    stored upper-case non-ASCII letter asked for in lower case ("müller" for "MÜLLER") is not found there.
    """
    if dialect != "sqlite":
        return [func.lower(value)]
    return list(dict.fromkeys((value.translate(_ASCII_LOWER), value.lower())))


def _folded_equals(column: ColumnElement[Any], value: str, dialect: str) -> ColumnElement[bool]:
    folded = func.lower(column)
    return or_(*(folded == v for v in _foldings(value, dialect)))


def _wildcard(column: ColumnElement[Any], value: str, dialect: str, fold: bool) -> ColumnElement[bool]:
    """``*``/``?`` matching. SQLite's LIKE ignores ASCII case, so case-sensitive matching uses GLOB there."""
    if not fold:
        if dialect == "sqlite":
            return column.op("GLOB")(value.replace("[", "[[]"))
        return column.like(_like_pattern(value), escape="!")
    folded = func.lower(column)
    if dialect != "sqlite":
        return folded.like(func.lower(_like_pattern(value)), escape="!")
    matches = []
    for v in _foldings(value, dialect):
        like = folded.like(_like_pattern(v), escape="!")
        prefix = re.split(r"[*?]", v, maxsplit=1)[0]
        if prefix and ord(prefix[-1]) >= 0xD7FF:  # the next code point may be a surrogate: LIKE alone
            prefix = ""
        # SQLite reads an index for LIKE only on a NOCASE column; a range on lower(name) reads
        # ix_patient_name_lower (binary order: the range holds exactly the names with that prefix).
        matches.append(
            and_(folded >= prefix, folded < prefix[:-1] + chr(ord(prefix[-1]) + 1), like) if prefix else like
        )
    return or_(*matches)


def _range_bounds(keyword: str, value: str, pattern: re.Pattern[str], what: str) -> tuple[str, str]:
    low, _, high = value.partition("-")
    low, high = low.strip().replace(":", ""), high.strip().replace(":", "")
    for bound in (low, high):
        if bound and not pattern.match(bound):
            raise QueryError(
                f"{keyword} value '{value}' is not a {what} or a range of them (a-b, -b, a-)", keyword=keyword
            )
    return low, high


def _date_condition(keyword: str, column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    value = _LEGACY_DATE.sub(lambda m: m.group().replace(".", ""), value)
    if "-" not in value:
        _range_bounds(keyword, value, _DATE, "date (YYYYMMDD)")
        return column == value
    low, high = _range_bounds(keyword, value, _DATE, "date (YYYYMMDD)")
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= high)
    return and_(*conditions)


def _time_upper(bound: str) -> str:
    """The last time within a bound's precision: ``-1200`` includes 12:00:59.999999."""
    whole, _, fraction = bound.partition(".")
    return whole.ljust(6, "9") + "." + fraction.ljust(6, "9")


def _time_condition(keyword: str, column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    low, high = _range_bounds(keyword, value, _TIME, "time (HHMMSS.FFFFFF)")
    if "-" not in value:
        # A time matches at the precision sent: 1200 matches 120000 and 120059.5 as well as 1200.
        return and_(column >= low, column <= _time_upper(low))
    conditions = [column != ""]
    if low:
        conditions.append(column >= low)
    if high:
        conditions.append(column <= _time_upper(high))
    return and_(*conditions)


def _int_condition(keyword: str, column: ColumnElement[Any], value: str) -> ColumnElement[bool]:
    numbers: list[int] = []
    for part in value.split("\\"):
        try:
            numbers.append(int(part.strip()))
        except ValueError:
            raise QueryError(
                f"{keyword} value '{value}' is not a whole number (or a list of them)", keyword=keyword
            ) from None
    return column.in_(numbers) if len(numbers) > 1 else column == numbers[0]


def _text_condition(column: ColumnElement[Any], value: str, dialect: str, fold: bool) -> ColumnElement[bool] | None:
    """Single value, wildcard or a ``\\`` list of them (any matches)."""
    conditions: list[ColumnElement[bool]] = []
    for part in value.split("\\"):
        part = part.strip()
        if part == "" or part.strip("*") == "":
            return None  # "*" matches everything, empty values included
        if "*" in part or "?" in part:
            conditions.append(_wildcard(column, part, dialect, fold))
        elif fold:
            conditions.append(_folded_equals(column, part, dialect))
        else:
            conditions.append(column == part)
    return conditions[0] if len(conditions) == 1 else or_(*conditions)


def _multi_condition(column: ColumnElement[Any], value: str, dialect: str) -> ColumnElement[bool] | None:
    """A multi-valued attribute kept as its values joined by ``\\`` (ImageType): any stored value matches
    any value asked for (PS3.4 C.2.2.2), each alone, first, last or in between."""
    conditions: list[ColumnElement[bool]] = []
    for part in value.split("\\"):
        part = part.strip()
        if part.strip("*") == "":
            return None
        alone = _wildcard(column, part, dialect, False) if "*" in part or "?" in part else column == part
        among = [f"{part}\\*", f"*\\{part}", f"*\\{part}\\*"]
        conditions += [alone, *(_wildcard(column, p, dialect, False) for p in among)]
    return or_(*conditions)


def _uid_condition(keyword: str, column: ColumnElement[Any], value: str) -> ColumnElement[bool] | None:
    uids = [u.strip() for u in value.split("\\") if u.strip()]
    if not uids or uids == ["*"]:
        return None
    bad = [u for u in uids if "*" in u or "?" in u]
    if bad:
        raise QueryError(
            f"{keyword} value '{bad[0]}': UIDs are matched whole (single value or list), not with wildcards",
            keyword=keyword,
        )
    return column.in_(uids) if len(uids) > 1 else column == uids[0]


def _condition(keyword: str, spec: _Key, value: str, dialect: str) -> ColumnElement[bool] | None:
    """The SQL condition of one key with a value; None when it matches everything."""
    column = spec.column()
    if spec.kind == "multi":
        return _multi_condition(column, value, dialect)
    if spec.kind == "uid":
        return _uid_condition(keyword, column, value)
    if spec.kind == "date":
        return _date_condition(keyword, column, value)
    if spec.kind == "time":
        return _time_condition(keyword, column, value)
    if spec.kind == "int":
        return _int_condition(keyword, column, value)
    if spec.kind == "set":
        return _study_has(keyword, value, dialect)
    if spec.kind == "count":
        return None  # derived counts are returned, not matched
    return _text_condition(column, value, dialect, spec.kind == "pn")


def _study_has(keyword: str, value: str, dialect: str) -> ColumnElement[bool] | None:
    """ModalitiesInStudy / SOPClassesInStudy matching: any series (modality) or instance (SOP class) of the study.

    EXISTS, correlated on the study: the other keys (a date range, a patient) usually select few studies,
    each then checked through ix_series_study_fk, rather than every study that has a CT. Aliases keep it
    apart from the series and instance tables of a SERIES or IMAGE query; they and the subqueries are
    built once (module level): only the value's condition is new per query.
    """
    cond = _study_has_value(keyword, value, dialect)
    if cond is None:
        return None
    return (_HAS_MODALITY if keyword == "ModalitiesInStudy" else _HAS_SOP_CLASS).where(cond).exists()


def _study_has_value(keyword: str, value: str, dialect: str) -> ColumnElement[bool] | None:
    """The condition on the series' modality or the instance's SOP class (raises QueryError for a bad value)."""
    if keyword == "ModalitiesInStudy":
        return _text_condition(_has_series.c.modality, value, dialect, False)
    return _uid_condition(keyword, _has_instance.c.sop_class_uid, value)


_has_series, _has_instance = _series.alias("has_series"), _instance.alias("has_instance")
_HAS_MODALITY = select(_has_series.c.id).where(_has_series.c.study_fk == _study.c.id)
_HAS_SOP_CLASS = (
    select(_has_instance.c.id)
    .select_from(_has_instance.join(_has_series, _has_instance.c.series_fk == _has_series.c.id))
    .where(_has_series.c.study_fk == _study.c.id)
)


def _from(level: Level) -> FromClause:
    """The level's table joined with those above it."""
    joined: FromClause = _patient
    if level in ("STUDY", "SERIES", "IMAGE"):
        joined = joined.join(_study, _study.c.patient_fk == _patient.c.id)
    if level in ("SERIES", "IMAGE"):
        joined = joined.join(_series, _series.c.study_fk == _study.c.id)
    if level == "IMAGE":
        joined = joined.join(_instance, _instance.c.series_fk == _series.c.id)
    return joined


def _where(q: Query, dialect: str) -> list[ColumnElement[bool]]:
    conditions = []
    for keyword, value in q.keys.items():
        spec = _KEYS.get(keyword)
        if spec is None or not value.strip() or not _available(q.level, keyword):
            continue
        cond = _condition(keyword, spec, value.strip(), dialect)
        if cond is not None:
            conditions.append(cond)
    return conditions


# -- results ----------------------------------------------------------------------------------------


def _return_keys(q: Query) -> list[str]:
    """The keys each result holds: those asked for, and the unique keys of its level and those above."""
    keys = list(q.keys)
    levels = _above(q.level)
    unique = [UNIQUE[lv] for lv in levels if lv != "PATIENT" or q.root == "patient" or q.level == "PATIENT"]
    for key in unique:
        if key not in keys:
            keys.append(key)
    return keys


def _statement(q: Query, dialect: str) -> tuple[Select[Any], list[str]]:
    """The SELECT of :func:`find` (the level's id, then one column per key the index keeps) and the keys
    it leaves to :func:`_study_sets` (a study's modalities or SOP classes: one more query per batch)."""
    table = _TABLES[q.level]
    available = {k: _KEYS[k] for k in _return_keys(q) if _available(q.level, k)}
    columns = [spec.column().label(k) for k, spec in available.items() if spec.kind != "set"]
    sets = [k for k, spec in available.items() if spec.kind == "set"]
    if sets:
        columns.append(_study.c.id.label("_study"))
    stmt = select(table.c.id.label("_id"), *columns).select_from(_from(q.level)).where(*_where(q, dialect))
    stmt = stmt.order_by(table.c.id)
    if q.limit is not None:
        stmt = stmt.limit(q.limit)
    if q.offset:
        stmt = stmt.offset(q.offset)
    return stmt, sets


def count(conn: Connection, q: Query) -> int:
    """How many results :func:`find` gives (before ``limit``/``offset``)."""
    table = _TABLES[q.level]
    stmt = select(func.count(table.c.id)).select_from(_from(q.level)).where(*_where(q, conn.dialect.name))
    return int(conn.execute(stmt).scalar_one())


def plan(conn: Connection, q: Query) -> list[str]:
    """How the database runs the SELECT of :func:`find` (EXPLAIN), one line per step: which indexes it reads."""
    stmt, _sets = _statement(q, conn.dialect.name)
    sql = str(stmt.compile(conn, compile_kwargs={"literal_binds": True}))
    if conn.dialect.name == "sqlite":
        return [str(row[-1]) for row in conn.exec_driver_sql("EXPLAIN QUERY PLAN " + sql)]
    return [str(row[0]).strip() for row in conn.exec_driver_sql("EXPLAIN " + sql)]


_BATCH = 500


def find(conn: Connection, q: Query, *, retrieve_ae: str = "") -> Iterator[Dataset]:
    """One result identifier per match, in the order the index holds them (oldest first).

    Each holds SpecificCharacterSet "ISO_IR 192", QueryRetrieveLevel (DIMSE queries), the keys asked for
    (zero-length where the node keeps no value), the unique keys of its level and those above,
    RetrieveAETitle (``retrieve_ae``, when given) and InstanceAvailability "ONLINE".
    """
    layout = _layout(q, retrieve_ae)
    for values in _values(conn, q):
        yield _dataset(_row(layout, values))


def _values(conn: Connection, q: Query) -> Iterator[dict[str, Any]]:
    """The plain values of each match, by keyword (what a result identifier is built from)."""
    stmt, sets = _statement(q, conn.dialect.name)
    result = conn.execute(stmt)
    while rows := result.fetchmany(_BATCH):
        found = _study_sets(conn, sets, sorted({row._mapping["_study"] for row in rows})) if sets else {}
        for row in rows:
            values = dict(row._mapping)
            for k in sets:
                values[k] = found[k].get(values["_study"], [])
            yield values


class Matches(SequenceABC[Dataset]):
    """The matches of a query as plain values; each result identifier is built when it is asked for.

    Why not Datasets: a thousand pydicom Datasets cost far more memory and time than their values. A
    C-FIND answer is encoded straight from :meth:`elements` (``node.dicom.dimse.encode_identifier``) as
    each response is sent; QIDO-RS takes the Dataset (``matches[i]``).
    """

    def __init__(self, q: Query, retrieve_ae: str, rows: list[dict[str, Any]]) -> None:
        self.q = q
        self.rows = rows
        self._layout = _layout(q, retrieve_ae)

    def __len__(self) -> int:
        return len(self.rows)

    @overload
    def __getitem__(self, i: int) -> Dataset: ...

    @overload
    def __getitem__(self, i: slice) -> list[Dataset]: ...

    def __getitem__(self, i: int | slice) -> Dataset | list[Dataset]:
        if isinstance(i, slice):
            return [_dataset(_row(self._layout, v)) for v in self.rows[i]]
        return _dataset(_row(self._layout, self.rows[i]))

    def elements(self, i: int) -> list[Element]:
        """The result identifier of match ``i`` as (tag, VR, value), tags ascending: the same elements as ``self[i]``."""
        return _row(self._layout, self.rows[i])


def find_capped(conn: Connection, q: Query, cap: int, *, retrieve_ae: str = "") -> tuple[Matches, bool]:
    """The matches of ``q``, at most ``cap`` of them (0: no cap), and whether more matched.

    One more than ``cap`` is read to tell "more" without reading them all; a ``q.limit`` at or below the
    cap is the client's own page and never "more". ``q`` itself is not changed.
    """
    capped = cap > 0 and (q.limit is None or q.limit > cap)
    rows = list(_values(conn, replace(q, limit=cap + 1) if capped else q))
    more = capped and len(rows) > cap
    if more:
        del rows[cap:]
    return Matches(q, retrieve_ae, rows), more


def _study_sets(conn: Connection, keywords: list[str], study_ids: list[int]) -> dict[str, dict[int, list[str]]]:
    """ModalitiesInStudy / SOPClassesInStudy of these studies, in one query each."""
    out: dict[str, dict[int, list[str]]] = {}
    for keyword in keywords:
        column = _KEYS[keyword].column()
        joined: FromClause = (
            _series
            if keyword == "ModalitiesInStudy"
            else _instance.join(_series, _instance.c.series_fk == _series.c.id)
        )
        stmt = (
            select(_series.c.study_fk, column)
            .select_from(joined)
            .where(_series.c.study_fk.in_(study_ids), column != "")
            .group_by(_series.c.study_fk, column)
            .order_by(_series.c.study_fk, column)
        )
        found: dict[int, list[str]] = {}
        for study_id, value in conn.execute(stmt):
            found.setdefault(study_id, []).append(value)
        out[keyword] = found
    return out


#: Result values are the index's own (already checked when stored): pydicom's per-value regex checks
#: would cost more than the query itself for a thousand results.
_NO_CHECK = config.IGNORE


#: A result identifier's layout (:func:`_layout`): (tag, VR, keyword of the value, or None and a fixed value).
_Layout = list[tuple[int, str, str | None, Any]]

_INT_VRS = frozenset({"IS", "US", "UL", "SL", "SS"})


def _layout(q: Query, retrieve_ae: str) -> _Layout:
    """What every result of ``q`` holds, tags ascending: SpecificCharacterSet, QueryRetrieveLevel (DIMSE), the
    keys asked for and the unique keys, RetrieveAETitle (when given), InstanceAvailability."""
    out: _Layout = [(_CHARSET_TAG, "CS", None, CHARSET), (_AVAILABILITY_TAG, "CS", None, "ONLINE")]
    if q.origin == "dimse":
        out.append((_LEVEL_TAG, "CS", None, q.level))
    if retrieve_ae:
        out.append((_RETRIEVE_AE_TAG, "AE", None, retrieve_ae))
    for keyword in _return_keys(q):
        if keyword in _RESULT_ONLY:
            continue
        tag = tag_for_keyword(keyword)
        assert tag is not None
        out.append((tag, _vr(keyword), keyword, None))
    return sorted(out, key=lambda e: e[0])


def _row(layout: _Layout, values: Mapping[str, Any]) -> list[Element]:
    """One result's elements from its values: empty for a value the index does not keep, integers as such."""
    out: list[Element] = []
    for tag, vr, keyword, fixed in layout:
        if keyword is None:
            out.append((tag, vr, fixed))
            continue
        value = values.get(keyword)
        if vr == "SQ" or value == "" or value == []:
            value = None
        elif value is not None and vr in _INT_VRS:
            value = int(value)
        out.append((tag, vr, value))
    return out


def _dataset(elements: list[Element]) -> Dataset:
    ds = Dataset()
    for tag, vr, value in elements:
        if vr == "SQ":
            ds[tag] = DataElement(tag, vr, DicomSequence([]), validation_mode=_NO_CHECK)
        else:
            ds[tag] = DataElement(tag, vr, value, validation_mode=_NO_CHECK)
    return ds


_CHARSET_TAG = 0x00080005
_LEVEL_TAG = 0x00080052
_RETRIEVE_AE_TAG = 0x00080054
_AVAILABILITY_TAG = 0x00080056


def check_retrieve(q: Query) -> None:
    """Refuse a C-MOVE or C-GET identifier without the unique keys of its level and the levels above.

    PS3.4 C.4.2.2.1 (no relational retrieve negotiated): a retrieve names what it wants by unique key,
    one value per level above and one or a list at its own level (Study Root has no patient level). An
    empty or wildcard key would be universal matching and retrieve the whole archive: QueryError (0xA900)
    naming the key instead.
    """
    levels = [lv for lv in _above(q.level) if lv != "PATIENT" or q.root == "patient"]
    for lv in levels:
        key = UNIQUE[lv]
        value = q.keys.get(key, "").strip()
        if not value or "*" in value or "?" in value:
            raise QueryError(f"retrieve at {q.level} level needs {key} (no wildcard)", keyword=key)
        if lv != q.level and "\\" in value:
            raise QueryError(f"retrieve at {q.level} level needs one {key}, not a list", keyword=key)


def instances(conn: Connection, q: Query) -> list[InstanceRef]:
    """Every stored instance under the matches of ``q`` (what a C-MOVE, C-GET or WADO-RS sends), by series."""
    stmt = (
        select(
            _study.c.study_instance_uid,
            _series.c.series_instance_uid,
            _instance.c.sop_instance_uid,
            _instance.c.sop_class_uid,
            _instance.c.transfer_syntax_uid,
            _instance.c.file_path,
            _instance.c.file_size,
            _instance.c.id,
        )
        .select_from(_from("IMAGE"))
        .where(*_where(q, conn.dialect.name))
        .order_by(_series.c.id, _instance.c.instance_number, _instance.c.id)
    )
    return [InstanceRef(*row) for row in conn.execute(stmt)]
