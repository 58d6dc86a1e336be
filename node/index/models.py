"""The index: Patient / Study / Series / Instance rows for rules, queries and the dashboard.

Only portable SQL types are used here; anything dialect-specific lives in
:mod:`node.index.db`. UIDs are at most 64 characters (PS3.5 9.1) but peers do
send longer ones; the columns are wider so such an instance is stored rather
than lost.
"""

from __future__ import annotations

import datetime as dt
from typing import ClassVar

from sqlalchemy import (
    BigInteger,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Table,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from node.index.states import CommitmentState, DeliveryState, JobState, SeriesState

UID = String(128)


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def aware(value: dt.datetime) -> dt.datetime:
    """SQLite hands back naive datetimes; every time in the index is UTC."""
    return value if value.tzinfo is not None else value.replace(tzinfo=dt.UTC)


class Base(DeclarativeBase):
    # Every model maps one table (no joined or selectable mappings), so the Core queries that use
    # ``Model.__table__`` get a Table (insert(), update(), .c) rather than DeclarativeBase's FromClause.
    __table__: ClassVar[Table]


class Patient(Base):
    """A patient as the data sets describe them.

    Identity is (Patient ID, Issuer, Name, Birth Date) as sent: many test and
    anonymised data sets share an empty or constant Patient ID, and merging
    them by ID alone would show one patient's name on another's study.
    """

    __tablename__ = "patient"
    __table_args__ = (
        UniqueConstraint(
            "patient_id", "issuer_of_patient_id", "patient_name", "birth_date", name="uq_patient_identity"
        ),
        # Person Name matching ignores case (node.index.query): an exact name, and on PostgreSQL a name
        # prefix (``DOE*``: text_pattern_ops serves LIKE whatever the database's collation), read the index.
        # The operator class is the migration's (0009): named here as ``postgresql_ops``, it would load the
        # PostgreSQL dialect into every command on SQLite (tests/index/test_migrations.py checks it on PostgreSQL).
        Index("ix_patient_name_lower", func.lower(text("patient_name"))),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    patient_id: Mapped[str] = mapped_column(String(128), default="")
    issuer_of_patient_id: Mapped[str] = mapped_column(String(128), default="")
    patient_name: Mapped[str] = mapped_column(String(512), default="")
    birth_date: Mapped[str] = mapped_column(String(16), default="")
    sex: Mapped[str] = mapped_column(String(16), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    studies: Mapped[list[Study]] = relationship(back_populates="patient")


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    patient_fk: Mapped[int] = mapped_column(ForeignKey("patient.id"), index=True)
    study_date: Mapped[str] = mapped_column(String(16), default="", index=True)
    study_time: Mapped[str] = mapped_column(String(32), default="")
    accession_number: Mapped[str] = mapped_column(String(64), default="", index=True)
    study_id: Mapped[str] = mapped_column(String(64), default="")
    study_description: Mapped[str] = mapped_column(String(512), default="")
    referring_physician_name: Mapped[str] = mapped_column(String(512), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: When the study rules are to be evaluated for this study next (UTC; NULL: nothing to do). Set when one
    #: of its series triggers, moved to the end of a quiet period while a rule waits for one, cleared once
    #: every study rule has fired or waits for an input: the durable timer of node.decide.tracker.
    study_rules_due: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True, index=True)
    #: What the study rules waited for at their last evaluation (JSON ``{rule: "waiting for ct_contrast"}``;
    #: "" for none): written by the tracker, read by the dashboard (node.index.read.study_waiting).
    #: Server default only: the receive path's prepared INSERT (node.index.records) names no column for it.
    study_rules_waiting: Mapped[str] = mapped_column(Text, server_default="")

    patient: Mapped[Patient] = relationship(back_populates="studies")
    series: Mapped[list[Series]] = relationship(back_populates="study")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    modality: Mapped[str] = mapped_column(String(16), default="", index=True)
    series_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    series_description: Mapped[str] = mapped_column(String(512), default="")
    body_part_examined: Mapped[str] = mapped_column(String(64), default="")
    protocol_name: Mapped[str] = mapped_column(String(512), default="")
    series_date: Mapped[str] = mapped_column(String(16), default="")
    series_time: Mapped[str] = mapped_column(String(32), default="")
    manufacturer: Mapped[str] = mapped_column(String(128), default="")
    station_name: Mapped[str] = mapped_column(String(64), default="")
    frame_of_reference_uid: Mapped[str] = mapped_column(UID, default="")
    #: Maintained in the same transaction as each instance row, so rules can
    #: read a count without a COUNT(*) over the instance table.
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    first_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    # Not indexed on purpose: it changes with every instance, and an index
    # here would be rewritten (and WAL-logged) on every commit.
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: The series tracker's durable state, kept in this row so that the
    #: receive path maintains it in the UPDATE it already makes per instance.
    #: ``receiving`` -> ``stable`` -> ``triggered``; an instance arriving for
    #: a stable or triggered series opens the next revision (``receiving``).
    state: Mapped[str] = mapped_column(String(16), default=SeriesState.RECEIVING, index=True)
    revision: Mapped[int] = mapped_column(Integer, default=1)
    revision_instances: Mapped[int] = mapped_column(Integer, default=0)
    revision_started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series")


class Instance(Base):
    """One stored instance.

    Indexes are kept to what lookups need (UID, series, file path, time):
    each one is a B-tree page rewritten on every insert, which on SQLite is
    also written to the WAL; more indexes come with the queries that use them.
    """

    __tablename__ = "instance"
    __table_args__ = (Index("ix_instance_received_at", "received_at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, unique=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(UID)
    transfer_syntax_uid: Mapped[str] = mapped_column(UID)
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    acquisition_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    image_type: Mapped[str] = mapped_column(String(256), default="")
    rows: Mapped[int | None] = mapped_column(Integer, nullable=True)
    columns: Mapped[int | None] = mapped_column(Integer, nullable=True)
    number_of_frames: Mapped[int | None] = mapped_column(Integer, nullable=True)
    bits_allocated: Mapped[int | None] = mapped_column(Integer, nullable=True)
    photometric_interpretation: Mapped[str] = mapped_column(String(32), default="")
    #: Backslash-separated decimal strings as in the data set (PS3.5 DS).
    image_position_patient: Mapped[str] = mapped_column(String(256), default="")
    image_orientation_patient: Mapped[str] = mapped_column(String(512), default="")
    pixel_spacing: Mapped[str] = mapped_column(String(128), default="")
    slice_thickness: Mapped[float | None] = mapped_column(Float, nullable=True)
    slice_location: Mapped[float | None] = mapped_column(Float, nullable=True)
    #: Relative to the data directory, made by the node, never from peer strings.
    file_path: Mapped[str] = mapped_column(String(512), unique=True)
    file_size: Mapped[int] = mapped_column(BigInteger)
    #: SHA-256 of the stored file, hex.
    checksum: Mapped[str] = mapped_column(String(64))
    received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    association_id: Mapped[str] = mapped_column(String(36), default="")
    #: The series revision this instance arrived in (see ``Series.state``).
    revision: Mapped[int] = mapped_column(Integer, default=1)
    #: For an object the node derived: the job that made it (lineage: source series -> job -> output).
    job_fk: Mapped[int | None] = mapped_column(ForeignKey("job.id"), nullable=True, index=True)

    series: Mapped[Series] = relationship(back_populates="instances")


class SeriesRevision(Base):
    """The history of a series' revisions: written when one becomes stable, completed when it triggers."""

    __tablename__ = "series_revision"
    __table_args__ = (UniqueConstraint("series_fk", "revision", name="uq_series_revision"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    revision: Mapped[int] = mapped_column(Integer)
    instance_count: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    last_received_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    stable_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True))
    #: Why it became stable, e.g. "no instance for 60 s" or "200 of 200 expected instances".
    stable_reason: Mapped[str] = mapped_column(String(256), default="")
    triggered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Names of the rules that matched, comma-separated; empty when none did.
    matched_rules: Mapped[str] = mapped_column(Text, default="")
    error: Mapped[str] = mapped_column(Text, default="")


class StudyTrigger(Base):
    """A study rule that fired for a study: one row per (study, rule, input revision set).

    ``revision`` counts the rule's firings for the study (1, 2, ...: a new revision of an input series,
    or a new series in a study without declared inputs, makes the next). The unique constraints make the
    firing exactly once: of two processes evaluating a study at once only one inserts the row (and makes
    the jobs in the same transaction).
    """

    __tablename__ = "study_trigger"
    __table_args__ = (
        UniqueConstraint("study_fk", "rule", "revision", name="uq_study_trigger_revision"),
        UniqueConstraint("study_fk", "rule", "inputs_key", name="uq_study_trigger_inputs"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_fk: Mapped[int] = mapped_column(ForeignKey("study.id"), index=True)
    rule: Mapped[str] = mapped_column(String(128))
    revision: Mapped[int] = mapped_column(Integer)
    #: The inputs it fired with (JSON): ``{name: {"series_id", "series_uid", "revision"}}``.
    inputs: Mapped[str] = mapped_column(Text)
    #: SHA-256 (hex) of the input revision set (name, series id, revision): the same set never fires twice.
    inputs_key: Mapped[str] = mapped_column(String(64))
    #: The input outputs are built on (its jobs' ``series_fk``).
    primary_series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"))
    #: Why it fired, for people (e.g. "every input stable" or "no instance in the study for 120 s").
    reason: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class Job(Base):
    """One (series revision, rule, action) match; the unique constraint makes it exactly one."""

    __tablename__ = "job"
    __table_args__ = (
        # ``run``: 1 for the job the tracker made; an operator's rerun (node.jobs.store.rerun) adds the next.
        UniqueConstraint("series_fk", "revision", "rule", "action_index", "run", name="uq_job_match"),
        Index("ix_job_state_due", "state", "not_before"),
        # The claim's order (node.jobs.store.claim_next): it reads the rows it takes, not the whole queue.
        Index("ix_job_claim_order", "state", text("priority DESC"), "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    revision: Mapped[int] = mapped_column(Integer)
    rule: Mapped[str] = mapped_column(String(128))
    action_index: Mapped[int] = mapped_column(Integer)
    #: Which run of the (series revision, rule, action): 1 as the rules made it, 2, 3, ... for each rerun an
    #: operator asked for. A rerun's outputs get UIDs of their own; the earlier run's outputs are kept.
    run: Mapped[int] = mapped_column(Integer, default=1, server_default="1")
    #: "plugin", "forward" or "discard".
    kind: Mapped[str] = mapped_column(String(16))
    #: The action as configured when the job was made (JSON), so a later config change does not alter it.
    action: Mapped[str] = mapped_column(Text)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    #: A :class:`~node.index.states.JobState`.
    state: Mapped[str] = mapped_column(String(16), default=JobState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    last_error: Mapped[str] = mapped_column(Text, default="")
    #: What the job did, for people (e.g. "sent 200 instances to PACS").
    result: Mapped[str] = mapped_column(Text, default="")
    #: The plugin(s) and versions that produced the job's outputs, e.g. "threshold-seg 1.0".
    software: Mapped[str] = mapped_column(String(256), default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    not_before: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    started_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The node process (:class:`NodeProcess` id) running it; NULL unless ``running``.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    #: A study rule's job: the firing it belongs to (its named inputs); NULL for a series rule's job. Then
    #: ``series_fk`` is the primary input and ``revision`` the study trigger's revision.
    study_trigger_fk: Mapped[int | None] = mapped_column(ForeignKey("study_trigger.id"), nullable=True, index=True)
    #: When the job first waited for its priors source (down, refusing): ``priors.timeout`` counts from here,
    #: not from ``created_at`` (a job that sat in a busy queue still gets its back-off). node.qr.priors.
    waiting_since: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Delivery(Base):
    """One instance on its way to one destination: the durable forward queue.

    ``queued`` -> ``sending`` -> ``delivered`` (or ``failed`` for good, or
    ``cancelled`` by an operator). A row left ``sending`` by a process that died
    is queued again at start-up: delivery is at least once, and a PACS that gets
    the same SOP Instance UID twice keeps one copy.
    """

    __tablename__ = "delivery"
    __table_args__ = (
        UniqueConstraint("instance_fk", "destination", name="uq_delivery_instance_destination"),
        Index("ix_delivery_claim", "destination", "state", "next_attempt_at"),
        # The claim's order (node.send.queue.claim): a long queue (a PACS down for hours) is not sorted per claim.
        Index("ix_delivery_claim_order", "destination", "state", text("priority DESC"), "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: NULL once the instance was deleted from this node (e.g. discarded after delivery).
    instance_fk: Mapped[int | None] = mapped_column(ForeignKey("instance.id", ondelete="SET NULL"), nullable=True)
    series_fk: Mapped[int] = mapped_column(ForeignKey("series.id"), index=True)
    #: The job that queued it (a forward action, or a plugin job sending its outputs); NULL for none.
    job_fk: Mapped[int | None] = mapped_column(ForeignKey("job.id"), nullable=True, index=True)
    destination: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(UID)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default=DeliveryState.QUEUED)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    next_attempt_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: The DIMSE status of the last attempt (NULL when it got no response).
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    last_error: Mapped[str] = mapped_column(Text, default="")
    #: A warning status the destination answered with (0xB000...), recorded with a delivered instance.
    warning: Mapped[str] = mapped_column(String(256), default="")
    #: The transfer syntax it was sent in (differs from the stored one when transcoded).
    sent_transfer_syntax: Mapped[str] = mapped_column(UID, default="")
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    delivered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Storage Commitment: "" (not asked), "requested", "committed" or "failed".
    commitment: Mapped[str] = mapped_column(String(16), default=CommitmentState.NONE)
    commitment_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    commitment_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: The node process (:class:`NodeProcess` id) sending it; NULL unless ``sending``.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)


class DestinationCircuit(Base):
    """A destination's circuit breaker, kept so that a restart neither forgets an outage nor hammers a dead PACS.

    One row per destination the node has sent to: its consecutive transient failures and the time
    before which nothing is tried (the back-off of the last one). The sender reads it at start and
    writes it when the circuit opens, grows or closes (:mod:`node.send.dispatch`).
    """

    __tablename__ = "destination_circuit"

    destination: Mapped[str] = mapped_column(String(64), primary_key=True)
    #: Consecutive transient failures (0: the circuit is closed).
    failures: Mapped[int] = mapped_column(Integer, default=0)
    #: No attempt before this time while ``failures`` > 0 (UTC; NULL when closed).
    retry_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Why the last attempt failed ("" when closed).
    last_error: Mapped[str] = mapped_column(Text, default="")
    updated_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class AuditEvent(Base):
    """Who did what, when: an append-only record for the people who must answer for the node.

    The database itself refuses UPDATE and DELETE on this table (triggers made by migration 0005),
    so neither a bug nor an operator with the node's credentials rewrites history. Rows name
    instances, series and jobs by UID or number, never by foreign key: deleting an instance
    (retention, discard) never conflicts with its audit trail. No patient names, IDs or birth dates
    are written here; UIDs and AE titles are.
    """

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_at", "at"),)

    #: 64-bit on PostgreSQL (the fastest-growing table, never pruned); SQLite's rowid is 64-bit anyway.
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True)
    #: UTC.
    at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: What happened: see :data:`node.audit.KINDS`.
    kind: Mapped[str] = mapped_column(String(32))
    #: Who did it: the peer for network events; "cli" or a web user for operator actions; "node" otherwise.
    actor: Mapped[str] = mapped_column(String(64), default="")
    calling_ae: Mapped[str] = mapped_column(String(16), default="")
    called_ae: Mapped[str] = mapped_column(String(16), default="")
    peer_address: Mapped[str] = mapped_column(String(64), default="")
    study_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    series_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    sop_instance_uid: Mapped[str] = mapped_column(UID, default="", index=True)
    rule: Mapped[str] = mapped_column(String(128), default="")
    #: A job's number (no foreign key: see above).
    job_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    destination: Mapped[str] = mapped_column(String(64), default="")
    #: A DIMSE status where one was exchanged (C-STORE response sent or received).
    status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="")


class NodeProcess(Base):
    """A node process working on this index: who owns running jobs and deliveries in flight.

    A process writes its heartbeat (``expires_at`` = now + its lease) every few seconds. Once
    ``expires_at`` has passed, the others take over its work (:mod:`node.index.cluster`). A clean stop sets
    ``stopped_at``; a row expired without it is a process that died, whose left-overs (temporary files,
    files stored but not indexed) are reconciled once by whoever holds the ``recovery`` duty.
    """

    __tablename__ = "node_process"

    #: ``host:pid:random``, unique for each start.
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    host: Mapped[str] = mapped_column(String(255), default="")
    pid: Mapped[int] = mapped_column(Integer, default=0)
    #: "node" (everything) or "receiver" (only the DICOM port: ``[node] processes`` > 1).
    role: Mapped[str] = mapped_column(String(16), default="node")
    version: Mapped[str] = mapped_column(String(32), default="")
    started_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    heartbeat_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Alive until then (UTC): the last heartbeat plus the process's lease.
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    #: Set by a clean stop (NULL while running, or after a crash).
    stopped_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    #: Set when another process (or this one's successor) reconciled what a crashed process left.
    recovered_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)


class Duty(Base):
    """A task that must run in one process at a time across the cluster (retention, watchdogs, sweeps).

    Held by ``owner`` until ``expires_at``; the holder renews it, anyone takes it once it has expired.
    """

    __tablename__ = "duty"

    name: Mapped[str] = mapped_column(String(32), primary_key=True)
    owner: Mapped[str] = mapped_column(String(64), default="")
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)


class WebSession(Base):
    """A dashboard login, shared by every node process serving the web port (a restart keeps it)."""

    __tablename__ = "web_session"

    #: SHA-256 of the cookie's value (the value itself is never stored).
    id_hash: Mapped[str] = mapped_column(String(64), primary_key=True)
    user: Mapped[str] = mapped_column(String(128))
    created_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    expires_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow, index=True)


class PriorFetch(Base):
    """A prior study a job asked a ``[[sources]]`` PACS for (node.qr.priors): written *before* the retrieve.

    Its series arrive like any other (C-STORE from the source), but the series tracker finds their study
    here and evaluates no rule for them (never forwarded, never a job of their own); retention counts
    them as ``priors``. One row per (job, study).
    """

    __tablename__ = "prior_fetch"
    __table_args__ = (UniqueConstraint("job_fk", "study_uid", name="uq_prior_fetch_job_study"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    #: The job that asked (NULL once that job's row was deleted with its series: the study stays a prior).
    job_fk: Mapped[int | None] = mapped_column(ForeignKey("job.id", ondelete="SET NULL"), nullable=True, index=True)
    #: The [[sources]] name asked.
    source: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(UID, index=True)
    study_date: Mapped[str] = mapped_column(String(16), default="")
    #: "retrieving" (under way in ``owner``), "requested" (to be tried again), "retrieved", or "failed".
    state: Mapped[str] = mapped_column(String(16), default="requested")
    #: Instances the source reported for the study, and how many arrived.
    expected: Mapped[int | None] = mapped_column(Integer, nullable=True)
    received: Mapped[int] = mapped_column(Integer, default=0)
    requested_at: Mapped[dt.datetime] = mapped_column(DateTime(timezone=True), default=utcnow)
    finished_at: Mapped[dt.datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    error: Mapped[str] = mapped_column(Text, default="")
    #: The node process whose retrieve pool runs the retrieve (state "retrieving"): once gone, it is tried again.
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
