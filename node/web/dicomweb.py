"""DICOMweb (PS3.18) under /dicom-web: STOW-RS, QIDO-RS, WADO-RS and rendered, with the API's authentication.

STOW-RS streams into the C-STORE write path (node.web.dicomweb_stow); QIDO-RS and WADO-RS's instance
look-up go through node.index.query, the same query engine as C-FIND/C-MOVE/C-GET; WADO-RS reads the
stored files (node.web.dicomweb_wado).
"""

from __future__ import annotations

import logging
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect

from node.dicom.status import Status
from node.receive.ingest import Ingest, Peer
from node.web.context import WebContext, api_user, context
from node.web.dicomweb_stow import MalformedBody, PartResult, StowReceiver

log = logging.getLogger(__name__)

PREFIX = "/dicom-web"
DICOM_JSON = "application/dicom+json"
#: The calling AE title that instances stored through STOW-RS are indexed with (rules can match it).
STOW_CALLING_AE = "STOW-RS"
#: Threads storing the parts of one STOW-RS request while the next parts arrive.
STORE_THREADS = 4

router = APIRouter(prefix=PREFIX, tags=["dicomweb"])


def problem(status: int, message: str) -> JSONResponse:
    """An error answer: the same {"detail": ...} body as the REST API's, saying what to change."""
    return JSONResponse({"detail": message}, status_code=status)


def base_url(request: Request) -> str:
    return str(request.base_url).rstrip("/") + PREFIX


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
    with ThreadPoolExecutor(STORE_THREADS, thread_name_prefix="stow") as executor:
        receiver = StowReceiver(boundary, ingest, peer, study=study, executor=executor)
        try:
            async for chunk in request.stream():
                if chunk:
                    await run_in_threadpool(receiver.feed, chunk)
            results = await run_in_threadpool(receiver.finish)
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
