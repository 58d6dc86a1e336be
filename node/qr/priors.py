"""Prior studies from a PACS: find them (C-FIND, study level), retrieve them (C-MOVE to this node), hand them over.

A plugin action with ``priors = { from = "pacs", ... }`` (node.jobs.spec.PriorsRequest) calls
:func:`fetch_priors` before its job takes a plugin slot. It asks the ``[[sources]]`` entry for the
patient's other studies (same PatientID, and whatever else ``same`` names; Study Date within
``within_days`` before the new study; the modality in Modalities in Study) and keeps the newest ``max``.
A study the node already holds is used as it is: one it received normally stays an ordinary study (no
row, its rules and retention unchanged). Each other one gets a ``prior_fetch`` row (state ``retrieving``,
this node process as its owner) *before* its retrieve starts: the series tracker reads it and evaluates
no rule for the series that arrive (never forwarded, no job of their own), and retention keeps them per
``[retention] priors``.

The retrieve runs on the node process's own small pool (:class:`Retrieves`), not on the job's worker: the
job is deferred meanwhile and made due again when the retrieve ends, so a slow PACS holds up no other job.
A row left ``retrieving`` by a process that is gone is retried by the job's next run.

The source may be down or refuse: the job is then not failed but put back with a back-off
(:class:`PriorsWaiting`, the runner's deferral: no attempt is spent, nothing held while it waits), until
``timeout`` after the job first waited (``job.waiting_since``); then :class:`PriorsFailed` with the last
reason. Everything needed to resume is in the index (``waiting_since``, the prior_fetch rows), so a
restart while waiting just runs the job again when it is due.

The SCU side uses pynetdicom (the node's own acceptor receives what the C-MOVE sends).
"""

from __future__ import annotations

import datetime as dt
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from sqlalchemy import Connection, Engine, func, select, update
from sqlalchemy.exc import IntegrityError

from node import audit
from node.config import Config, SourceSection
from node.index.cluster import owner_gone
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
        final = _final(assoc.send_c_move(q, calling_ae, MOVE))
    return _retrieved(src, "C-MOVE", study_uid, calling_ae, final)


def _final(responses: Iterable[tuple[Any, Any]]) -> Dataset | None:
    """The last response of a C-MOVE or C-GET: its final status, or the empty (or missing) status that ended it
    early (pynetdicom yields an empty data set when no response came in time or the association was lost)."""
    final = None
    for status, _identifier in responses:
        final = status
        if status is None or "Status" not in status:
            break
    return final


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
        final = _final(assoc.send_c_get(q, GET))
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


class Retrieves:
    """The node process's retrieves of prior studies, on threads of their own (not ``[jobs]`` workers).

    One retrieve may take up to a source's ``retrieve_timeout``: run on a job worker it would hold that worker,
    and every job queued behind it, as long. Instead the job writes the study's prior_fetch row (state
    ``retrieving``, this process as ``owner``), hands the retrieve to this pool and is deferred; when the
    retrieve ends, ``done`` (the job runner) makes the job due again. The row is what lasts: a job whose row
    is still ``retrieving`` in a process that is gone (the node stopped mid-retrieve) tries it again.
    """

    def __init__(self, owner: str, threads: int = 2, done: Callable[[int], None] = lambda job_id: None) -> None:
        self.owner = owner
        self.done = done
        self._queue: queue.Queue[tuple[int, str, Callable[[], None]] | None] = queue.Queue()
        self._busy: set[tuple[int, str]] = set()
        self._lock = threading.Lock()
        # Daemon threads: a stop does not wait for a retrieve; its row is tried again once this process is gone.
        self._threads = [
            threading.Thread(target=self._work, name=f"prior-retrieve-{i}", daemon=True) for i in range(threads)
        ]

    def start(self) -> None:
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        for _t in self._threads:
            self._queue.put(None)

    def busy(self, job_id: int, study_uid: str) -> bool:
        """Whether this process is retrieving (or about to retrieve) the study for the job."""
        with self._lock:
            return (job_id, study_uid) in self._busy

    def submit(self, job_id: int, study_uid: str, run: Callable[[], None]) -> None:
        """Queue ``run`` (the retrieve of ``study_uid`` for ``job_id``) unless it is queued or running already."""
        with self._lock:
            if (job_id, study_uid) in self._busy:
                return
            self._busy.add((job_id, study_uid))
        self._queue.put((job_id, study_uid, run))

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            job_id, study_uid, run = item
            try:
                run()
            except SourceError as e:  # recorded on the prior_fetch row; the job reports it when it runs next
                log.warning("job %d: the retrieve of prior study %s failed: %s", job_id, study_uid, e)
            except Exception:
                log.exception("job %d: the retrieve of prior study %s failed", job_id, study_uid)
            finally:
                with self._lock:
                    self._busy.discard((job_id, study_uid))
                try:
                    self.done(job_id)
                except Exception:
                    log.exception("job %d: could not make it due after its retrieve", job_id)


#: While a retrieve runs on the pool, its job looks again this often: the pool's end makes the job due at once,
#: so this only matters after a restart (a retrieve whose process is gone is then tried again).
RETRIEVE_CHECK = 30.0


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
    retrieves: Retrieves | None = None,
) -> list[Prior]:
    """The newest ``request.max`` prior studies, once all are held; stored paths relative to the data folder.

    ``request`` is a :class:`node.jobs.spec.PriorsRequest`. The query runs on every call (it is short and
    bounded by the source's ``timeout``); a study to retrieve goes to ``retrieves`` and this raises
    :class:`PriorsWaiting` until it is held (without a pool, as in a tool or a test, it is retrieved in
    this thread). Raises :class:`PriorsWaiting` (try again later) or :class:`PriorsFailed`. ``note`` hears
    what the job is doing (shown while it runs). ``ingest``: the node's C-STORE write path
    (node.receive.ingest.Ingest), which a source with ``retrieve = "get"`` needs.
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
    chosen: list[FoundStudy] = []
    under_way: list[FoundStudy] = []
    try:
        note(f"asking {_where(src)} for prior studies")
        found = find_studies(
            src,
            cfg.node.ae_title,
            keys,
            _date_range(current.study_date, request.within_days, now().date()),
            request.modality,
        )
        found = [f for f in found if f.study_uid != current.study_uid]
        found.sort(key=lambda f: (f.study_date, f.study_uid), reverse=True)
        chosen = found[: request.max]
        under_way = [s for s in chosen if not _held(cfg, engine, src, job_id, s, note, ingest, retrieves, now())]
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
    if under_way:
        raise PriorsWaiting(
            f"waiting for the retrieve of prior stud{'y' if len(under_way) == 1 else 'ies'} "
            f"{', '.join(s.study_uid for s in under_way)} from {_where(src)}",
            now() + dt.timedelta(seconds=RETRIEVE_CHECK),
        )
    with engine.begin() as conn:  # had: a later wait (another attempt) has the whole timeout again
        conn.execute(update(_j).where(_j.c.id == job_id, _j.c.waiting_since.is_not(None)).values(waiting_since=None))
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


def _held(
    cfg: Config,
    engine: Engine,
    src: SourceSection,
    job_id: int,
    study: FoundStudy,
    note: Callable[[str], None],
    ingest: Any,
    retrieves: Retrieves | None,
    now: dt.datetime,
) -> bool:
    """Whether the job may use the study now; if not, its retrieve is under way (started here when needed).

    A study the node received normally (instances held, no prior_fetch row names it) stays what it is: it is
    used as held, even when the source reports more instances, and no row makes it a prior (that would stop
    its rules and hand it to the priors retention). Raises SourceError when the job's last retrieve of the
    study failed (reported once, so the job waits with its back-off; its next run tries again).
    """
    mine = retrieves.owner if retrieves is not None else None
    row = _fetch_row(engine, job_id, study.study_uid, now)
    if row is not None and row.state == "retrieved":
        return True
    if row is not None and row.state == "retrieving":
        if retrieves is not None and retrieves.busy(job_id, study.study_uid):
            return False
        started = aware(row.requested_at)
        elsewhere = not row.gone and row.owner != mine  # another live node process retrieves it
        if elsewhere and now < started + dt.timedelta(seconds=src.retrieve_timeout):
            return False
        log.warning(
            "job %d: the retrieve of prior study %s started at %s did not finish (%s); trying it again",
            job_id,
            study.study_uid,
            f"{started:%Y-%m-%d %H:%M:%S} UTC",
            "its node process is gone" if not elsewhere else "longer than retrieve_timeout",
        )
    elif row is not None and row.state == "requested" and row.finished_at is not None and row.error:
        _record(engine, job_id, src.name, study, finished_at=None)  # reported now; the next run tries again
        raise SourceError(row.error)
    elif row is None:
        have = _local_count(engine, study.study_uid)
        if have and not is_prior_study(engine, study.study_uid):
            if study.instances is not None and have < study.instances:
                log.info(
                    "job %d: study %s was received normally with %d of the %d instance(s) %s reports; using "
                    "those (it is not retrieved as a prior)",
                    job_id,
                    study.study_uid,
                    have,
                    study.instances,
                    src.name,
                )
            return True
        if have and (study.instances is None or have >= study.instances):  # a prior held for another job
            _record(engine, job_id, src.name, study, state="retrieved", received=have, finished_at=utcnow())
            return True
    if src.retrieve == "get" and ingest is None:
        raise PriorsFailed(f'{_where(src)}: retrieve = "get" needs the running node\'s receive path')
    # The row first: the tracker must know the arriving series are a prior's before the first one arrives.
    _record(
        engine, job_id, src.name, study, state="retrieving", owner=mine, requested_at=now, finished_at=None, error=""
    )
    how = "C-GET" if src.retrieve == "get" else "C-MOVE"
    note(f"retrieving prior study {study.study_uid} ({study.study_date}) from {_where(src)} by {how}")
    if retrieves is None:  # no pool (a tool, a test): in this thread, its failure reported at once
        try:
            _retrieve(cfg, engine, src, job_id, study, ingest)
        except SourceError:
            _record(engine, job_id, src.name, study, finished_at=None)  # reported: the next run tries again
            raise
        return True
    retrieves.submit(job_id, study.study_uid, lambda: _retrieve(cfg, engine, src, job_id, study, ingest))
    return False


@dataclass(frozen=True)
class _FetchRow:
    state: str
    error: str
    requested_at: dt.datetime
    finished_at: dt.datetime | None
    owner: str | None
    #: Its owner is no live node process.
    gone: bool


def _fetch_row(engine: Engine, job_id: int, study_uid: str, now: dt.datetime) -> _FetchRow | None:
    with engine.connect() as conn:
        r = conn.execute(
            select(
                _pf.c.state,
                _pf.c.error,
                _pf.c.requested_at,
                _pf.c.finished_at,
                _pf.c.owner,
                owner_gone(_pf.c.owner, now).label("gone"),
            ).where(_pf.c.job_fk == job_id, _pf.c.study_uid == study_uid)
        ).first()
    if r is None:
        return None
    return _FetchRow(r.state, r.error, r.requested_at, r.finished_at, r.owner, bool(r.gone))


def _retrieve(cfg: Config, engine: Engine, src: SourceSection, job_id: int, study: FoundStudy, ingest: Any) -> None:
    """Retrieve one study (its row says ``retrieving``); the row records the outcome. Raises SourceError."""
    how = "C-GET" if src.retrieve == "get" else "C-MOVE"
    t = time.monotonic()
    try:
        if src.retrieve == "get":
            moved = get_study(src, cfg.node.ae_title, study.study_uid, ingest_store(ingest, src, cfg.node.ae_title))
        else:
            moved = move_study(src, cfg.node.ae_title, study.study_uid)
    except SourceError as e:
        _record(engine, job_id, src.name, study, state="requested", error=str(e)[:2000], finished_at=utcnow())
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
    since: dt.datetime, now: dt.datetime, timeout: float, retry_delay: float, max_retry_delay: float
) -> dt.datetime | None:
    """When a job that has waited since ``since`` tries its source again; None once ``timeout`` has passed.

    The wait is as long as the job has waited so far (so the waits double: 10, 10, 20, 40 s ...), at least
    ``retry_delay`` and at most ``max_retry_delay``; the last try is at the deadline itself. Only the start
    of the wait is needed (``job.waiting_since``), so the back-off survives a restart without a counter.
    """
    deadline = since + dt.timedelta(seconds=timeout)
    if now >= deadline:
        return None
    waited = (now - since).total_seconds()
    delay = min(max(retry_delay, waited), max_retry_delay)
    return min(now + dt.timedelta(seconds=delay), deadline)


def _wait_or_fail(
    engine: Engine, job_id: int, src: SourceSection, error: str, timeout: float, now: dt.datetime
) -> None:
    """Raise PriorsWaiting with the next try (:func:`next_try`), or PriorsFailed once the timeout has passed.

    The timeout counts from the job's first failure to have its priors (``job.waiting_since``, set here),
    not from its creation: a job that sat in a busy queue longer than the timeout still gets its back-off.
    """
    with engine.begin() as conn:
        conn.execute(update(_j).where(_j.c.id == job_id, _j.c.waiting_since.is_(None)).values(waiting_since=now))
        since = aware(conn.execute(select(_j.c.waiting_since).where(_j.c.id == job_id)).scalar_one())
    retry_at = next_try(since, now, timeout, src.retry_delay, src.max_retry_delay)
    if retry_at is None:
        raise PriorsFailed(
            f"{error}; gave up: the priors were not had within priors.timeout = {timeout:g} s of the job's first "
            f"wait for them ({since:%Y-%m-%d %H:%M:%S} UTC)"
        )
    deadline = since + dt.timedelta(seconds=timeout)
    raise PriorsWaiting(
        f"waiting for priors: {error}; trying again at {retry_at:%Y-%m-%d %H:%M:%S} UTC "
        f"(gives up at {deadline:%Y-%m-%d %H:%M:%S} UTC)",
        retry_at,
    )
