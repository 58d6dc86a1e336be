"""DICOMweb (PS3.18) under /dicom-web: STOW-RS, QIDO-RS, WADO-RS and rendered, with the API's authentication.

STOW-RS streams into the C-STORE write path (node.web.dicomweb_stow); QIDO-RS and WADO-RS's instance
look-up go through node.index.query, the same query engine as C-FIND/C-MOVE/C-GET; WADO-RS reads the
stored files (node.web.dicomweb_wado).
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydicom.dataset import Dataset
from pydicom.uid import UID
from python_multipart.multipart import MAX_BOUNDARY_LENGTH, parse_options_header
from starlette.requests import ClientDisconnect

from node import audit
from node.dicom.multipart import Body, Part
from node.dicom.status import Status
from node.index import query
from node.index.query import InstanceRef, Level
from node.receive.ingest import Ingest, Peer
from node.web import dicomweb_wado as wado
from node.web.context import WebContext, api_user, context
from node.web.dicomweb_stow import MalformedBody, PartResult, StorePool, StowReceiver

log = logging.getLogger(__name__)

PREFIX = "/dicom-web"
DICOM_JSON = "application/dicom+json"
#: The calling AE title that instances stored through STOW-RS are indexed with (rules can match it).
STOW_CALLING_AE = "STOW-RS"
#: The longest multipart boundary taken. RFC 2046 5.1.1 allows 70 characters, but Orthanc's DICOMweb plugin
#: sends 73 (two UUIDs): be liberal up to what the multipart parser takes.
MAX_BOUNDARY = MAX_BOUNDARY_LENGTH


@asynccontextmanager
async def _lifespan(app: Any) -> AsyncIterator[None]:
    """Stops the STOW-RS store threads with the app (when the server runs the lifespan)."""
    yield
    pool: StorePool | None = getattr(app.state, "stow_pool", None)
    if pool is not None:
        pool.shutdown()


router = APIRouter(prefix=PREFIX, tags=["dicomweb"], lifespan=_lifespan)


def _store_pool(request: Request) -> StorePool:
    """The app's one STOW-RS store pool, made by its first STOW-RS request (on the event loop: no race)."""
    state = request.app.state
    pool: StorePool | None = getattr(state, "stow_pool", None)
    if pool is None:
        pool = state.stow_pool = StorePool()
    return pool


def problem(status: int, message: str) -> JSONResponse:
    """An error answer: the same {"detail": ...} body as the REST API's, saying what to change."""
    return JSONResponse({"detail": message}, status_code=status)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + PREFIX


def _audit(
    request: Request,
    user: str,
    kind: str,
    status: int,
    detail: str,
    *,
    study: str = "",
    series: str = "",
    sop: str = "",
) -> None:
    """One audit event per QIDO-RS or WADO-RS request, as for C-FIND/C-MOVE/C-GET (key names, never values)."""
    ctx = context(request)
    if ctx.ingest is None:
        return
    audit.submit(
        ctx.ingest.writer,
        kind,
        actor=user,
        peer_address=request.client.host if request.client else "",
        study_uid=study,
        series_uid=series,
        sop_instance_uid=sop,
        status=status,
        detail=detail,
    )


# --- STOW-RS ---------------------------------------------------------------------------------------


def _stow_boundary(content_type: str) -> str | JSONResponse:
    """The boundary of a STOW-RS body, or the 415/400 answer saying what is accepted."""
    media, params = parse_options_header(content_type)
    accepted = 'send Content-Type: multipart/related; type="application/dicom"; boundary=... (Part 10 files)'
    if media.decode("latin-1").lower() != "multipart/related":
        return problem(415, f"STOW-RS takes multipart/related, not {content_type or 'no Content-Type'}: {accepted}")
    kind = params.get(b"type", b"application/dicom").decode("latin-1").strip().lower()
    if kind != "application/dicom":
        return problem(
            415,
            f"STOW-RS here takes parts of type application/dicom, not {kind} (metadata with bulk data is not "
            f"supported): {accepted}",
        )
    boundary = params.get(b"boundary", b"").decode("latin-1")
    if not boundary:
        return problem(400, f"the multipart/related Content-Type has no boundary parameter: {accepted}")
    if len(boundary) > MAX_BOUNDARY:
        return problem(
            400,
            f"the multipart boundary is {len(boundary)} characters long: at most {MAX_BOUNDARY} are taken "
            "(RFC 2046 allows 70)",
        )
    return boundary


def _uid(vr: str, value: str) -> dict[str, Any]:
    return {"vr": vr, "Value": [value]} if value else {"vr": vr}


def stow_response(results: list[PartResult], base: str) -> tuple[int, dict[str, Any]]:
    """The Store Instances Response Module (PS3.18 10.5.3) and its HTTP status.

    200: all stored; 202: some failed, or stored with a warning; 409: none stored. A failed item's
    FailureReason is the DIMSE status (0xA700 out of resources, 0xA900 data set does not match, 0xC000
    cannot understand); its ErrorComment (0000,0902) says why in words (not cut to LO's 64 characters: it
    is for people, and DICOM JSON readers take longer values).
    """
    referenced, failed = [], []
    studies = set()
    for r in results:
        item = {"00081150": _uid("UI", r.sop_class_uid), "00081155": _uid("UI", r.sop_instance_uid)}
        if r.stored:
            studies.add(r.study_uid)
            item["00081190"] = _uid(
                "UR", f"{base}/studies/{r.study_uid}/series/{r.series_uid}/instances/{r.sop_instance_uid}"
            )
            if r.status != Status.SUCCESS:
                item["00081196"] = {"vr": "US", "Value": [r.status]}
                item["00000902"] = _uid("LO", r.reason)
            referenced.append(item)
        else:
            item["00081197"] = {"vr": "US", "Value": [r.status]}
            item["00000902"] = _uid("LO", r.reason)
            failed.append(item)
    body: dict[str, Any] = {}
    if len(studies) == 1:
        body["00081190"] = _uid("UR", f"{base}/studies/{studies.pop()}")
    if referenced:
        body["00081199"] = {"vr": "SQ", "Value": referenced}
    if failed:
        body["00081198"] = {"vr": "SQ", "Value": failed}
    warned = any(r.stored and r.status != Status.SUCCESS for r in results)
    if not referenced:
        return 409, body
    return (202 if failed or warned else 200), body


async def _stow(request: Request, user: str, study: str | None) -> Response:
    ctx: WebContext = context(request)
    if ctx.ingest is None:
        return problem(503, "this node process does not store instances (no ingest path): send to the node itself")
    boundary = _stow_boundary(request.headers.get("content-type", ""))
    if isinstance(boundary, Response):
        return boundary
    request_id = f"stow-{uuid.uuid4().hex[:16]}"
    address = request.client.host if request.client else ""
    peer = Peer(STOW_CALLING_AE, ctx.cfg.node.ae_title, address, request_id)
    ingest: Ingest = ctx.ingest
    receiver = StowReceiver(boundary, ingest, peer, study=study, pool=_store_pool(request))
    complete = False
    try:
        async for chunk in request.stream():
            if chunk:
                await run_in_threadpool(receiver.feed, chunk)
        results = await run_in_threadpool(receiver.finish)
        complete = True
    except MalformedBody as e:
        await run_in_threadpool(receiver.collect)  # the stores already under way end first
        log.warning("STOW-RS %s from %s (%s): 400 %s", request_id, user, address, e)
        return problem(400, str(e))
    except ClientDisconnect:
        receiver.abandon()
        done = await run_in_threadpool(receiver.collect)
        log.warning(
            "STOW-RS %s from %s (%s): the client went away after %d part(s) (%d stored); the part being "
            "received was discarded",
            request_id,
            user,
            address,
            len(done),
            sum(r.stored for r in done),
        )
        return problem(400, "the client closed the connection before the end of the body")
    finally:
        if not complete:  # also on cancellation (server shutdown): the part being received leaves no temp file
            receiver.abandon()
    status, body = stow_response(results, base_url(request))
    stored = sum(r.stored for r in results)
    log.info(
        "STOW-RS %s from %s (%s): %d part(s), %d stored, %d failed: HTTP %d",
        request_id,
        user,
        address,
        len(results),
        stored,
        len(results) - stored,
        status,
    )
    return JSONResponse(body, status_code=status, media_type=DICOM_JSON)


_STOW_DOC = {
    200: {"description": "every instance stored", "content": {DICOM_JSON: {}}},
    202: {"description": "some instances failed or were stored with a warning", "content": {DICOM_JSON: {}}},
    400: {"description": "the multipart body is malformed"},
    409: {"description": "no instance stored; FailedSOPSequence says why for each"},
    415: {"description": "not multipart/related with application/dicom parts"},
}


@router.post("/studies", summary="STOW-RS: store instances", responses=_STOW_DOC)  # type: ignore[arg-type]
async def stow(request: Request, user: str = Depends(api_user)) -> Response:
    return await _stow(request, user, None)


@router.post(
    "/studies/{study}",
    summary="STOW-RS: store instances of one study",
    responses=_STOW_DOC,  # type: ignore[arg-type]
)
async def stow_study(study: str, request: Request, user: str = Depends(api_user)) -> Response:
    return await _stow(request, user, study)


# --- QIDO-RS ---------------------------------------------------------------------------------------


def _retrieve_url(base: str, level: Level, ds: Dataset) -> str:
    url = f"{base}/studies/{ds.get('StudyInstanceUID', '')}"
    if level in ("SERIES", "IMAGE"):
        url += f"/series/{ds.get('SeriesInstanceUID', '')}"
    if level == "IMAGE":
        url += f"/instances/{ds.get('SOPInstanceUID', '')}"
    return url


def _qido(request: Request, user: str, level: Level, study: str | None = None, series: str | None = None) -> Response:
    try:
        wado.negotiate(request.headers.get("accept", ""), [DICOM_JSON, "application/json"])
    except wado.NotAcceptable as e:
        return problem(406, f"QIDO-RS answers {DICOM_JSON} only: {e}")
    params: dict[str, list[str]] = {}
    for name, value in request.query_params.multi_items():
        params.setdefault(name, []).append(value)
    ctx = context(request)
    cap = ctx.cfg.qr.max_results  # at most [qr] max_results per answer, as for C-FIND
    try:
        q, _include = query.from_qido(level, params, study=study, series=series)
        with ctx.reader.connect() as conn:
            found, more = query.find_capped(conn, q, cap)
    except query.QueryError as e:
        _audit(request, user, "query", 400, f"QIDO-RS {level}: refused: {e}", study=study or "", series=series or "")
        return problem(400, f"QIDO-RS: {e}")
    matched = sorted(k for k, v in q.keys.items() if v)
    _audit(
        request,
        user,
        "query",
        200,
        f"QIDO-RS {level} on {', '.join(matched) or 'nothing'}: {len(found)} result(s)",
        study=study or "",
        series=series or "",
    )
    headers = {}
    if more:  # PS3.18 8.3.4.4: the client pages on with offset.
        headers["Warning"] = f'299 dicom-node: "There are additional results that can be requested" (limit {cap})'
    base = base_url(request)
    body = []
    for ds in found:
        item = ds.to_json_dict()
        item["00081190"] = {"vr": "UR", "Value": [_retrieve_url(base, level, ds)]}
        body.append(item)
    return JSONResponse(body, media_type=DICOM_JSON, headers=headers)


_QIDO_DOC: dict[int | str, dict[str, Any]] = {
    200: {"description": "the matches (an empty list when none)", "content": {DICOM_JSON: {}}},
    400: {"description": "an attribute or parameter the node cannot match; the message names it"},
    406: {"description": "an Accept other than application/dicom+json"},
}


@router.get("/studies", summary="QIDO-RS: search studies", responses=_QIDO_DOC)
def search_studies(request: Request, user: str = Depends(api_user)) -> Response:
    return _qido(request, user, "STUDY")


@router.get("/series", summary="QIDO-RS: search series", responses=_QIDO_DOC)
def search_series(request: Request, user: str = Depends(api_user)) -> Response:
    return _qido(request, user, "SERIES")


@router.get("/instances", summary="QIDO-RS: search instances", responses=_QIDO_DOC)
def search_instances(request: Request, user: str = Depends(api_user)) -> Response:
    return _qido(request, user, "IMAGE")


@router.get("/studies/{study}/series", summary="QIDO-RS: search the series of a study", responses=_QIDO_DOC)
def search_study_series(study: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _qido(request, user, "SERIES", study)


@router.get("/studies/{study}/instances", summary="QIDO-RS: search the instances of a study", responses=_QIDO_DOC)
def search_study_instances(study: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _qido(request, user, "IMAGE", study)


@router.get(
    "/studies/{study}/series/{series}/instances",
    summary="QIDO-RS: search the instances of a series",
    responses=_QIDO_DOC,
)
def search_series_instances(study: str, series: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _qido(request, user, "IMAGE", study, series)


# --- WADO-RS ---------------------------------------------------------------------------------------


def _stored(
    request: Request, study: str, series: str | None = None, instance: str | None = None
) -> list[tuple[InstanceRef, Path]] | Response:
    """The stored files of a study, series or instance (index order), or the 404 naming what is missing."""
    ctx = context(request)
    if ctx.storage is None:
        return problem(503, "this node process does not serve stored files")
    keys = {"StudyInstanceUID": study}
    level: Level = "STUDY"
    if series is not None:
        keys["SeriesInstanceUID"], level = series, "SERIES"
    if instance is not None:
        keys["SOPInstanceUID"], level = instance, "IMAGE"
    for uid in keys.values():
        if not uid or "\\" in uid or "*" in uid or "?" in uid:
            return problem(400, f"{uid!r} is not a UID: WADO-RS takes one UID per path segment")
    with ctx.reader.connect() as conn:
        refs = query.instances(conn, query.Query(level=level, keys=keys))
    if not refs:
        what = {"STUDY": "study", "SERIES": "series", "IMAGE": "instance"}[level]
        return problem(
            404, f"no {what} {keys[list(keys)[-1]]} in this node" + ("" if level == "STUDY" else f" (study {study})")
        )
    found = [(r, ctx.storage.absolute(r.file_path)) for r in refs]
    present = [(r, p) for r, p in found if p.is_file()]
    if len(present) < len(found):
        log.error(
            "WADO-RS: %d of %d indexed file(s) are missing from storage (e.g. %s); they are left out",
            len(found) - len(present),
            len(found),
            next(p for _r, p in found if not p.is_file()),
        )
        if not present:
            return problem(404, "the instances are indexed but their files are missing from the node's storage")
    return present


def _retrieve(
    request: Request, user: str, study: str, series: str | None = None, instance: str | None = None
) -> Response:
    stored = _stored(request, study, series, instance)
    if isinstance(stored, Response):
        return stored
    try:
        wado.check_syntaxes([r for r, _p in stored], request.headers.get("accept", ""))
    except wado.NotAcceptable as e:
        return problem(406, str(e))
    _audit_retrieve(request, user, "WADO-RS", stored, study, series, instance)
    try:
        body = wado.instance_body(stored)
    except OSError as e:  # a file went away since it was looked up (deleted by retention meanwhile)
        log.error("WADO-RS: a stored file cannot be read: %s", e)
        return problem(404, f"a file of these instances is no longer in the node's storage: {e.filename or e}")
    return StreamingResponse(
        body.in_pieces(), media_type=body.content_type, headers={"Content-Length": str(body.length)}
    )


def _audit_retrieve(
    request: Request,
    user: str,
    what: str,
    stored: list[tuple[InstanceRef, Path]],
    study: str,
    series: str | None,
    instance: str | None,
) -> None:
    size = sum(r.file_size for r, _p in stored)
    detail = f"{what}: {len(stored)} instance(s), {size / 2**20:.1f} MiB"
    _audit(request, user, "retrieve", 200, detail, study=study, series=series or "", sop=instance or "")


def _metadata(
    request: Request, user: str, study: str, series: str | None = None, instance: str | None = None
) -> Response:
    stored = _stored(request, study, series, instance)
    if isinstance(stored, Response):
        return stored
    _audit_retrieve(request, user, "WADO-RS metadata", stored, study, series, instance)
    return StreamingResponse(wado.metadata_json(stored), media_type=DICOM_JSON)


_BAD = {"description": "a path segment that is not a UID, or a bad parameter; the message says which"}
_WADO_DOC: dict[int | str, dict[str, Any]] = {
    400: _BAD,
    200: {"description": "the instances as stored", "content": {"multipart/related": {}}},
    404: {"description": "no such study, series or instance"},
    406: {"description": "a transfer syntax other than the stored one was asked for (the node does not transcode)"},
}
_META_DOC: dict[int | str, dict[str, Any]] = {
    400: _BAD,
    200: {"description": "DICOM JSON of each instance, without Pixel Data", "content": {DICOM_JSON: {}}},
    404: {"description": "no such study, series or instance"},
}


@router.get("/studies/{study}", summary="WADO-RS: retrieve a study", responses=_WADO_DOC, response_class=Response)
def retrieve_study(study: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _retrieve(request, user, study)


@router.get(
    "/studies/{study}/series/{series}",
    summary="WADO-RS: retrieve a series",
    responses=_WADO_DOC,
    response_class=Response,
)
def retrieve_series(study: str, series: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _retrieve(request, user, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}",
    summary="WADO-RS: retrieve an instance",
    responses=_WADO_DOC,
    response_class=Response,
)
def retrieve_instance(
    study: str, series: str, instance: str, request: Request, user: str = Depends(api_user)
) -> Response:
    return _retrieve(request, user, study, series, instance)


@router.get("/studies/{study}/metadata", summary="WADO-RS: a study's metadata", responses=_META_DOC)
def study_metadata(study: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _metadata(request, user, study)


@router.get("/studies/{study}/series/{series}/metadata", summary="WADO-RS: a series' metadata", responses=_META_DOC)
def series_metadata(study: str, series: str, request: Request, user: str = Depends(api_user)) -> Response:
    return _metadata(request, user, study, series)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/metadata",
    summary="WADO-RS: an instance's metadata",
    responses=_META_DOC,
)
def instance_metadata(
    study: str, series: str, instance: str, request: Request, user: str = Depends(api_user)
) -> Response:
    return _metadata(request, user, study, series, instance)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frames}",
    summary="WADO-RS: frames of an instance, as stored",
    response_class=Response,
    responses={
        200: {"description": "the frames (raw pixels, or the compressed frames)", "content": {"multipart/related": {}}},
        400: _BAD,
        404: {"description": "no such instance or frame"},
        406: {"description": "a media type or transfer syntax other than the stored one (no transcoding)"},
    },
)
def retrieve_frames(
    study: str, series: str, instance: str, frames: str, request: Request, _user: str = Depends(api_user)
) -> Response:
    stored = _stored(request, study, series, instance)
    if isinstance(stored, Response):
        return stored
    ref, path = stored[0]
    try:
        numbers = wado.parse_frames(frames)
        wado.check_frame_type(request.headers.get("accept", ""), UID(ref.transfer_syntax_uid))
        media, data = wado.frames(path, numbers)
    except wado.NotAcceptable as e:
        return problem(406, str(e))
    except ValueError as e:
        return problem(400, str(e))
    except wado.NotFound as e:
        return problem(404, str(e))
    body = Body([Part.of_bytes(d, media) for d in data], type_=media.split(";")[0])
    return StreamingResponse(
        body.in_pieces(), media_type=body.content_type, headers={"Content-Length": str(body.length)}
    )


def _rendered(
    request: Request, study: str, series: str, instance: str, frame: str, window: str, quality: int
) -> Response:
    stored = _stored(request, study, series, instance)
    if isinstance(stored, Response):
        return stored
    try:
        media = wado.rendered_type(request.headers.get("accept", ""))
        number = wado.parse_frames(frame)
        if len(number) != 1:
            raise ValueError(f"one frame is rendered at a time, not {frame!r}")
        picture = wado.render(stored[0][1], number[0], media, wado.parse_window(window), quality)
    except wado.NotAcceptable as e:
        return problem(406, str(e))
    except wado.NotFound as e:
        return problem(404, str(e))
    except wado.TooLarge as e:
        return problem(413, str(e))
    except ValueError as e:
        return problem(400, str(e))
    return Response(picture, media_type=media)


_RENDERED_DOC: dict[int | str, dict[str, Any]] = {
    400: _BAD,
    200: {"description": "the frame as an 8-bit image", "content": {"image/png": {}, "image/jpeg": {}}},
    404: {"description": "no such instance or frame"},
    406: {"description": "neither image/png nor image/jpeg is acceptable"},
    413: {"description": "the frame is too large to render (more than 64 Mpixel)"},
}
_WINDOW = Query("", description="center,width[,linear]: the window instead of the data set's own")
_QUALITY = Query(90, ge=1, le=100, description="JPEG quality")


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/rendered",
    summary="WADO-RS: an instance rendered (its first frame)",
    response_class=Response,
    responses=_RENDERED_DOC,
)
def rendered_instance(
    study: str,
    series: str,
    instance: str,
    request: Request,
    window: str = _WINDOW,
    quality: int = _QUALITY,
    _user: str = Depends(api_user),
) -> Response:
    return _rendered(request, study, series, instance, "1", window, quality)


@router.get(
    "/studies/{study}/series/{series}/instances/{instance}/frames/{frame}/rendered",
    summary="WADO-RS: a frame rendered",
    response_class=Response,
    responses=_RENDERED_DOC,
)
def rendered_frame(
    study: str,
    series: str,
    instance: str,
    frame: str,
    request: Request,
    window: str = _WINDOW,
    quality: int = _QUALITY,
    _user: str = Depends(api_user),
) -> Response:
    return _rendered(request, study, series, instance, frame, window, quality)
