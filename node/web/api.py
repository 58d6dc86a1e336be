"""The REST API under /api: everything the dashboard shows and does, described by the OpenAPI spec at /openapi.json."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from fastapi import APIRouter, Depends, HTTPException, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, Field, create_model

from node import audit
from node.index import read
from node.index.states import DeliveryState, JobState, SeriesState
from node.web import data
from node.web.actions import (
    ActionResult,
    Change,
    JobId,
    Refused,
    Selection,
    delivery_change,
    forward_now,
    job_change,
    rerun_job,
    rerun_rules,
)
from node.web.context import WebContext, api_user, context
from node.web.tester import RuleTest, RuleTestReport, try_rule

log = logging.getLogger(__name__)

router = APIRouter(prefix="/api", dependencies=[Depends(api_user)])

Limit = Query(50, ge=1, le=1000)
Offset = Query(0, ge=0, le=10**9)


def _as_json(hint: Any) -> Any:
    """The type a field has once :func:`node.web.data.jsonable` made a time of it an ISO 8601 string."""
    if hint is dt.datetime:
        return str
    args = typing.get_args(hint)
    if dt.datetime in args:
        return typing.Union[tuple(str if a is dt.datetime else a for a in args)]  # noqa: UP007 (built at run time)
    return hint


def row_model(
    row: type[Any], name: str, *, base: type[BaseModel] = BaseModel, described: dict[str, str] | None = None
) -> type[BaseModel]:
    """The API's model of a read-model row (a dataclass), made from its fields, so the two cannot drift apart.

    Fields ``base`` already has are left to it (e.g. :class:`StudyKeys`); every field is required, as the row
    always sends it.
    """
    hints = typing.get_type_hints(row)
    fields: dict[str, Any] = {
        f.name: (_as_json(hints[f.name]), Field(description=(described or {}).get(f.name)))
        for f in dataclasses.fields(row)
        if f.name not in base.model_fields
    }
    return create_model(name, __base__=base, __doc__=f":class:`{row.__module__}.{row.__qualname__}` as JSON.", **fields)


class DestinationModel(BaseModel):
    name: str
    states: dict[str, int]
    oldest_queued: str | None
    next_attempt: str | None
    last_error: str


class RateModel(BaseModel):
    at: float
    received_per_s: float
    sent_per_s: float


class DiskModel(BaseModel):
    total_bytes: int
    used_bytes: int
    free_bytes: int


class OverviewModel(BaseModel):
    patients: int
    studies: int
    series: int
    instances: int
    outputs: int = Field(description="instances this node produced (SEG, SC, ...)")
    stored_bytes: int
    series_states: dict[str, int]
    job_states: dict[str, int]
    destinations: list[DestinationModel]
    disk: DiskModel
    rates: list[RateModel] = Field(description="instances/s received and sent, sampled every 5 s, last hour")
    now: str


if TYPE_CHECKING:  # mypy cannot see into a model made at run time: to it, these are models of their own
    StudyKeys = BaseModel
    SeriesModel = BaseModel
    JobModel = BaseModel
    JobDetail = BaseModel
    DeliveryModel = BaseModel
    DeliveryGroupModel = BaseModel
else:
    StudyKeys = row_model(read.StudyKeys, "StudyKeys")
    SeriesModel = row_model(read.SeriesRow, "SeriesModel", base=StudyKeys)
    JobModel = row_model(read.JobRow, "JobModel")
    JobDetail = row_model(
        read.JobDetail, "JobDetail", base=JobModel, described={"action": "the rule action this job runs, as JSON"}
    )
    DeliveryModel = row_model(read.DeliveryRow, "DeliveryModel")
    DeliveryGroupModel = row_model(read.DeliveryGroup, "DeliveryGroupModel")


class SeriesPage(BaseModel):
    total: int
    items: list[SeriesModel]


class StudyModel(StudyKeys):
    last_received_at: str | None
    series_count: int
    instance_count: int
    series: list[SeriesModel]


class StudyPage(BaseModel):
    total: int
    items: list[StudyModel]


class JobPage(BaseModel):
    total: int
    items: list[JobModel]


class DeliveryPage(BaseModel):
    total: int
    items: list[DeliveryModel]


class DeliveryGroupPage(BaseModel):
    total: int = Field(description="how many series match: limit and offset count series, each with its destinations")
    items: list[DeliveryGroupModel]


class ChangesModel(BaseModel):
    version: str = Field(description="changes whenever what the dashboard shows changes; poll it, compare")


class RevisionModel(BaseModel):
    revision: int
    instance_count: int
    stable_at: str | None
    stable_reason: str
    triggered_at: str | None
    matched_rules: list[str]
    error: str


class TimelineEvent(BaseModel):
    at: str
    offset_s: float = Field(description="seconds since the first event")
    step: str = Field(description="received, stable, rules, job, output, delivered, failed or queued")
    text: str


class OutputModel(BaseModel):
    sop_instance_uid: str
    sop_class: str
    job_id: int
    series_instance_uid: str
    series_description: str
    modality: str
    kind: str = Field(description="SEG, SC, SR, KOS, Parametric Map, or 'derived CT image' (its modality)")
    software: str = Field(description="the plugins (name and version) of the job that made it")


class SeriesDetail(SeriesModel):
    body_part_examined: str
    manufacturer: str
    station_name: str
    made_by: dict[str, Any] | None = Field(description="for an output: the job and source series that made it")
    received_from: dict[str, str] | None
    sop_class: str
    transfer_syntax: str
    revisions: list[RevisionModel]
    rules_now: list[str] = Field(description="each rule evaluated now against the series, and why it (did not) match")
    jobs: list[JobModel]
    outputs: list[OutputModel]
    deliveries: dict[str, dict[str, dict[str, int]]] = Field(
        description='{"source"|"outputs": {destination: {state: count}}}'
    )
    timeline: list[TimelineEvent]


class RuleModel(BaseModel):
    name: str
    priority: int | Literal["urgent"]
    enabled: bool
    stop: bool
    match: dict[str, Any]
    actions: list[str]
    matched_revisions: int


class PluginModel(BaseModel):
    name: str
    target: str
    source: str
    package_version: str
    #: "local" (the node's own Python), "environment" (a warm worker in its own Python) or "command".
    kind: str
    #: The [plugins.environments] name, for an environment plugin.
    environment: str
    version: str
    description: str
    error: str
    used_by_rules: list[str]


class LineageModel(BaseModel):
    uid: str
    lines: list[str]


class AuditEventModel(BaseModel):
    id: int
    at: str
    kind: str
    actor: str
    calling_ae: str
    called_ae: str
    peer_address: str
    study_uid: str
    series_uid: str
    sop_instance_uid: str
    rule: str
    job_id: int | None
    destination: str
    status: int | None
    detail: str


class AuditPage(BaseModel):
    total: int
    items: list[AuditEventModel]


def _not_found(e: LookupError) -> HTTPException:
    return HTTPException(404, str(e.args[0] if e.args else e))


@router.get("/overview", response_model=OverviewModel, summary="Counts, states, queues, disk use and rates")
def get_overview(ctx: WebContext = Depends(context)) -> dict[str, Any]:
    return data.overview(ctx.reader, ctx.cfg, ctx.sampler)


@router.get("/studies", response_model=StudyPage, summary="Studies, newest first, with their series")
def get_studies(
    q: str = Query("", max_length=256, description="patient name or ID, accession, description or UID"),
    limit: int = Query(25, ge=1, le=500),
    offset: int = Offset,
    ctx: WebContext = Depends(context),
) -> dict[str, Any]:
    return data.studies(ctx.reader, q=q, limit=limit, offset=offset)


@router.get("/series", response_model=SeriesPage, summary="Series, most recently received first")
def get_series_list(
    q: str = Query("", max_length=256),
    state: SeriesState | None = None,
    modality: str = Query("", max_length=16),
    study_uid: str = Query("", max_length=64),
    limit: int = Limit,
    offset: int = Offset,
    ctx: WebContext = Depends(context),
) -> dict[str, Any]:
    return data.page_json(
        read.series(
            ctx.reader, q=q, state=state or "", modality=modality, study_uid=study_uid, limit=limit, offset=offset
        )
    )


@router.get(
    "/series/{uid}",
    response_model=SeriesDetail,
    responses={404: {"description": "no such series"}},
    summary="One series: revisions, rules and why, jobs, outputs, deliveries and its timeline",
)
def get_series(uid: str, ctx: WebContext = Depends(context)) -> dict[str, Any]:
    try:
        return data.series_detail(ctx.reader, ctx.cfg, uid)
    except data.NotFound as e:
        raise _not_found(e) from None


@router.get(
    "/series/{uid}/preview.png",
    response_class=Response,
    summary="A slice of the series as a PNG",
    responses={
        200: {"content": {"image/png": {}}},
        404: {"description": "no such series"},
        422: {"description": "the image cannot be decoded"},
    },
)
def get_preview(
    uid: str,
    index: int | None = Query(None, ge=0, le=10**6, description="instance (default: middle)"),
    frame: int | None = Query(None, ge=0, le=10**6),
    size: int = Query(512, ge=16, le=1024),
    ctx: WebContext = Depends(context),
) -> Response:
    from node.web.preview import NoPreview, render_png

    try:
        path, _ = data.instance_file(ctx.reader, ctx.cfg.data_dir, uid, index)
        png = render_png(path, frame, size)
    except data.NotFound as e:
        raise _not_found(e) from None
    except (NoPreview, OSError, ValueError) as e:
        raise HTTPException(422, f"no preview: {e}") from None
    return Response(png, media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


@router.get(
    "/lineage/{uid}",
    response_model=LineageModel,
    responses={404: {"description": "unknown UID"}},
    summary="Source -> jobs (plugin versions) -> outputs -> deliveries, from any SOP or series UID",
)
def get_lineage(
    uid: str,
    plugin_version: str = Query(
        "", max_length=128, description='only jobs made with this plugin version: "1.2", "NAME 1.2" or "NAME==1.2"'
    ),
    ctx: WebContext = Depends(context),
) -> dict[str, Any]:
    from node.index.lineage import NotFound, lineage

    try:
        return {"uid": uid, "lines": lineage(ctx.reader, uid, plugin_version)}
    except NotFound as e:
        raise _not_found(e) from None


@router.get("/jobs", response_model=JobPage, summary="Jobs, newest first")
def get_jobs(
    state: JobState | None = None,
    series_uid: str = Query("", max_length=64),
    limit: int = Limit,
    offset: int = Offset,
    ctx: WebContext = Depends(context),
) -> dict[str, Any]:
    return data.page_json(read.jobs(ctx.reader, state=state or "", series_uid=series_uid, limit=limit, offset=offset))


@router.get("/jobs/{job_id}", response_model=JobDetail, responses={404: {"description": "no such job"}})
def get_job(job_id: int = JobId, ctx: WebContext = Depends(context)) -> dict[str, Any]:
    try:
        return data.job(ctx.reader, job_id)
    except data.NotFound as e:
        raise _not_found(e) from None


def _acting(change: Callable[[], ActionResult]) -> ActionResult:
    """Runs an operator action; one it refuses answers with the refusal's status (404, 409, 422) and reason."""
    try:
        return change()
    except Refused as e:
        raise HTTPException(e.status, e.message) from None


def _job_action(what: Change, refused: str) -> None:
    """``POST /api/jobs/{job_id}/<what>``: one route per change, so each has its own entry in the spec."""

    @router.post(
        f"/jobs/{{job_id}}/{what}",
        name=f"post_job_{what}",
        response_model=ActionResult,
        responses={404: {"description": "no such job"}, 409: {"description": refused}},
    )
    def post(job_id: int = JobId, ctx: WebContext = Depends(context), user: str = Depends(api_user)) -> ActionResult:
        return _acting(lambda: job_change(ctx, job_id, what, user))


_job_action("retry", "the job is not failed or cancelled")
_job_action("cancel", "the job is not pending or running")


@router.post(
    "/jobs/{job_id}/rerun",
    response_model=ActionResult,
    responses={404: {"description": "no such job"}, 409: {"description": "the job is pending or running"}},
    summary="Run a finished job again as a new job (a plugin's new outputs get new UIDs; the old ones stay)",
)
def post_job_rerun(
    job_id: int = JobId, ctx: WebContext = Depends(context), user: str = Depends(api_user)
) -> ActionResult:
    return _acting(lambda: rerun_job(ctx, job_id, user))


@router.post(
    "/series/{uid}/rerun-rules",
    response_model=ActionResult,
    responses={
        404: {"description": "no such series"},
        409: {"description": "the series has no stable revision or no stored instances"},
    },
    summary="Evaluate the current rules on the series' latest revision again and make the matching rules' jobs",
)
def post_series_rerun_rules(
    uid: str, ctx: WebContext = Depends(context), user: str = Depends(api_user)
) -> ActionResult:
    return _acting(lambda: rerun_rules(ctx, uid, user))


class ForwardRequest(BaseModel):
    destination: str = Field(min_length=1, max_length=64, description="a configured destination's name")


@router.post(
    "/series/{uid}/forward",
    response_model=ActionResult,
    responses={
        400: {"description": "the body is not JSON"},
        404: {"description": "no such series, or it has no stored instances"},
        422: {"description": "not a configured destination"},
    },
    summary="Queue the series' stored instances for a destination now (sent again where delivered before)",
)
def post_series_forward(
    uid: str, body: ForwardRequest, ctx: WebContext = Depends(context), user: str = Depends(api_user)
) -> ActionResult:
    return _acting(lambda: forward_now(ctx, uid, body.destination, user))


@router.get(
    "/deliveries",
    response_model=DeliveryPage | DeliveryGroupPage,
    summary="Deliveries (one per instance and destination), newest first; or per series and destination",
)
def get_deliveries(
    destination: str = Query("", max_length=64),
    state: DeliveryState | None = None,
    series_uid: str = Query("", max_length=64),
    group: Literal["series"] | None = Query(
        None, description="series: one item per (series, destination) with counts by state (DeliveryGroupPage)"
    ),
    limit: int = Limit,
    offset: int = Offset,
    ctx: WebContext = Depends(context),
) -> dict[str, Any]:
    listing = read.delivery_groups if group == "series" else read.deliveries
    return data.page_json(listing(ctx.reader, read.DeliveryQuery(destination, state or "", series_uid, limit, offset)))


@router.get("/changes", response_model=ChangesModel, summary="A fingerprint of the dashboard's data, to poll")
def get_changes(ctx: WebContext = Depends(context)) -> dict[str, str]:
    return {"version": read.changes(ctx.reader)}


_BODY_ERRORS: dict[int | str, dict[str, Any]] = {400: {"description": "the body is not JSON"}}


@router.post(
    "/deliveries/retry",
    response_model=ActionResult,
    responses=_BODY_ERRORS,
    summary="Queue failed or cancelled deliveries again (and waiting ones now, for a whole destination)",
)
def post_deliveries_retry(
    sel: Selection, ctx: WebContext = Depends(context), user: str = Depends(api_user)
) -> ActionResult:
    return delivery_change(ctx, "retry", sel, user)


@router.post(
    "/deliveries/cancel", response_model=ActionResult, responses=_BODY_ERRORS, summary="Cancel queued deliveries"
)
def post_deliveries_cancel(
    sel: Selection, ctx: WebContext = Depends(context), user: str = Depends(api_user)
) -> ActionResult:
    return delivery_change(ctx, "cancel", sel, user)


@router.get("/rules", response_model=list[RuleModel], summary="The configured rules and how often each matched")
def get_rules(ctx: WebContext = Depends(context)) -> list[dict[str, Any]]:
    return data.rules(ctx.cfg, ctx.reader)


@router.post(
    "/rules/test",
    response_model=RuleTestReport,
    responses={400: {"description": "the body is not JSON"}},
    summary="Try a rule (TOML) on stored series: which match and why; errors name their key; nothing is changed",
)
def post_rules_test(body: RuleTest, ctx: WebContext = Depends(context)) -> RuleTestReport:
    return try_rule(ctx.cfg, ctx.reader, body)


@router.get("/plugins", response_model=list[PluginModel], summary="Installed plugins, their versions and users")
def get_plugins(ctx: WebContext = Depends(context)) -> list[dict[str, Any]]:
    return data.plugins(ctx.cfg)


if TYPE_CHECKING:
    AuditKind = str
else:  # the kinds as an enum in the OpenAPI spec, and a 422 for an unknown one
    AuditKind = Literal[tuple(audit.KINDS)]


@router.get(
    "/audit",
    response_model=AuditPage,
    summary="The append-only audit trail: connections, stored instances, rules, outputs, deliveries, operators",
)
def get_audit(
    kind: list[AuditKind] = Query(default_factory=list),
    uid: str = Query("", max_length=64),
    since: dt.datetime | None = None,
    until: dt.datetime | None = None,
    limit: int = Limit,
    offset: int = Offset,
    ctx: WebContext = Depends(context),
) -> dict[str, Any]:
    kinds, about = kind or None, uid or None
    items = audit.query(ctx.reader, since=since, until=until, kind=kinds, uid=about, limit=limit, offset=offset)
    total = audit.count(ctx.reader, since=since, until=until, kind=kinds, uid=about)
    return {"total": total, "items": [e | {"at": data.iso(e["at"])} for e in items]}


class RetentionModel(BaseModel):
    enabled: bool
    config: dict[str, Any] = Field(description="the [retention] section in force")
    last_report: dict[str, Any] | None = Field(description="the newest real run's report (this process), if any")


@router.get("/retention", response_model=RetentionModel, summary="The clean-up's settings and its last run")
def get_retention(ctx: WebContext = Depends(context)) -> dict[str, Any]:
    r = ctx.retention
    return {
        "enabled": r is not None,
        "config": ctx.cfg.retention.model_dump(mode="json"),
        "last_report": r.last_report.as_dict() if r is not None and r.last_report else None,
    }


@router.post(
    "/retention/run",
    response_model=dict[str, Any],
    responses={409: {"description": "retention is off (a dry run still works), or a run is going on"}},
    summary="Run the clean-up now; with dry_run, only say what would be deleted",
)
def post_retention_run(
    dry_run: bool = True, ctx: WebContext = Depends(context), user: str = Depends(api_user)
) -> dict[str, Any]:
    from node.storage import Storage
    from node.storage.retention import Retention, RetentionBusy

    r = ctx.retention
    if r is None:
        if not dry_run:
            raise HTTPException(
                409, "retention is off ([retention] enabled = false); a dry run still shows what it would delete"
            )
        r = Retention(ctx.cfg, ctx.engine, Storage(ctx.cfg.data_dir), reader=ctx.reader)
    try:
        report = r.run_once(dry_run=dry_run, actor=user)
    except RetentionBusy as e:
        raise HTTPException(409, str(e)) from None
    if not dry_run:
        log.info("retention run by %s: %d series, %d instances deleted", user, report.series, report.instances)
    return report.as_dict()


@router.get("/whoami", summary="The user this request is authenticated as")
def whoami(request: Request, user: str = Depends(api_user)) -> dict[str, str]:
    return {"user": user}
