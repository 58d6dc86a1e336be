"""What each kind of job does. A handler returns a one-line summary or raises :class:`JobFailed`."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydicom.uid import ExplicitVRLittleEndian, JPEG2000Lossless, RLELossless
from sqlalchemy import Engine, Exists, FromClause, exists, select, update

from node import metrics
from node.config import Config
from node.derive.store import OutputStore
from node.index.models import Delivery, Instance, Job, Patient, Series, Study, StudyTrigger
from node.index.states import JobState
from node.jobs.spec import PluginAction
from node.jobs.store import ClaimedJob
from node.storage import Storage

if TYPE_CHECKING:  # the plugin machinery is imported by the jobs that run plugins, not at start
    from node.plugins.pool import Worker

log = logging.getLogger(__name__)


class JobFailed(Exception):
    """A job run that did not succeed; ``retryable`` says whether another attempt may help."""

    def __init__(self, message: str, *, retryable: bool) -> None:
        super().__init__(message)
        self.retryable = retryable


class JobDeferred(JobFailed):
    """The job waits for something outside the node (a source PACS for priors): pending again at ``retry_at``.

    Not a failed attempt: the runner puts it back without counting one (its own deadline fails it).
    """

    def __init__(self, message: str, retry_at: dt.datetime) -> None:
        super().__init__(message, retryable=True)
        self.retry_at = retry_at


@dataclass
class JobContext:
    job: ClaimedJob
    cfg: Config
    engine: Engine
    storage: Storage
    #: True once the job was cancelled, or taken over by another node process (checked between steps of long
    #: work: the rest of it would not count).
    cancelled: Callable[[], bool]
    #: Where plugin outputs are stored and indexed.
    outputs: OutputStore | None = None
    #: Tells the forward dispatcher that deliveries were queued for these destinations.
    wake_senders: Callable[[list[str]], None] = lambda names: None
    #: The node's C-STORE write path (node.receive.ingest.Ingest), for priors retrieved by C-GET.
    ingest: Any = None
    #: The node process's pool for retrieving priors (node.qr.priors.Retrieves); None retrieves in the job's thread.
    retrieves: Any = None

    def instance_files(self) -> list[tuple[int, str]]:
        """(id, stored path) of the revision's instances, in Instance Number order."""
        i = Instance.__table__
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(i.c.id, i.c.file_path)
                .where(i.c.series_fk == self.job.series_id, i.c.revision == self.job.revision)
                .order_by(i.c.instance_number.is_(None), i.c.instance_number, i.c.id)
            ).all()
        return [(r.id, r.file_path) for r in rows]


def _queue(ctx: JobContext, instance_ids: list[int], names: list[str]) -> str:
    """Put instances on the durable forward queue of each named destination (sent by the dispatcher)."""
    from node.send import queue

    if ctx.cancelled():
        raise JobFailed("cancelled", retryable=False)
    known = {d.name for d in ctx.cfg.destinations}
    missing = [n for n in names if n not in known]
    if missing:
        raise JobFailed(
            f"no destination {', '.join(map(repr, missing))} in the config any more; nothing was queued",
            retryable=False,
        )
    with ctx.engine.begin() as conn:
        got = queue.enqueue(conn, instance_ids, names, job_id=ctx.job.id, priority=ctx.job.priority)
    ctx.wake_senders(names)
    parts = [f"queued {got.new + got.requeued} instance(s) for {', '.join(names)}"]
    if got.already:
        parts.append(f"{got.already} already queued or delivered")
    return "; ".join(parts)


def forward(ctx: JobContext) -> str:
    """Queue the revision's instances, as stored, for each destination."""
    ids = [pk for pk, _ in ctx.instance_files()]
    if not ids:
        # Not a success: the data went somewhere else (discarded, or re-sent into a later revision).
        raise JobFailed(
            "the revision has no instances any more (discarded, or re-sent into a later revision "
            'with node.duplicates = "overwrite"); nothing was forwarded',
            retryable=False,
        )
    return _queue(ctx, ids, ctx.job.action["to"])


def _succeeded_later(j: FromClause) -> Exists:
    """A later run of the job's match (an operator's rerun) succeeded: the job's own failure is overtaken."""
    later = j.alias("later")
    return exists().where(
        later.c.series_fk == j.c.series_fk,
        later.c.revision == j.c.revision,
        later.c.rule == j.c.rule,
        later.c.action_index == j.c.action_index,
        later.c.run > j.c.run,
        later.c.state == JobState.SUCCEEDED,
    )


def discard(ctx: JobContext) -> str:
    """Delete the revision's instances, rows and files in one transaction (see :mod:`node.storage.removal`).

    Runs after the series' other jobs (see the job store), and not at all when one of them did not
    succeed: data that did not reach its destination is kept.
    """
    from node import audit
    from node.send.queue import unfinished_for_series
    from node.storage.removal import delete_instance_rows, remove_files

    j = Job.__table__
    items = ctx.instance_files()
    # The checks, the deletion and its audit row in one transaction: nothing can start on the series
    # between "all delivered" and "deleted" (SQLite's write lock; the job rows are locked elsewhere).
    with ctx.engine.begin() as conn:
        unfinished = conn.execute(
            select(j.c.id, j.c.state)
            .where(
                j.c.series_fk == ctx.job.series_id,
                j.c.id != ctx.job.id,
                j.c.kind != "discard",
                j.c.state != JobState.SUCCEEDED,
                ~_succeeded_later(j),
            )
            .order_by(j.c.id)
            .with_for_update()
        ).all()
        if unfinished:
            which = ", ".join(f"job {r.id} is {r.state}" for r in unfinished)
            raise JobFailed(
                f"not discarding: {which}; the series is kept (retry this job once they succeeded)", retryable=False
            )
        undelivered = unfinished_for_series(conn, ctx.job.series_id, ctx.job.revision)
        if undelivered:
            which = ", ".join(f"{n} {state} for {dest}" for state, dest, n in undelivered)
            raise JobFailed(
                f"not discarding: deliveries of this revision have not all arrived ({which}); the series "
                "is kept (see dicom-node queue; retry this job once they are delivered)",
                retryable=False,
            )
        # Only the rows as listed: a re-send meanwhile (new file, next revision) keeps its row and file.
        gone = delete_instance_rows(conn, ctx.job.series_id, items, revision=ctx.job.revision)
        if gone:
            series_uid = conn.execute(select(Series.series_instance_uid).where(Series.id == ctx.job.series_id)).scalar()
            audit.record(
                conn,
                "series_deleted",
                actor="discard",
                series_uid=series_uid or "",
                rule=ctx.job.rule,
                job_id=ctx.job.id,
                detail=f"revision {ctx.job.revision}, {len(gone)} instance(s)",
            )
        files, _size = remove_files(ctx.storage, gone)  # last, just before the commit (see node.storage.removal)
    return f"discarded {len(gone)} instances ({files} files removed)"


_SYNTAX = {"none": ExplicitVRLittleEndian, "jpeg2000": JPEG2000Lossless, "rle": RLELossless}


def _compression(action: Any, cfg: Config) -> str:
    """The action's compression, else what its destinations ask for (config validation made them agree)."""
    if action.compression is not None:
        return str(action.compression)
    dests = {d.name: d for d in cfg.destinations}
    wanted = [dests[n].derived_compression for n in action.send_to if n in dests]
    return wanted[0] if wanted else "none"


#: How long a destination's answer to "do you take Label Map SEG?" is reused (seconds); "could not ask"
#: is reused for a shorter while, so a PACS that is down does not hold every job up for its timeout.
_ASKED_TTL = 300.0
_UNASKED_TTL = 30.0
#: The ask is one association request: it should not take a destination's whole (C-STORE) timeout.
_ASK_TIMEOUT = 10.0
_asked: dict[tuple[str, str, int, str], tuple[float, bool | None, str]] = {}


def _label_map_policy(ctx: JobContext, names: list[str]) -> dict[str, str]:
    """label_map_seg of each destination among ``names``."""
    return {d.name: d.label_map_seg for d in ctx.cfg.destinations if d.name in names}


def wants_binary_segs(ctx: JobContext, names: list[str]) -> dict[str, str]:
    """Destinations among ``names`` that get label map SEGs as BINARY SEGs, each with the reason."""
    import dataclasses
    import time

    from node.derive.seg import LABEL_MAP_SEGMENTATION_STORAGE
    from node.send.scu import Peer, accepts

    out: dict[str, str] = {}
    for d in ctx.cfg.destinations:
        if d.name not in names or d.label_map_seg == "send":
            continue
        if d.label_map_seg == "binary":
            out[d.name] = 'label_map_seg = "binary"'
            continue
        if d.type == "dicomweb":  # STOW-RS has no negotiation to ask at: the SEG every PACS takes
            out[d.name] = 'a DICOMweb destination cannot be asked (label_map_seg = "send" sends the label map)'
            continue
        key = (d.host, d.ae_title, d.port, d.calling_ae_title or ctx.cfg.node.ae_title)
        hit = _asked.get(key)
        if hit is None or time.monotonic() - hit[0] > (_ASKED_TTL if hit[1] is not None else _UNASKED_TTL):
            peer = Peer.from_destination(d, ctx.cfg.node.ae_title)
            try:
                hit = (
                    time.monotonic(),
                    accepts(
                        dataclasses.replace(peer, timeout=min(peer.timeout, _ASK_TIMEOUT)),
                        LABEL_MAP_SEGMENTATION_STORAGE,
                    ),
                    "",
                )
            except ConnectionError as e:  # cannot ask now: the SEG every PACS takes
                hit = (time.monotonic(), None, str(e))
            _asked[key] = hit
        if hit[1] is None:
            out[d.name] = f"could not ask it ({hit[2]})"
        elif not hit[1]:
            out[d.name] = "it does not accept Label Map Segmentation Storage"
    return out


def plugin(ctx: JobContext) -> str:
    """Run the plugin(s) on the whole series in a child process, store the outputs, send them on."""
    from node.plugins.registry import PluginLoadError, describe, discover
    from node.plugins.runtime import PluginRunError, plugin_slot, run_in_process
    from node.plugins.worker import StepSpec, WorkSpec

    if ctx.outputs is None:
        raise JobFailed("this node has no output store (internal error)", retryable=False)
    action = PluginAction.model_validate(ctx.job.action)
    cfg = ctx.cfg
    try:
        installed = discover(cfg.plugins)
    except PluginLoadError as e:  # an environment that cannot list its plugins any more (changed since the start)
        raise JobFailed(str(e), retryable=True) from None
    steps = []
    needs = []
    for st in action.steps:
        ref = installed.get(st.name)
        if ref is None:
            raise JobFailed(f"plugin {st.name!r} is not installed any more", retryable=False)
        try:
            needs.append(describe(ref, cfg.plugins).gpu)
        except PluginLoadError as e:
            raise JobFailed(str(e), retryable=False) from None
        # Only the keys the table sets: validated again in the job's process exactly as configured.
        command = (
            cfg.plugins.commands[st.name].model_dump(mode="json", exclude_unset=True) if ref.kind == "command" else None
        )
        steps.append(
            StepSpec(
                st.name,
                ref.target,
                st.params,
                kind=ref.kind,
                environment=ref.environment or "",
                remote=dict(ref.remote) if ref.remote else None,
                command=command,
            )
        )
    i, s = Instance.__table__, Series.__table__
    with ctx.engine.connect() as conn:
        series_uid = conn.execute(select(s.c.series_instance_uid).where(s.c.id == ctx.job.series_id)).scalar_one()
        # The series as of the job's revision (a later revision may still be arriving).
        rels = (
            conn.execute(
                select(i.c.file_path)
                .where(i.c.series_fk == ctx.job.series_id, i.c.job_fk.is_(None), i.c.revision <= ctx.job.revision)
                .order_by(i.c.id)
            )
            .scalars()
            .all()
        )
    study = _study_inputs(ctx)
    if study is not None:  # a study rule's job: the primary as of the revision it fired with
        rels = study.files[study.primary]
    if not rels:
        raise JobFailed("the series has no stored instances (discarded?)", retryable=False)
    # Before the plugin slot (and any work folder): a job waiting for a PACS holds nothing.
    priors = _fetch_priors(ctx, action) if action.priors is not None else []
    # A BINARY copy of each label map is built whenever a destination might need it; which one it
    # needs is asked only once the plugin has actually returned a label map (see _queue_outputs).
    policies = _label_map_policy(ctx, action.send_to)
    work = ctx.outputs.work_dir(ctx.job.id, ctx.job.attempts)
    spec = WorkSpec(
        files=[str(ctx.storage.absolute(r)) for r in rels],
        steps=steps,
        out_dir=str(work),
        # A rerun (run 2, 3, ...) makes new objects; run 1 keeps the UIDs it always had (a retry makes the same).
        job_key=(
            series_uid,
            ctx.job.revision,
            ctx.job.rule + (f"#run{ctx.job.run}" if ctx.job.run > 1 else ""),
            ctx.job.action_index,
        ),
        memory_limit_mb=action.memory_limit_mb if action.memory_limit_mb is not None else cfg.plugins.memory_limit_mb,
        transfer_syntax=str(_SYNTAX[_compression(action, cfg)]),
        keep_empty_frames=action.keep_empty_frames,
        series_number=action.series_number,
        series_description=action.series_description,
        station_name=cfg.node.ae_title,
        attempt=ctx.job.attempts,
        segment_template=action.segment_template,
        unknown_labels=action.unknown_labels,
        labelmap_as_binary=any(p != "send" for p in policies.values()),
        key_objects=_key_objects(action),
    )
    spec.priors = priors
    if study is not None:
        spec.inputs = {name: [str(ctx.storage.absolute(r)) for r in files] for name, files in study.files.items()}
        spec.primary, spec.study = study.primary, study.study
    timeout = action.timeout or cfg.plugins.timeout
    try:
        # A plugin process slot first, then a GPU, then warm workers: nothing is held while waiting for a slot.
        with plugin_slot(cfg.plugins.workers), _plugin_resources(ctx, action, steps, needs, spec) as watch:
            try:
                result = run_in_process(spec, timeout=timeout, cancelled=ctx.cancelled, watch=watch)
            except PluginRunError as e:
                watch.failed(str(e))
                _remove_containers(steps, work)
                kept = _keep_command_logs(ctx, steps, work)
                raise JobFailed(
                    str(e) + "".join(f"; the output of {name}: {kept_at}" for name, _, kept_at in kept),
                    retryable=e.retryable,
                ) from None
            watch.finished(result)
            for _, was, kept_at in _keep_command_logs(ctx, steps, work):  # the error names it: keep it there
                result.error = result.error.replace(str(was), str(kept_at))
        plugin_label = metrics.job_labels("plugin", ctx.job.action)[1]
        if result.timings.get("plugin"):
            metrics.PLUGIN_SECONDS.labels(plugin_label).observe(result.timings["plugin"])
        with ctx.engine.begin() as conn:
            conn.execute(
                update(Job.__table__)
                .where(Job.__table__.c.id == ctx.job.id)
                .values(software=", ".join(result.plugins)[:256])
            )
        if not result.ok and not result.outputs:
            raise JobFailed(result.error, retryable=result.retryable)
        twinned = any(o.twin_of for o in result.outputs)
        binary_for = wants_binary_segs(ctx, action.send_to) if twinned else {}
        notes = [
            (
                f"BINARY copy of label map SEG {o.twin_of} for destinations that do not take Label Map SEG"
                if o.kind == "SEG"
                else f"{o.kind} {o.twin_of} as it refers to the BINARY copies of label map SEGs, for their destinations"
            )
            if o.twin_of
            else ""
            for o in result.outputs
        ]
        stored = ctx.outputs.store(
            [Path(o.file) for o in result.outputs],
            ctx.job.id,
            rule=ctx.job.rule,
            software=", ".join(result.plugins),
            notes=notes,
        )
        for out, output in zip(result.outputs, stored, strict=True):
            if output.outcome != "duplicate" and not out.twin_of:  # a BINARY copy is the same result again
                metrics.OUTPUTS_PRODUCED.labels(plugin_label, out.kind).inc()
    finally:  # outputs were moved into storage; whatever is left (a failed run's files) goes
        shutil.rmtree(work, ignore_errors=True)
    kinds: dict[str, int] = {}
    for o in result.outputs:
        if not o.twin_of:
            kinds[o.kind] = kinds.get(o.kind, 0) + 1
    t = result.timings
    made = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "no output"
    again = sum(1 for output in stored if output.outcome == "duplicate")
    summary = (
        f"{made} from {len(rels)} source instances ({', '.join(result.plugins)}; load {t['load']:.1f} s, "
        f"plugin {t['plugin']:.1f} s, "
        + (f"worker transfer {t['transfer'] * 1000:.0f} ms, " if "transfer" in t else "")
        + f"build {t['build']:.1f} s, write {t['write']:.1f} s; "
        f"peak memory {result.peak_mb:.0f} MiB, {result.peak_added_mb:.0f} MiB for the job)"
    )
    if action.priors is not None:
        given = ", ".join(f"{p['study_date'] or p['study_uid']} ({len(p['series'])} series)" for p in priors)
        summary += f"; priors from {action.priors.source}: {given or 'none found'}"
    if result.notes:
        summary += "; " + "; ".join(result.notes)
    if again:
        summary += f"; {again} already stored by an earlier run"
    twins = sum(1 for o in result.outputs if o.twin_of and o.kind == "SEG")
    if twins and binary_for:
        why = "; ".join(f"{n}: {r}" for n, r in sorted(binary_for.items()))
        summary += f"; {twins} label map SEG(s) also written as BINARY SEG for {why}"
    elif twins:
        summary += f"; {twins} label map SEG(s) also written as BINARY SEG (kept; every destination takes label maps)"
    log.info("job %d: %s", ctx.job.id, summary)
    if action.send_to and stored:
        summary += "; " + _queue_outputs(ctx, result.outputs, action.send_to, binary_for)
    if not result.ok:  # what was built before the failure is kept and sent; the job says what failed
        raise JobFailed(f"{result.error} ({summary})", retryable=result.retryable)
    return summary


def _key_objects(action: PluginAction) -> dict[str, str] | None:
    """The action's Key Object Selection title for the worker (``key_objects``), None for none."""
    if action.key_objects is False:
        return None
    if action.key_objects is True:
        from node.derive.kos import DEFAULT_TITLE

        return {
            "value": DEFAULT_TITLE.value,
            "scheme": DEFAULT_TITLE.scheme_designator,
            "meaning": DEFAULT_TITLE.meaning,
        }
    return action.key_objects.model_dump()


@dataclass(frozen=True)
class StudyInputs:
    """A study rule's job: the stored files of each named input (as of its revision), the primary's name, the study."""

    primary: str
    files: dict[str, list[str]]
    study: dict[str, str]


def _study_inputs(ctx: JobContext) -> StudyInputs | None:
    """The inputs of the study trigger a job belongs to (node.decide.study made it), or None for a series job."""
    i, j, t = Instance.__table__, Job.__table__, StudyTrigger.__table__
    st, p = Study.__table__, Patient.__table__
    with ctx.engine.connect() as conn:
        row = conn.execute(
            select(t.c.inputs, st.c.study_instance_uid, st.c.study_date, p.c.patient_id)
            .select_from(j.join(t, t.c.id == j.c.study_trigger_fk).join(st, st.c.id == t.c.study_fk))
            .join(p, p.c.id == st.c.patient_fk)
            .where(j.c.id == ctx.job.id)
        ).first()
        if row is None:
            return None
        fired = json.loads(row.inputs)
        files: dict[str, list[str]] = {}
        for name, inp in fired["inputs"].items():
            files[name] = list(
                conn.execute(
                    select(i.c.file_path)
                    .where(i.c.series_fk == inp["series_id"], i.c.job_fk.is_(None), i.c.revision <= inp["revision"])
                    .order_by(i.c.id)
                ).scalars()
            )
            if not files[name]:
                raise JobFailed(
                    f"input {name} (series {inp['series_uid']}) has no stored instances (discarded?)", retryable=False
                )
    study = {"study_uid": row.study_instance_uid, "study_date": row.study_date, "patient_id": row.patient_id}
    return StudyInputs(str(fired["primary"]), files, study)


def _fetch_priors(ctx: JobContext, action: PluginAction) -> list[dict[str, Any]]:
    """The action's prior studies for the worker (node.qr.priors): all held, or the job waits (JobDeferred) for
    its source or for the retrieves the node process's pool runs meanwhile."""
    from node.qr.priors import PriorsFailed, PriorsWaiting, fetch_priors

    try:
        priors = fetch_priors(
            ctx.cfg,
            ctx.engine,
            ctx.job.id,
            ctx.job.series_id,
            action.priors,
            note=lambda text: _note_running(ctx, text),
            ingest=ctx.ingest,
            retrieves=ctx.retrieves,
        )
    except PriorsWaiting as e:
        raise JobDeferred(str(e), e.retry_at) from None
    except PriorsFailed as e:
        raise JobFailed(str(e), retryable=False) from None
    if ctx.cancelled():
        raise JobFailed("cancelled", retryable=False)
    out = []
    for p in priors:
        p.series = [[str(ctx.storage.absolute(f)) for f in files] for files in p.series]
        out.append(p.as_spec())
    return out


def _keep_command_logs(ctx: JobContext, steps: list[Any], work: Path) -> list[tuple[str, Path, Path]]:
    """Move the command plugins' logs out of the job's folder (which goes) into <data_dir>/logs/commands.

    Returns (plugin, where it was, where it is now) for each.
    """
    kept = []
    for k, st in enumerate(steps):
        log_file = work / f"command-{k}" / "command.log"
        if st.kind != "command" or not log_file.exists():
            continue
        folder = ctx.cfg.data_dir / "logs" / "commands"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / f"job-{ctx.job.id}-attempt-{ctx.job.attempts}-{st.name}.log"
        shutil.move(str(log_file), target)
        kept.append((st.name, log_file, target))
    return kept


def _remove_containers(steps: list[Any], work: Path) -> None:
    """After a job's process was killed: the containers its command steps started (a killed client leaves them)."""
    from node.plugins.commands import remove_container

    for k, st in enumerate(steps):
        if st.kind == "command":
            remove_container(work / f"command-{k}")


def _note_running(ctx: JobContext, text: str) -> None:
    """Say what a running job waits for (its result column until it ends), in the log and for jobs show."""
    log.info("job %d: %s", ctx.job.id, text)
    j = Job.__table__
    with ctx.engine.begin() as conn:
        conn.execute(update(j).where(j.c.id == ctx.job.id, j.c.state == JobState.RUNNING).values(result=text[:1000]))


class _Resources:
    """The GPU and warm workers a plugin job holds while its process runs; ``watch`` for run_in_process."""

    def __init__(self, ctx: JobContext, limit_mb: int) -> None:
        self.ctx = ctx
        self.limit_mb = limit_mb
        self.workers: list[Worker] = []
        self.gpu: Any = None

    def __call__(self) -> str | None:
        """A reason to stop the job now: a worker of it died, or went over the memory limit."""
        for w in self.workers:
            if not w.alive():  # a child it forked may hold the job's connection open: do not wait for a timeout
                return w.death()
            if self.limit_mb:
                rss = w.rss_mb()
                if rss > self.limit_mb:
                    return (
                        f"the worker of {w.key} used {rss:.0f} MB, over the memory limit of {self.limit_mb} MB, "
                        "and was stopped (raise memory_limit_mb for this rule, or [plugins] memory_limit_mb; for "
                        "a plugin in an environment it bounds its worker's resident memory, model included)"
                    )
        return None

    def failed(self, why: str) -> None:
        """The job's process was stopped (timeout, cancel, memory) or crashed: its workers' state is unknown."""
        for w in self.workers:
            w.throw_away(f"job {self.ctx.job.id} failed while it used it: {why}")
        self.workers = []

    def finished(self, result: Any) -> None:
        """Give the workers back; a worker that died during the job explains the job's error."""
        for w in self.workers:
            if not w.alive():
                result.error = (result.error + "; " if result.error else "") + w.death()
                result.retryable = True  # the next attempt gets a new worker
            else:
                result.notes.append(
                    f"warm worker pid {w.pid} for {w.key}: its job {w.jobs + 1}, setup "
                    f"{w.setup_seconds:.1f} s when it started"
                )
            w.give_back(healthy=w.alive())
        self.workers = []

    def close(self) -> None:
        """The job ended before its process ran (cancelled, a second worker failed to start): give all back."""
        try:
            for w in self.workers:
                w.give_back(healthy=w.alive())
            self.workers = []
        finally:
            if self.gpu is not None:
                self.gpu.release()


@contextlib.contextmanager
def _plugin_resources(ctx: JobContext, action: Any, steps: list[Any], needs: list[str], spec: Any) -> Any:
    """Take a GPU (when the job needs one) and a warm worker for each environment step; fill them into ``spec``."""
    from node.plugins.gpus import GpuWaitCancelled, job_need, slots_for
    from node.plugins.pool import WorkerKey, WorkerSpec, WorkerStartError, pool

    cfg = ctx.cfg
    res = _Resources(ctx, spec.memory_limit_mb)
    need = job_need(action.gpu, needs)
    try:
        if need != "none":
            try:
                res.gpu = slots_for(cfg.plugins.gpus).acquire(
                    need,
                    priority=ctx.job.priority,
                    cancelled=ctx.cancelled,
                    label=f"job {ctx.job.id}",
                    on_wait=lambda text: _note_running(ctx, text),
                )
            except GpuWaitCancelled:
                raise JobFailed("cancelled while waiting for a GPU", retryable=False) from None
            spec.device = res.gpu.device
            if res.gpu.device is not None:
                _note_running(ctx, f"running on GPU {res.gpu.device}")
        if cfg.plugins.gpus:  # the node schedules GPUs: a job sees only the one it was given
            spec.environ = {"CUDA_VISIBLE_DEVICES": spec.device or ""}
        for st in steps:
            if st.kind != "environment":
                continue
            env = cfg.plugins.environments[st.environment]
            key = WorkerKey(st.environment, st.name, st.target, spec.device)
            try:
                w = pool(cfg.data_dir / "logs" / "workers").lease(
                    key,
                    WorkerSpec(env.python, dict(env.env), env.warm(st.name)),
                    ctx.cancelled,
                    on_wait=lambda text: _note_running(ctx, text),
                )
            except WorkerStartError as e:
                raise JobFailed(str(e), retryable=True) from None
            res.workers.append(w)
            st.socket = w.socket
        yield res
    finally:
        res.close()


def _queue_outputs(ctx: JobContext, outputs: list[Any], names: list[str], binary_for: dict[str, str]) -> str:
    """Queue a job's outputs: label map SEGs to the destinations that take them, their BINARY copies to the rest."""
    i = Instance.__table__
    with ctx.engine.connect() as conn:
        ids = dict(conn.execute(select(i.c.sop_instance_uid, i.c.id).where(i.c.job_fk == ctx.job.id)).all())
        # A run again (a retry) routes each destination as the first run did: one of the two, never both.
        d = Delivery.__table__
        earlier = set(conn.execute(select(d.c.sop_instance_uid, d.c.destination).where(d.c.job_fk == ctx.job.id)).all())
    twin_of = {o.sop_instance_uid: o.twin_of for o in outputs if o.twin_of}
    twinned = set(twin_of.values())

    def binary(label_map: str, twin: str, dest: str) -> bool:
        if (label_map, dest) in earlier or (twin, dest) in earlier:
            return (twin, dest) in earlier
        return dest in binary_for

    twin_for = {lm: tw for tw, lm in twin_of.items()}
    groups: dict[tuple[str, ...], list[int]] = {}
    for o in outputs:
        if o.twin_of:
            to = [n for n in names if binary(o.twin_of, o.sop_instance_uid, n)]
        elif o.sop_instance_uid in twinned:
            to = [n for n in names if not binary(o.sop_instance_uid, twin_for[o.sop_instance_uid], n)]
        else:
            to = names
        if to and o.sop_instance_uid in ids:
            groups.setdefault(tuple(to), []).append(ids[o.sop_instance_uid])
    return "; ".join(_queue(ctx, sorted(pks), list(to)) for to, pks in groups.items()) or "nothing to queue"


HANDLERS: dict[str, Callable[[JobContext], str]] = {"forward": forward, "discard": discard, "plugin": plugin}


def handler_for(kind: str) -> Callable[[JobContext], Any]:
    try:
        return HANDLERS[kind]
    except KeyError:
        raise JobFailed(f"unknown job kind {kind!r}", retryable=False) from None
