"""The read model: what people see of the index, in one place for the command line, the dashboard, the API and metrics.

Every function here only reads (give it the node's read-only engine) and returns typed rows
(frozen dataclasses with UTC datetimes), never ORM objects or dicts: ``dicom-node status``,
``dicom-node jobs``, ``dicom-node queue``, the dashboard, the REST API and the Prometheus gauges
count and list the same things the same way. The web layer turns a row into JSON
(:func:`node.web.data.jsonable`); the API's models are that JSON's schema.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any, Generic, Self, TypeVar

from sqlalchemy import ColumnElement, Connection, Engine, and_, func, or_, select

from node.index import cluster
from node.index.cluster import ProcessRow
from node.index.models import Delivery, Instance, Job, Patient, Series, Study, aware, utcnow
from node.index.states import CommitmentState, DeliveryState, JobState, SeriesState

__all__ = [
    "AWAITING_COMMITMENT",
    "COMMITTED",
    "SERIES_COLUMNS",
    "SERIES_JOIN",
    "DeliveryGroup",
    "DeliveryRow",
    "DestinationQueue",
    "IndexSummary",
    "JobDetail",
    "JobRow",
    "Page",
    "ProcessRow",
    "SeriesRow",
    "StateCounts",
    "changes",
    "deliveries",
    "delivery_counts",
    "DeliveryQuery",
    "delivery_groups",
    "delivery_selection",
    "destinations",
    "job",
    "jobs",
    "node_processes",
    "received_and_sent",
    "search_condition",
    "series",
    "series_jobs",
    "state_counts",
    "summary",
]

_s, _st, _p, _i, _j, _d = (m.__table__ for m in (Series, Study, Patient, Instance, Job, Delivery))

#: How delivered instances are counted apart, by their storage commitment, in a destination's counts.
AWAITING_COMMITMENT = "awaiting commitment"
COMMITTED = "committed"

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing and how many rows the whole listing has."""

    total: int
    items: list[T]


def _aware(value: dt.datetime | None) -> dt.datetime | None:
    return aware(value) if value is not None else None


def _values(row_type: type[Any], r: Any, **given: Any) -> dict[str, Any]:
    """The fields of the row dataclass ``row_type``, read by name from the result row ``r`` (times made
    timezone-aware: the database may hand them back naive), except those ``given``."""

    def value(name: str) -> Any:
        v = getattr(r, name)
        return aware(v) if isinstance(v, dt.datetime) else v

    return {f.name: given[f.name] if f.name in given else value(f.name) for f in dataclasses.fields(row_type)}


# --- counts -----------------------------------------------------------------------------------------


def delivery_counts(engine: Engine) -> dict[str, dict[str, int]]:
    """{destination: {state: count}}; delivered ones awaiting or with a storage commitment counted apart
    (as :data:`AWAITING_COMMITMENT` and :data:`COMMITTED`), only the states that occur."""
    out: dict[str, dict[str, int]] = {}
    with engine.connect() as conn:
        for dest, state, commitment, n in conn.execute(
            select(_d.c.destination, _d.c.state, _d.c.commitment, func.count()).group_by(
                _d.c.destination, _d.c.state, _d.c.commitment
            )
        ):
            key = state
            if state == DeliveryState.DELIVERED and commitment == CommitmentState.REQUESTED:
                key = AWAITING_COMMITMENT
            elif state == DeliveryState.DELIVERED and commitment == CommitmentState.COMMITTED:
                key = COMMITTED
            counts = out.setdefault(dest, {})
            counts[key] = counts.get(key, 0) + int(n)
    return out


def _by_state(engine: Engine, column: Any, states: type[SeriesState] | type[JobState]) -> dict[str, int]:
    """Every state of the enum (0 where none), then any other value found."""
    with engine.connect() as conn:
        found = {str(k): int(v) for k, v in conn.execute(select(column, func.count()).group_by(column))}
    return {str(s): 0 for s in states} | found


@dataclass(frozen=True)
class StateCounts:
    """Series by tracker state, jobs by state (every state, 0 where none) and the forward queue's counts."""

    series: dict[str, int]
    jobs: dict[str, int]
    #: :func:`delivery_counts`.
    deliveries: dict[str, dict[str, int]]

    def delivery_states(self, destination: str) -> dict[str, int]:
        """A destination's deliveries by :class:`DeliveryState` alone (every state; delivered whatever the commitment)."""
        counts = self.deliveries.get(destination, {})
        out = {str(s): counts.get(s, 0) for s in DeliveryState}
        out[DeliveryState.DELIVERED] += counts.get(AWAITING_COMMITMENT, 0) + counts.get(COMMITTED, 0)
        return out


def state_counts(engine: Engine) -> StateCounts:
    """A few GROUP BYs on indexed columns: cheap enough for every metrics scrape."""
    return StateCounts(
        _by_state(engine, _s.c.state, SeriesState), _by_state(engine, _j.c.state, JobState), delivery_counts(engine)
    )


@dataclass(frozen=True)
class IndexSummary:
    """What the index holds: the overview of ``dicom-node status`` and the dashboard."""

    patients: int
    studies: int
    series: int
    instances: int
    #: Instances this node produced (SEG, SC, ...).
    outputs: int
    stored_bytes: int
    states: StateCounts


def summary(engine: Engine) -> IndexSummary:
    with engine.connect() as conn:
        patients, studies, n_series = (
            int(conn.execute(select(func.count()).select_from(t)).scalar_one()) for t in (_p, _st, _s)
        )
        instances, size = conn.execute(select(func.count(), func.coalesce(func.sum(_i.c.file_size), 0))).one()
        outputs = conn.execute(select(func.count()).where(_i.c.job_fk.is_not(None))).scalar_one()
    return IndexSummary(patients, studies, n_series, int(instances), int(outputs), int(size), state_counts(engine))


def node_processes(engine: Engine) -> list[ProcessRow]:
    """The node processes working on this index, and those that died and whose work is not reconciled yet."""
    now = utcnow()
    return [p for p in cluster.processes(engine) if p.alive(now) or (p.stopped_at is None and p.recovered_at is None)]


def received_and_sent(engine: Engine) -> tuple[int, int]:
    """(the highest instance id, deliveries delivered): running totals for the dashboard's rates."""
    with engine.connect() as conn:
        received = conn.execute(select(func.coalesce(func.max(_i.c.id), 0))).scalar_one()
        sent = conn.execute(select(func.count()).where(_d.c.state == DeliveryState.DELIVERED)).scalar_one()
    return int(received), int(sent)


@dataclass(frozen=True)
class DestinationQueue:
    """One destination's part of the forward queue."""

    destination: str
    #: :func:`delivery_counts` of this destination.
    states: dict[str, int]
    #: When the oldest still-queued delivery was queued, and when the next attempt is due.
    oldest_queued: dt.datetime | None
    next_attempt: dt.datetime | None
    #: The newest error among queued or failed deliveries.
    last_error: str


def destinations(engine: Engine) -> list[DestinationQueue]:
    """Per destination ever queued for: counts by state, the queue's age, its next attempt, its newest error."""
    states = delivery_counts(engine)
    out = []
    with engine.connect() as conn:
        for dest in sorted(states):
            oldest, nxt = conn.execute(
                select(func.min(_d.c.created_at), func.min(_d.c.next_attempt_at)).where(
                    _d.c.destination == dest, _d.c.state == DeliveryState.QUEUED
                )
            ).one()
            err = conn.execute(
                select(_d.c.last_error)
                .where(
                    _d.c.destination == dest,
                    _d.c.state.in_((DeliveryState.QUEUED, DeliveryState.FAILED)),
                    _d.c.last_error != "",
                )
                .order_by(_d.c.updated_at.desc())
                .limit(1)
            ).scalar()
            out.append(DestinationQueue(dest, states[dest], _aware(oldest), _aware(nxt), err or ""))
    return out


# --- series ---------------------------------------------------------------------------------------

#: The columns of a :class:`StudyKeys`, over study JOIN patient.
STUDY_KEY_COLUMNS = (
    _st.c.study_instance_uid,
    _st.c.study_date,
    _st.c.study_description,
    _st.c.accession_number,
    _p.c.patient_name,
    _p.c.patient_id,
)
#: The columns of a :class:`SeriesRow` (and the series' id), over series JOIN study JOIN patient.
SERIES_COLUMNS = (
    _s.c.id,
    _s.c.series_instance_uid,
    _s.c.modality,
    _s.c.series_number,
    _s.c.series_description,
    _s.c.instance_count,
    _s.c.state,
    _s.c.revision,
    _s.c.first_received_at,
    _s.c.last_received_at,
    *STUDY_KEY_COLUMNS,
)
#: What a job or a delivery listing shows of its series, over :data:`SERIES_JOIN`.
SERIES_ABOUT = (
    _s.c.series_instance_uid,
    _s.c.modality,
    _s.c.series_description,
    _st.c.study_date,
    _p.c.patient_name,
    _p.c.patient_id,
)
#: series JOIN study JOIN patient.
SERIES_JOIN = _s.join(_st, _st.c.id == _s.c.study_fk).join(_p, _p.c.id == _st.c.patient_fk)


@dataclass(frozen=True)
class StudyKeys:
    """What names a study for people: its patient, date, description, accession."""

    study_instance_uid: str
    study_date: str
    study_description: str
    accession_number: str
    patient_name: str
    patient_id: str

    @staticmethod
    def values(r: Any) -> dict[str, Any]:
        """The keys from a result row selecting at least :data:`STUDY_KEY_COLUMNS`."""
        return _values(StudyKeys, r)


@dataclass(frozen=True)
class SeriesRow(StudyKeys):
    """A series as listed: the study and patient it belongs to, what it is, where the tracker is."""

    series_instance_uid: str
    modality: str
    series_number: int | None
    series_description: str
    instance_count: int
    state: str
    revision: int
    first_received_at: dt.datetime | None
    last_received_at: dt.datetime | None

    @classmethod
    def of(cls, r: Any) -> SeriesRow:
        """From a result row selecting at least :data:`SERIES_COLUMNS`."""
        return cls(**_values(cls, r))


def search_condition(q: str, *, series: bool = True) -> ColumnElement[bool]:
    """Patient name or ID, accession or description containing ``q`` (literally: % and _ are not wildcards),
    or a study (or series) UID equal to it."""
    cond = [
        _p.c.patient_name.icontains(q, autoescape=True),
        _p.c.patient_id.icontains(q, autoescape=True),
        _st.c.accession_number.icontains(q, autoescape=True),
        _st.c.study_description.icontains(q, autoescape=True),
        _st.c.study_instance_uid == q,
    ]
    if series:
        cond += [_s.c.series_description.icontains(q, autoescape=True), _s.c.series_instance_uid == q]
    return or_(*cond)


def series(
    engine: Engine,
    *,
    q: str = "",
    state: str = "",
    modality: str = "",
    study_uid: str = "",
    limit: int = 50,
    offset: int = 0,
) -> Page[SeriesRow]:
    """Series, most recently received first."""
    cond = []
    if q:
        cond.append(search_condition(q))
    if state:
        cond.append(_s.c.state == state)
    if modality:
        cond.append(_s.c.modality == modality)
    if study_uid:
        cond.append(_st.c.study_instance_uid == study_uid)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(SERIES_JOIN).where(*cond)).scalar_one()
        rows = conn.execute(
            select(*SERIES_COLUMNS)
            .select_from(SERIES_JOIN)
            .where(*cond)
            .order_by(_s.c.last_received_at.desc(), _s.c.id.desc())
            .limit(limit)
            .offset(offset)
        ).all()
    return Page(int(total), [SeriesRow.of(r) for r in rows])


# --- jobs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class JobRow:
    """A job as listed (the dashboard, the API, ``dicom-node jobs``)."""

    id: int
    series_instance_uid: str
    modality: str
    revision: int
    rule: str
    action_index: int
    kind: str
    state: str
    attempts: int
    max_attempts: int
    software: str
    result: str
    last_error: str
    created_at: dt.datetime | None
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    #: What names the job's series for people (as the series list shows them).
    series_description: str
    study_date: str
    patient_name: str
    patient_id: str

    @property
    def detail(self) -> str:
        """What people want to know of it: its result once it succeeded, else its last error."""
        return self.result if self.state == JobState.SUCCEEDED else self.last_error

    @classmethod
    def of(cls, r: Any) -> Self:
        """From a row of :func:`_job_select`."""
        return cls(**_values(cls, r))


@dataclass(frozen=True)
class JobDetail(JobRow):
    """Everything about one job (``dicom-node jobs show``, ``GET /api/jobs/{id}``)."""

    #: The rule action this job runs, as JSON (as configured when the job was made).
    action: str = ""
    priority: int = 0
    not_before: dt.datetime | None = None
    #: 1 as the rules made it; 2, 3, ... for an operator's reruns of the same (revision, rule, action).
    run: int = 1


def _job_select() -> Any:
    return select(_j, *SERIES_ABOUT).select_from(SERIES_JOIN.join(_j, _j.c.series_fk == _s.c.id))


def jobs(engine: Engine, *, state: str = "", series_uid: str = "", limit: int = 50, offset: int = 0) -> Page[JobRow]:
    """Jobs, newest first."""
    cond = []
    if state:
        cond.append(_j.c.state == state)
    if series_uid:
        cond.append(_s.c.series_instance_uid == series_uid)
    with engine.connect() as conn:
        total = conn.execute(
            select(func.count()).select_from(_j.join(_s, _s.c.id == _j.c.series_fk)).where(*cond)
        ).scalar_one()
        rows = conn.execute(_job_select().where(*cond).order_by(_j.c.id.desc()).limit(limit).offset(offset)).all()
    return Page(int(total), [JobRow.of(r) for r in rows])


def series_jobs(engine: Engine, series_id: int) -> list[JobRow]:
    """The jobs of one series (by its id), oldest first."""
    with engine.connect() as conn:
        rows = conn.execute(_job_select().where(_j.c.series_fk == series_id).order_by(_j.c.id)).all()
    return [JobRow.of(r) for r in rows]


def job(engine: Engine, job_id: int) -> JobDetail | None:
    """One job, or None when there is none with that number."""
    with engine.connect() as conn:
        r = conn.execute(_job_select().where(_j.c.id == job_id)).first()
    if r is None:
        return None
    return JobDetail.of(r)


# --- deliveries ---------------------------------------------------------------------------------------


def delivery_selection(
    destination: str | None, state: str | None, ids: Sequence[int] | None, series_uid: str | None
) -> ColumnElement[bool] | None:
    """The condition on delivery rows that the CLI, the API and the dashboard select by (None: all)."""
    cond = []
    if destination:
        cond.append(_d.c.destination == destination)
    if state:
        cond.append(_d.c.state == state)
    if ids:
        cond.append(_d.c.id.in_(list(ids)))
    if series_uid:
        cond.append(_d.c.series_fk.in_(select(_s.c.id).where(_s.c.series_instance_uid == series_uid)))
    return and_(*cond) if cond else None


@dataclass(frozen=True)
class DeliveryRow:
    """One instance's delivery to one destination (the dashboard, the API, ``dicom-node queue --state``)."""

    id: int
    destination: str
    state: str
    #: A :class:`~node.index.states.CommitmentState`.
    commitment: str
    attempts: int
    #: Only while it is queued.
    next_attempt_at: dt.datetime | None
    #: The DIMSE status of the last attempt (None: no response).
    last_status: int | None
    last_error: str
    warning: str
    sop_instance_uid: str
    series_instance_uid: str
    created_at: dt.datetime | None
    updated_at: dt.datetime | None
    delivered_at: dt.datetime | None

    @property
    def state_text(self) -> str:
        """Its state for people, with the storage commitment where one was asked for."""
        if not self.commitment:
            return self.state
        commitment = AWAITING_COMMITMENT if self.commitment == CommitmentState.REQUESTED else self.commitment
        return f"{self.state} ({commitment})"

    @classmethod
    def of(cls, d: Any) -> DeliveryRow:
        """From a delivery row that also selects its series' ``series_instance_uid``."""
        return cls(
            **_values(cls, d, next_attempt_at=_aware(d.next_attempt_at) if d.state == DeliveryState.QUEUED else None)
        )


@dataclass(frozen=True)
class DeliveryQuery:
    """Which deliveries a listing shows ("" = any) and which page: what the CLI's queue, the API and the
    dashboard ask :func:`deliveries` and :func:`delivery_groups` for, so both read the filters alike."""

    destination: str = ""
    state: str = ""
    series_uid: str = ""
    limit: int = 50
    offset: int = 0

    def where(self) -> list[ColumnElement[bool]]:
        """The condition on delivery rows, as a list for ``.where(*...)`` (empty: all)."""
        sel = delivery_selection(self.destination or None, self.state or None, None, self.series_uid or None)
        return [] if sel is None else [sel]


def deliveries(engine: Engine, query: DeliveryQuery | None = None) -> Page[DeliveryRow]:
    """Deliveries, newest first (all, first page: no ``query``)."""
    query = query or DeliveryQuery()
    cond = query.where()
    base = _d.join(_s, _s.c.id == _d.c.series_fk)
    with engine.connect() as conn:
        total = conn.execute(select(func.count()).select_from(base).where(*cond)).scalar_one()
        rows = conn.execute(
            select(_d, _s.c.series_instance_uid)
            .select_from(base)
            .where(*cond)
            .order_by(_d.c.id.desc())
            .limit(query.limit)
            .offset(query.offset)
        ).all()
    return Page(int(total), [DeliveryRow.of(r) for r in rows])


@dataclass(frozen=True)
class DeliveryGroup:
    """A series' deliveries to one destination (the deliveries page, ``GET /api/deliveries?group=series``)."""

    series_instance_uid: str
    modality: str
    series_description: str
    study_date: str
    patient_name: str
    patient_id: str
    destination: str
    #: Deliveries by :class:`DeliveryState` (only the states that occur).
    states: dict[str, int]
    total: int
    #: The newest error among its queued or failed deliveries.
    last_error: str
    #: When one of its deliveries last changed (an attempt, a retry, a cancel).
    last_attempt_at: dt.datetime | None
    #: Only while some are queued: when the next attempt is due.
    next_attempt_at: dt.datetime | None


def delivery_groups(engine: Engine, query: DeliveryQuery | None = None) -> Page[DeliveryGroup]:
    """Deliveries per (series, destination), the newest series first; ``limit``, ``offset`` and the total
    count series (each brings its destinations). ``state`` keeps the groups with a delivery in that state
    (their counts still show every state).

    Paged by series so that a page costs index look-ups (the delivery table's series index), not a
    grouping of every delivery: the dashboard fetches it again whenever the data changes.
    """
    query = query or DeliveryQuery()
    cond, destination = query.where(), query.destination
    with engine.connect() as conn:
        total = conn.execute(select(func.count(func.distinct(_d.c.series_fk))).where(*cond)).scalar_one()
        series_ids = list(
            conn.execute(
                select(_d.c.series_fk)
                .where(*cond)
                .distinct()
                .order_by(_d.c.series_fk.desc())
                .limit(query.limit)
                .offset(query.offset)
            ).scalars()
        )
        if not series_ids:
            return Page(int(total), [])
        wanted = [_d.c.series_fk.in_(series_ids)] + ([_d.c.destination == destination] if destination else [])
        counts: dict[tuple[int, str], dict[str, int]] = {}
        times: dict[tuple[int, str], tuple[Any, Any]] = {}
        for fk, dest, st, n, last, due in conn.execute(
            select(
                _d.c.series_fk,
                _d.c.destination,
                _d.c.state,
                func.count(),
                func.max(_d.c.updated_at),
                func.min(_d.c.next_attempt_at),
            )
            .where(*wanted)
            .group_by(_d.c.series_fk, _d.c.destination, _d.c.state)
        ):
            counts.setdefault((fk, dest), {})[st] = int(n)
            was_last, was_due = times.get((fk, dest), (None, None))
            last = aware(last) if last is not None else None
            due = aware(due) if due is not None and st == DeliveryState.QUEUED else None
            times[(fk, dest)] = (max(filter(None, (was_last, last)), default=None), due or was_due)
        newest_error = (
            select(
                _d.c.series_fk,
                _d.c.destination,
                _d.c.last_error,
                func.row_number()
                .over(
                    partition_by=(_d.c.series_fk, _d.c.destination), order_by=(_d.c.updated_at.desc(), _d.c.id.desc())
                )
                .label("n"),
            )
            .where(
                *wanted,
                _d.c.state.in_((DeliveryState.QUEUED, DeliveryState.FAILED)),
                _d.c.last_error != "",
            )
            .subquery()
        )
        errors = {
            (fk, dest): err
            for fk, dest, err in conn.execute(
                select(newest_error.c.series_fk, newest_error.c.destination, newest_error.c.last_error).where(
                    newest_error.c.n == 1
                )
            )
        }
        about = {
            r.id: r
            for r in conn.execute(
                select(_s.c.id, *SERIES_ABOUT).select_from(SERIES_JOIN).where(_s.c.id.in_(series_ids))
            )
        }
    items = []
    for (fk, dest), states in sorted(counts.items(), key=lambda kv: (-kv[0][0], kv[0][1])):
        if query.state and query.state not in states:
            continue
        s = about[fk]
        last_attempt, next_attempt = times[(fk, dest)]
        items.append(
            DeliveryGroup(
                series_instance_uid=s.series_instance_uid,
                modality=s.modality,
                series_description=s.series_description,
                study_date=s.study_date,
                patient_name=s.patient_name,
                patient_id=s.patient_id,
                destination=dest,
                states=states,
                total=sum(states.values()),
                last_error=errors.get((fk, dest), ""),
                last_attempt_at=last_attempt,
                next_attempt_at=next_attempt,
            )
        )
    return Page(int(total), items)


# --- changes ------------------------------------------------------------------------------------------


def changes(engine: Engine) -> str:
    """A short fingerprint of what the dashboard shows: it changes when an instance arrives, a series'
    state, a job's or a delivery's state changes, or something is deleted.

    Cheap: the highest ids (index look-ups) and the counts by state (each covered by an index); a page
    polls it every few seconds and fetches its data again only when it changed. A storage commitment's
    answer alone does not change it (the delivery's state stays delivered).
    """
    import hashlib

    with engine.connect() as conn:
        maxes = conn.execute(
            select(
                select(func.coalesce(func.max(_i.c.id), 0)).scalar_subquery(),
                select(func.coalesce(func.max(_j.c.id), 0)).scalar_subquery(),
                select(func.coalesce(func.max(_d.c.id), 0)).scalar_subquery(),
                select(func.count()).select_from(_s).scalar_subquery(),
            )
        ).one()
        # By destination and state only: an index covers it (with the commitment it is a table scan).
        deliveries = sorted(
            conn.execute(select(_d.c.destination, _d.c.state, func.count()).group_by(_d.c.destination, _d.c.state))
            .tuples()
            .all()
        )
    parts = [*map(int, maxes), deliveries]
    parts += [
        sorted(_by_state(engine, _s.c.state, SeriesState).items()),
        sorted(_by_state(engine, _j.c.state, JobState).items()),
    ]
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:16]


# -- study rules --------------------------------------------------------------------------------------------


def study_waiting(conn: Connection, study_uid: str, rules: Collection[str]) -> list[tuple[str, str]]:
    """The study rules waiting for a study, and what for: ``[(rule, "waiting for ct_contrast"), ...]``.

    As the series tracker found at the study's last evaluation (node.decide.study writes it whenever a
    series of the study triggers, and at the end of a quiet period a rule waits for); [] when none waits.
    Only ``rules`` (the enabled study rules of the running config) count: a rule removed or disabled since
    that evaluation waits for nothing, and the study may never be evaluated again to say so.
    """
    raw = conn.execute(select(Study.study_rules_waiting).where(Study.study_instance_uid == study_uid)).scalar()
    current = set(rules)
    return sorted((rule, why) for rule, why in json.loads(raw).items() if rule in current) if raw else []
