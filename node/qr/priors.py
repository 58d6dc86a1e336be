"""Prior studies from a PACS: find them (C-FIND, study level), retrieve them (C-MOVE to this node), hand them over.

A plugin action with ``priors = { from = "pacs", ... }`` (node.jobs.spec.PriorsRequest) calls
:func:`fetch_priors` before its job takes a plugin slot. It asks the ``[[sources]]`` entry for the
patient's other studies (same PatientID, and whatever else ``same`` names; Study Date within
``within_days`` before the new study; the modality in Modalities in Study), keeps the newest ``max``, and
retrieves each one the node does not hold yet. Before a retrieve starts, a ``prior_fetch`` row names the
study: the series tracker reads it and evaluates no rule for the series that arrive (they are never
forwarded and make no job of their own), and retention keeps them per ``[retention] priors``.

The source may be down or refuse: the job is then not failed but put back with a back-off
(:class:`PriorsWaiting`, the runner's deferral: no attempt is spent, nothing held while it waits), until
``timeout`` after the job was made; then :class:`PriorsFailed` with the last reason. Everything needed
to resume is in the index (the job's creation time, the prior_fetch rows), so a restart while waiting
just runs the job again when it is due.

The SCU side uses pynetdicom (the node's own acceptor receives what the C-MOVE sends).
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import IntegrityError

from node import audit
from node.config import Config, SourceSection
from node.index.models import Instance, Job, Patient, PriorFetch, Series, Study, aware, utcnow

log = logging.getLogger(__name__)

#: Modalities of series that are not images a plugin can load (objects made from images, documents).
NOT_IMAGES = frozenset({"SEG", "SR", "KO", "PR", "RTSTRUCT", "RTPLAN", "RTDOSE", "RTRECORD", "DOC", "REG", "OT"})
#: After a C-MOVE ended, how long the node waits for the instances it reported to be indexed (they are
#: answered only once durable, so this is a short safety margin, not a poll for slow data).
INDEX_GRACE = 10.0

_pf, _i, _s, _st, _p, _j = (
    PriorFetch.__table__,
    Instance.__table__,
    Series.__table__,
    Study.__table__,
    Patient.__table__,
    Job.__table__,
)


class PriorsWaiting(Exception):
    """The source could not answer now; try again at ``retry_at`` (the job's timeout is not reached)."""

    def __init__(self, message: str, retry_at: dt.datetime) -> None:
        super().__init__(message)
        self.retry_at = retry_at


class PriorsFailed(Exception):
    """The priors cannot be had: the source kept failing until the job's timeout, or none exists (not optional)."""


class SourceError(Exception):
    """One query or retrieve that failed (source down, refused, a failure status), worded for the operator."""


@dataclass(frozen=True)
class FoundStudy:
    """A study the source reported."""

    study_uid: str
    study_date: str
    description: str = ""
    modalities: str = ""
    #: Number of Study Related Instances, when the source gives it.
    instances: int | None = None


@dataclass
class Prior:
    """A prior as the worker gets it (``WorkSpec.priors``): newest first, each series a list of file paths."""

    study_uid: str
    study_date: str
    series: list[list[str]] = field(default_factory=list)

    def as_spec(self) -> dict[str, Any]:
        return {"study_uid": self.study_uid, "study_date": self.study_date, "series": self.series}


@dataclass(frozen=True)
class CurrentStudy:
    """What the new study tells about the patient: the query keys."""

    study_uid: str
    study_date: str
    patient: dict[str, str]


# -- the network (pynetdicom SCU) ------------------------------------------------------------------------


def _where(src: SourceSection) -> str:
    return f"source {src.name!r} ({src.ae_title} at {src.host}:{src.port})"


@contextmanager
def _association(src: SourceSection, calling_ae: str, context: str, timeout: float) -> Iterator[Any]:
    """An association to the source proposing one Q/R model; SourceError (naming why) when there is none."""
    from pynetdicom import AE, evt

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = src.timeout
    ae.network_timeout = timeout
    ae.dimse_timeout = timeout
    ae.connection_timeout = src.timeout
    ae.add_requested_context(context)
    opened: list[bool] = []  # pynetdicom reports a refused connection as an abort: tell them apart
    assoc = ae.associate(
        src.host, src.port, ae_title=src.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, lambda _e: opened.append(True))]
    )
    if not assoc.is_established:
        if not opened:
            why = "no connection (refused or unreachable: is it running, are host and port right?)"
        elif assoc.is_rejected:
            why = f"it rejected the association (calling AE {calling_ae}: does it know this node's AE title?)"
        else:
            why = "it aborted the association request, or did not answer it"
        raise SourceError(f"{_where(src)}: {why}")
    try:
        yield assoc
    finally:
        if assoc.is_established:
            assoc.release()


def _text(value: Any) -> str:
    """A (possibly multi-valued) element value as DICOM writes it: values joined by backslashes."""
    if isinstance(value, MultiValue | list | tuple):
        return "\\".join(str(v) for v in value)
    return str(value or "")


def _hint(status: Dataset | None, calling_ae: str) -> str:
    """Why a source may not answer at all: many PACS (Orthanc among them) drop a request from an AE they do
    not know instead of answering it with a failure status."""
    if status is not None and "Status" in status:
        return ""
    return f"; does the source allow this node's AE title {calling_ae} to query and retrieve (its modalities)?"


def _status_text(status: Dataset | None) -> str:
    if status is None or "Status" not in status:
        return "no response (timed out or the association was lost)"
    comment = f" ({status.ErrorComment})" if "ErrorComment" in status else ""
    return f"status 0x{int(status.Status):04X}{comment}"


def find_studies(
    src: SourceSection, calling_ae: str, keys: dict[str, str], date_range: str, modality: str
) -> list[FoundStudy]:
    """C-FIND (Study Root, study level) for the patient's studies; raises SourceError."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind as FIND  # type: ignore[attr-defined]

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    for keyword, value in keys.items():
        setattr(q, keyword, value)
    q.StudyInstanceUID = ""
    q.StudyDate = date_range
    q.StudyDescription = ""
    q.ModalitiesInStudy = modality
    q.NumberOfStudyRelatedInstances = ""
    found: list[FoundStudy] = []
    with _association(src, calling_ae, FIND, src.timeout) as assoc:
        final = None
        for status, identifier in assoc.send_c_find(q, FIND):
            final = status
            if status is None or "Status" not in status:
                break
            if int(status.Status) in (0xFF00, 0xFF01) and identifier is not None:
                uid = str(identifier.get("StudyInstanceUID", "") or "")
                if not uid:
                    continue
                n = identifier.get("NumberOfStudyRelatedInstances", None)
                mods = identifier.get("ModalitiesInStudy", "")
                found.append(
                    FoundStudy(
                        uid,
                        str(identifier.get("StudyDate", "") or ""),
                        str(identifier.get("StudyDescription", "") or ""),
                        _text(mods),
                        int(n) if n not in (None, "") else None,
                    )
                )
        if final is None or "Status" not in final or int(final.Status) != 0x0000:
            raise SourceError(f"{_where(src)}: the C-FIND ended with {_status_text(final)}{_hint(final, calling_ae)}")
    return found


@dataclass(frozen=True)
class Moved:
    completed: int
    failed: int
    warning: int


def move_study(src: SourceSection, calling_ae: str, study_uid: str) -> Moved:
    """C-MOVE (Study Root) of one study to this node's AE title (``calling_ae``); raises SourceError."""
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove as MOVE  # type: ignore[attr-defined]

    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    with _association(src, calling_ae, MOVE, src.retrieve_timeout) as assoc:
        final = None
        for status, _identifier in assoc.send_c_move(q, calling_ae, MOVE):
            final = status
            if status is None or "Status" not in status:
                break
    return _retrieved(src, "C-MOVE", study_uid, calling_ae, final)


def _retrieved(src: SourceSection, what: str, study_uid: str, calling_ae: str, final: Dataset | None) -> Moved:
    """The sub-operation counts of a C-MOVE's or C-GET's final response; SourceError unless every one worked."""
    if final is None or "Status" not in final:
        raise SourceError(
            f"{_where(src)}: the {what} of study {study_uid} got {_status_text(final)}{_hint(final, calling_ae)}"
        )
    code = int(final.Status)
    moved = Moved(
        int(final.get("NumberOfCompletedSuboperations", 0) or 0),
        int(final.get("NumberOfFailedSuboperations", 0) or 0),
        int(final.get("NumberOfWarningSuboperations", 0) or 0),
    )
    if code == 0xA801:
        raise SourceError(
            f"{_where(src)} does not know the move destination {calling_ae} (0xA801): add this node's AE title, "
            'host and port to the source\'s modalities (or set retrieve = "get")'
        )
    if code not in (0x0000, 0xB000):
        route = (
            f"; a C-MOVE sends the study to this node's AE title {calling_ae}: the source's entry for it must "
            'name this node\'s host and DICOM port (or set retrieve = "get")'
            if what == "C-MOVE"
            else ""
        )
        raise SourceError(
            f"{_where(src)}: the {what} of study {study_uid} ended with {_status_text(final)} "
            f"({moved.completed} stored, {moved.failed} failed){route}"
        )
    if moved.failed:
        raise SourceError(
            f"{_where(src)}: the {what} of study {study_uid} stored {moved.completed} instance(s) but "
            f"{moved.failed} failed ({_status_text(final)})"
        )
    return moved


#: Answers a C-STORE sub-operation of a C-GET: (SOP Class UID, SOP Instance UID, transfer syntax, data set
#: bytes as received) -> the status to answer (stored through the node's C-STORE write path).
StoreOne = Callable[[str, str, str, bytes], int]


def get_study(src: SourceSection, calling_ae: str, study_uid: str, store: StoreOne) -> Moved:
    """C-GET (Study Root) of one study on our own association; each instance goes to ``store``. SourceError."""
    from pynetdicom import AE, StoragePresentationContexts, build_role, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet as GET  # type: ignore[attr-defined]

    def on_store(event: Any) -> int:
        return store(
            str(event.request.AffectedSOPClassUID),
            str(event.request.AffectedSOPInstanceUID),
            str(event.context.transfer_syntax),
            event.request.DataSet.getvalue(),
        )

    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = src.timeout
    ae.connection_timeout = src.timeout
    ae.network_timeout = ae.dimse_timeout = src.retrieve_timeout
    ae.add_requested_context(GET)
    # 120 storage classes + the C-GET model fit the 128 contexts an association may propose.
    roles: list[Any] = []
    for cx in StoragePresentationContexts:
        ae.add_requested_context(str(cx.abstract_syntax))
        roles.append(build_role(str(cx.abstract_syntax), scp_role=True))
    opened: list[bool] = []
    assoc = ae.associate(
        src.host,
        src.port,
        ae_title=src.ae_title,
        ext_neg=roles,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_CONN_OPEN, lambda _e: opened.append(True))],
    )
    if not assoc.is_established:
        why = "no connection (refused or unreachable)" if not opened else "it refused the C-GET association"
        raise SourceError(f"{_where(src)}: {why}")
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    try:
        final = None
        for status, _identifier in assoc.send_c_get(q, GET):
            final = status
            if "Status" not in status:  # an empty data set: no response in time
                break
    finally:
        if assoc.is_established:
            assoc.release()
    return _retrieved(src, "C-GET", study_uid, calling_ae, final)


def ingest_store(ingest: Any, src: SourceSection, called_ae: str) -> StoreOne:
    """C-STORE sub-operations of a C-GET through the node's own write path (node.receive.ingest.Ingest).

    The same as an instance received on the DICOM port: a File Meta of the node's, the data set bytes as
    received, checked, fsynced, indexed and told to the series tracker (which sees the prior_fetch row).
    """
    from pydicom.uid import UID

    from node.dicom import dimse
    from node.dicom.identity import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME
    from node.receive.ingest import Peer
    from node.receive.rxfile import ReceivedFile

    peer = Peer(calling_ae=src.ae_title, called_ae=called_ae, address=src.host)

    def store(sop_class: str, sop_instance: str, syntax: str, data: bytes) -> int:
        rx = ReceivedFile(ingest.storage.tmp)
        rx.write(
            dimse.encode_file_meta(
                sop_class, sop_instance, syntax, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, src.ae_title
            )
        )
        rx.dataset_offset = rx.size
        rx.write(data)
        done = ingest.store(
            rx, sop_class_uid=sop_class, sop_instance_uid=sop_instance, transfer_syntax=UID(syntax), peer=peer
        )
        return int(done.status)

    return store


# -- the index ---------------------------------------------------------------------------------------------


def current_study(engine: Engine, series_id: int) -> CurrentStudy:
    """The new study's UID, date and patient keys, from the index rows of the job's series."""
    with engine.connect() as conn:
        row = conn.execute(
            select(
                _st.c.study_instance_uid,
                _st.c.study_date,
                _p.c.patient_id,
                _p.c.issuer_of_patient_id,
                _p.c.patient_name,
                _p.c.birth_date,
            )
            .select_from(_s.join(_st, _st.c.id == _s.c.study_fk).join(_p, _p.c.id == _st.c.patient_fk))
            .where(_s.c.id == series_id)
        ).one()
    patient = {
        "PatientID": row.patient_id,
        "IssuerOfPatientID": row.issuer_of_patient_id,
        "PatientName": row.patient_name,
        "PatientBirthDate": row.birth_date,
    }
    return CurrentStudy(row.study_instance_uid, row.study_date, patient)


def is_prior_study(db: Engine | Connection, study_uid: str) -> bool:
    """Whether a study was retrieved as a prior (a prior_fetch row names it): the tracker runs no rule on it.

    ``db``: an engine, or the connection of a transaction the caller holds (on SQLite a write engine's
    transaction holds the write lock: a second connection of the same caller would wait for it).
    """
    query = select(_pf.c.id).where(_pf.c.study_uid == study_uid).limit(1)
    if isinstance(db, Connection):
        return db.execute(query).first() is not None
    with db.connect() as conn:
        return conn.execute(query).first() is not None


def _local_count(engine: Engine, study_uid: str) -> int:
    with engine.connect() as conn:
        return int(
            conn.execute(
                select(func.count(_i.c.id))
                .select_from(_i.join(_s, _s.c.id == _i.c.series_fk).join(_st, _st.c.id == _s.c.study_fk))
                .where(_st.c.study_instance_uid == study_uid)
            ).scalar_one()
        )


def _record(engine: Engine, job_id: int, src: str, study: FoundStudy, **values: Any) -> None:
    """Insert or update the (job, study) prior_fetch row, committed before whatever comes next."""
    now = utcnow()
    with engine.begin() as conn:
        done = conn.execute(
            update(_pf).where(_pf.c.job_fk == job_id, _pf.c.study_uid == study.study_uid).values(**values)
        ).rowcount
        if done:
            return
        try:
            with conn.begin_nested():
                conn.execute(
                    _pf.insert().values(
                        **{
                            "job_fk": job_id,
                            "source": src,
                            "study_uid": study.study_uid,
                            "study_date": study.study_date,
                            "expected": study.instances,
                            "received": 0,
                            "requested_at": now,
                            "error": "",
                            "state": "requested",
                            **values,
                        }
                    )
                )
        except IntegrityError:  # the same job's other run inserted it meanwhile
            conn.execute(update(_pf).where(_pf.c.job_fk == job_id, _pf.c.study_uid == study.study_uid).values(**values))


def study_files(engine: Engine, study_uid: str, modality: str) -> list[list[str]]:
    """The stored files of a study's image series (``modality`` only, when given), one list per series."""
    with engine.connect() as conn:
        rows = conn.execute(
            select(_s.c.id, _s.c.modality, _i.c.file_path)
            .select_from(_i.join(_s, _s.c.id == _i.c.series_fk).join(_st, _st.c.id == _s.c.study_fk))
            .where(_st.c.study_instance_uid == study_uid, _i.c.job_fk.is_(None))
            .order_by(_s.c.series_number.is_(None), _s.c.series_number, _s.c.id, _i.c.instance_number, _i.c.id)
        ).all()
    series: dict[int, list[str]] = {}
    for sid, mod, path in rows:
        if (modality and mod != modality) or mod in NOT_IMAGES:
            continue
        series.setdefault(sid, []).append(path)
    return list(series.values())


# -- the whole fetch -----------------------------------------------------------------------------------------


def _date_range(study_date: str, within_days: int, today: dt.date) -> str:
    """``YYYYMMDD-YYYYMMDD``: ``within_days`` before the new study (today when it has no date) up to it."""
    try:
        end = dt.datetime.strptime(study_date, "%Y%m%d").date()
    except ValueError:
        end = today
    return f"{end - dt.timedelta(days=within_days):%Y%m%d}-{end:%Y%m%d}"


def fetch_priors(
    cfg: Config,
    engine: Engine,
    job_id: int,
    series_id: int,
    request: Any,
    *,
    note: Callable[[str], None] = lambda text: None,
    now: Callable[[], dt.datetime] = utcnow,
    ingest: Any = None,
) -> list[Prior]:
    """The newest ``request.max`` prior studies, retrieved where needed; stored paths relative to the data folder.

    ``request`` is a :class:`node.jobs.spec.PriorsRequest`. Raises :class:`PriorsWaiting` (try again later) or
    :class:`PriorsFailed`. ``note`` hears what the job is doing (shown while it runs). ``ingest``: the node's
    C-STORE write path (node.receive.ingest.Ingest), which a source with ``retrieve = "get"`` needs.
    """
    src = next((s for s in cfg.sources if s.name == request.source), None)
    if src is None:
        raise PriorsFailed(
            f"priors.from = {request.source!r}: no [[sources]] entry of that name in the config any more"
        )
    current = current_study(engine, series_id)
    if not current.patient["PatientID"]:
        if not request.optional:
            raise PriorsFailed("the study has no Patient ID: its priors cannot be asked for (priors.optional = false)")
        log.warning("job %d: the study has no Patient ID, so no prior can be asked for; running without", job_id)
        return []
    keys = {k: current.patient[k] for k in request.same}
    calling = cfg.node.ae_title
    chosen: list[FoundStudy] = []
    try:
        note(f"asking {_where(src)} for prior studies")
        found = find_studies(
            src, calling, keys, _date_range(current.study_date, request.within_days, now().date()), request.modality
        )
        found = [f for f in found if f.study_uid != current.study_uid]
        found.sort(key=lambda f: (f.study_date, f.study_uid), reverse=True)
        chosen = found[: request.max]
        for study in chosen:
            _retrieve(cfg, engine, src, job_id, study, note, ingest)
    except SourceError as e:
        try:
            _wait_or_fail(engine, job_id, src, str(e), request.timeout, now())
        except PriorsFailed:  # the retrieves this job left unfinished stay failed (their studies stay priors)
            with engine.begin() as conn:
                conn.execute(
                    update(_pf)
                    .where(_pf.c.job_fk == job_id, _pf.c.state == "requested")
                    .values(state="failed", finished_at=utcnow())
                )
            raise
    if not chosen and not request.optional:
        raise PriorsFailed(f"{_where(src)} has no prior study of the patient (priors.optional = false)")
    priors = [Prior(f.study_uid, f.study_date, study_files(engine, f.study_uid, request.modality)) for f in chosen]
    log.info(
        "job %d: %d prior stud%s from %s: %s",
        job_id,
        len(priors),
        "y" if len(priors) == 1 else "ies",
        src.name,
        ", ".join(f"{p.study_uid} ({p.study_date}, {len(p.series)} series)" for p in priors) or "none found",
    )
    return priors


def _retrieve(
    cfg: Config,
    engine: Engine,
    src: SourceSection,
    job_id: int,
    study: FoundStudy,
    note: Callable[[str], None],
    ingest: Any,
) -> None:
    """Retrieve one study unless it is held already; its prior_fetch row is committed before the C-MOVE/C-GET."""
    have = _local_count(engine, study.study_uid)
    if have and (study.instances is None or have >= study.instances):
        if is_prior_study(engine, study.study_uid):  # a prior held for another job: this job needs it too
            _record(engine, job_id, src.name, study, state="retrieved", received=have, finished_at=utcnow())
        return
    if src.retrieve == "get" and ingest is None:
        raise PriorsFailed(f'{_where(src)}: retrieve = "get" needs the running node\'s receive path')
    _record(engine, job_id, src.name, study, state="requested", error="")
    how = "C-GET" if src.retrieve == "get" else "C-MOVE"
    note(f"retrieving prior study {study.study_uid} ({study.study_date}) from {_where(src)} by {how}")
    t = time.monotonic()
    try:
        if src.retrieve == "get":
            moved = get_study(src, cfg.node.ae_title, study.study_uid, ingest_store(ingest, src, cfg.node.ae_title))
        else:
            moved = move_study(src, cfg.node.ae_title, study.study_uid)
    except SourceError as e:
        _record(engine, job_id, src.name, study, error=str(e)[:2000])
        raise
    # Each C-STORE was answered once its instance was durable and indexed; a short margin for the last one.
    deadline = time.monotonic() + INDEX_GRACE
    want = max(moved.completed + moved.warning, study.instances or 0)
    have = _local_count(engine, study.study_uid)
    while have < want and time.monotonic() < deadline:
        time.sleep(0.2)
        have = _local_count(engine, study.study_uid)
    _record(engine, job_id, src.name, study, state="retrieved", received=have, finished_at=utcnow(), error="")
    with engine.begin() as conn:
        audit.record(
            conn,
            "prior_retrieved",
            actor="node",
            called_ae=src.ae_title,
            calling_ae=cfg.node.ae_title,
            peer_address=src.host,
            study_uid=study.study_uid,
            job_id=job_id,
            detail=f"from source {src.name!r} by {how}: {moved.completed} sent, {have} held now",
        )
    log.info(
        "job %d: retrieved prior study %s from %s by %s: %d instance(s) in %.1f s",
        job_id,
        study.study_uid,
        src.name,
        how,
        have,
        time.monotonic() - t,
    )


def next_try(
    created: dt.datetime, now: dt.datetime, timeout: float, retry_delay: float, max_retry_delay: float
) -> dt.datetime | None:
    """When a job that has waited since ``created`` tries its source again; None once ``timeout`` has passed.

    The wait is as long as the job has waited so far (so the waits double: 10, 10, 20, 40 s ...), at least
    ``retry_delay`` and at most ``max_retry_delay``; the last try is at the deadline itself. Only the job's
    creation time is needed, so the back-off survives a restart without a counter of its own.
    """
    deadline = created + dt.timedelta(seconds=timeout)
    if now >= deadline:
        return None
    waited = (now - created).total_seconds()
    delay = min(max(retry_delay, waited), max_retry_delay)
    return min(now + dt.timedelta(seconds=delay), deadline)


def _wait_or_fail(
    engine: Engine, job_id: int, src: SourceSection, error: str, timeout: float, now: dt.datetime
) -> None:
    """Raise PriorsWaiting with the next try (:func:`next_try`), or PriorsFailed once the timeout has passed."""
    with engine.connect() as conn:
        created = aware(conn.execute(select(_j.c.created_at).where(_j.c.id == job_id)).scalar_one())
    retry_at = next_try(created, now, timeout, src.retry_delay, src.max_retry_delay)
    if retry_at is None:
        raise PriorsFailed(
            f"{error}; gave up: the priors were not had within priors.timeout = {timeout:g} s of the job's creation"
        )
    deadline = created + dt.timedelta(seconds=timeout)
    raise PriorsWaiting(
        f"waiting for priors: {error}; trying again at {retry_at:%Y-%m-%d %H:%M:%S} UTC "
        f"(gives up at {deadline:%Y-%m-%d %H:%M:%S} UTC)",
        retry_at,
    )
