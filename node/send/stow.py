"""The STOW-RS sender: a ``type = "dicomweb"`` destination, fed by the same durable queue as C-STORE.

A :class:`StowSender` has the shape of :class:`node.send.scu.Sender` (``send``, ``close``, ``open``), so the
dispatcher's workers, back-off, circuit breaker, audit trail and metrics treat a DICOMweb destination like a
DIMSE one. Instances go in batches (at most :data:`MAX_ITEMS` instances and :data:`MAX_BYTES` bytes each) as one
``multipart/related; type="application/dicom"`` POST to ``<url>/studies`` (PS3.18 10.5), streamed from the
stored files as they are (no transcoding, nothing read into memory whole), over one kept-alive HTTP
connection per worker.

What the answer means for each instance (PS3.18 10.5.3):

* 200 / 202 / 409 with a DICOM JSON body: an instance is delivered only when its SOP Instance UID is in
  ReferencedSOPSequence (a WarningReason there is recorded as a warning). Those in FailedSOPSequence failed
  with their FailureReason, classified as a C-STORE status is (:func:`node.send.failures.classify_status`:
  0xA7xx out of resources is retried, the rest fails at once). One in neither list was not confirmed:
  a permanent failure saying so (resending it blindly could loop forever; the operator retries it).
* A 2xx whose body is no STOW-RS response (empty, an HTML login page of a proxy, other JSON): nothing is
  confirmed, so nothing is delivered; a permanent failure telling to check the ``url`` (a login page will
  not turn into a PACS by waiting). A 409 without one fails every instance with the response's text.
* 408, 429, 5xx, a refused or reset connection, a timeout: the destination is unavailable; the batch is
  retried with back-off (the breaker opens as for an association that cannot be opened). A Retry-After
  header lengthens that back-off to what the server asks, up to ``retry.max_delay``.
* 413 for a batch of several: each instance is sent on its own; for one instance it fails.
* Other 4xx (400, 401, 403, 404, 415...) and redirects: a permanent failure naming the HTTP status, what the
  server said, and the setting to check (``url``, ``token``, ``username``/``password``).
"""

from __future__ import annotations

import datetime as dt
import email.utils
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from node.config import DestinationSection
from node.dicom import multipart
from node.dicom.status import Status
from node.send.failures import classify_status
from node.send.scu import Item, Result, tls_context

log = logging.getLogger(__name__)

#: Instances in one STOW-RS request.
MAX_ITEMS = 32
#: Bytes of instances in one STOW-RS request (one larger instance goes alone).
MAX_BYTES = 64 * 1024 * 1024
#: Of an error response's body, this many characters go into the delivery's error.
BODY_EXCERPT = 300

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


@dataclass(frozen=True)
class StowResponse:
    """What a STOW-RS response (PS3.18 10.5.3, a DICOM JSON data set) says per SOP Instance UID.

    ``stored``: the instances in ReferencedSOPSequence, with their WarningReason (None: none given);
    ``failed``: those in FailedSOPSequence, with their FailureReason (None: none given). Only ``stored`` counts as delivered:
    an instance the response does not list was not confirmed, whatever the HTTP status.
    """

    stored: dict[str, int | None]
    failed: dict[str, int | None]

    @classmethod
    def parse(cls, body: bytes) -> StowResponse | None:
        """Read the DICOM JSON response; None when the body is not one (empty, HTML, other JSON)."""
        try:
            doc = json.loads(body)
        except ValueError:
            return None
        if isinstance(doc, list) and len(doc) == 1:  # some servers answer with an array of one data set
            doc = doc[0]
        if not isinstance(doc, dict) or not all(_is_attribute(k, v) for k, v in doc.items()):
            return None
        return cls(
            dict(_items(doc, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON)),
            dict(_items(doc, _FAILED_SOP_SEQUENCE, _FAILURE_REASON)),
        )


def _is_attribute(key: object, value: object) -> bool:
    """Whether ``key: value`` is a DICOM JSON attribute (PS3.18 F.2.2: 8 hex digits -> an object with "vr")."""
    return (
        isinstance(key, str)
        and len(key) == 8
        and all(c in "0123456789abcdefABCDEF" for c in key)
        and isinstance(value, dict)
        and "vr" in value
    )


def _items(doc: dict[str, Any], sequence: str, reason: str) -> Iterator[tuple[str, int | None]]:
    """(SOP Instance UID, ``reason`` code or None) of each item of ``sequence`` that names its instance."""
    items = doc.get(sequence, {}).get("Value", []) if isinstance(doc.get(sequence), dict) else []
    for it in items if isinstance(items, list) else []:
        if not isinstance(it, dict):
            continue
        uid = _first(it, _REFERENCED_SOP_INSTANCE_UID)
        if not isinstance(uid, str):
            continue
        try:
            code = _first(it, reason)
            yield uid, None if code is None else int(code)
        except (TypeError, ValueError):
            yield uid, None


def _first(item: dict[str, Any], tag: str) -> Any:
    value = item.get(tag, {}).get("Value") if isinstance(item.get(tag), dict) else None
    return value[0] if isinstance(value, list) and value else None


def retry_after(value: str | None, now: dt.datetime | None = None) -> float | None:
    """Seconds to wait from an HTTP Retry-After header (RFC 9110 10.2.3: delay-seconds or an HTTP date).

    None when absent or unreadable (the back-off alone decides); a date in the past is 0.
    """
    if not value or not value.strip():
        return None
    text = value.strip()
    if text.isdigit():
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0.0, (when - (now or dt.datetime.now(dt.UTC))).total_seconds())


def batches(items: list[Item], sizes: list[int]) -> list[list[int]]:
    """Indexes of ``items`` in request-sized groups (in order): at most MAX_ITEMS and, past one, MAX_BYTES."""
    out: list[list[int]] = []
    total = 0
    for i, size in enumerate(sizes):
        if out and len(out[-1]) < MAX_ITEMS and total + size <= MAX_BYTES:
            out[-1].append(i)
            total += size
        else:
            out.append([i])
            total = size
    return out


class StowSender:
    """STOW-RS to one DICOMweb destination over a kept-alive HTTP connection (one per dispatcher worker)."""

    def __init__(self, dest: DestinationSection) -> None:
        self.dest = dest
        self.endpoint = f"{dest.url}/studies"
        self._client: httpx.Client | None = None

    @property
    def label(self) -> str:
        return f"{self.dest.name} ({self.dest.url})"

    @property
    def open(self) -> bool:
        """Whether a connection may be kept open (closed after the dispatcher's linger)."""
        return self._client is not None

    def _http(self) -> httpx.Client:
        if self._client is None:
            d = self.dest
            headers = {"Accept": "application/dicom+json"}
            if d.token:
                headers["Authorization"] = f"Bearer {d.token}"
            auth = httpx.BasicAuth(d.username, d.password) if d.username else None
            verify: Any = True
            if urlsplit(d.url).scheme == "https":
                verify = tls_context(d.tls, urlsplit(d.url).hostname or "")
            self._client = httpx.Client(
                headers=headers, auth=auth, timeout=httpx.Timeout(d.timeout), verify=verify, follow_redirects=False
            )
        return self._client

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None

    def request_commitment(self, transaction_uid: str, refs: list[tuple[str, str]]) -> str:
        """Storage Commitment is a DIMSE service (the config refuses it for a DICOMweb destination)."""
        return f"{self.label}: storage commitment is not available for a DICOMweb destination"

    # --- sending ---------------------------------------------------------------

    def send(
        self,
        items: list[Item],
        on_result: Callable[[Result], None] | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> list[Result]:
        """Send items in batches, in order; returns a result per item (never raises for a server's behaviour).

        After a transient failure the rest is not sent (it would meet the same server); when ``cancelled``
        becomes true between batches, what was not sent has no result.
        """
        results: list[Result] = []

        def done(r: Result) -> None:
            results.append(r)
            if on_result:
                on_result(r)

        sizes: list[int] = []
        sendable: list[Item] = []
        for it in items:
            try:
                sizes.append(it.path.stat().st_size)
                sendable.append(it)
            except OSError as e:
                done(Result(it, "permanent", None, f"cannot read {it.path}: {e}"))
        groups = [[sendable[i] for i in g] for g in batches(sendable, sizes)]
        size_of = {id(it): s for it, s in zip(sendable, sizes, strict=True)}
        for n, group in enumerate(groups):
            if cancelled is not None and cancelled():
                return results
            outcome = self._post(group, size_of)
            for r in outcome:
                done(r)
            transient = next((r for r in outcome if r.outcome == "transient"), None)
            if transient is not None:  # unavailable, or out of resources (0xA7xx): the rest waits too
                why = f"not sent: {transient.text}"
                for later in groups[n + 1 :]:
                    for it in later:
                        done(Result(it, "transient", None, why, attempted=False, retry_after=transient.retry_after))
                self.close()
                return results
        return results

    def _post(self, group: list[Item], size_of: dict[int, int]) -> list[Result]:
        """One STOW-RS request for ``group``; a result per item."""
        body = multipart.Body([multipart.Part.of_file(it.path, size=size_of[id(it)]) for it in group])
        try:
            rsp = self._http().post(self.endpoint, content=body, headers=body.headers())
        except httpx.TimeoutException as e:
            self.close()
            return self._all(group, "transient", f"no response from {self.label} within {self.dest.timeout:g} s ({e})")
        except httpx.TransportError as e:
            self.close()
            return self._all(group, "transient", f"cannot reach {self.label}: {str(e) or type(e).__name__}")
        except OSError as e:  # a stored file could not be read while streaming
            self.close()
            if len(group) > 1:
                return [r for it in group for r in self._post([it], size_of)]
            return self._all(group, "permanent", f"cannot read {group[0].path}: {e}")
        return self._results(group, rsp, size_of)

    def _all(self, group: list[Item], outcome: str, text: str) -> list[Result]:
        return [Result(it, outcome, None, text) for it in group]

    def _results(self, group: list[Item], rsp: httpx.Response, size_of: dict[int, int]) -> list[Result]:
        code = rsp.status_code
        if code == 413 and len(group) > 1:
            log.info(
                "destination %s: a request of %d instances was too large; sending them one by one",
                self.dest.name,
                len(group),
            )
            return [r for it in group for r in self._post([it], size_of)]
        if 200 <= code < 300 or code == 409:
            return self._per_instance(group, rsp)
        text = self._http_error(rsp)
        if code in (408, 429) or code >= 500:
            wait = retry_after(rsp.headers.get("Retry-After"))
            return [Result(it, "transient", None, text, retry_after=wait) for it in group]
        return self._all(group, "permanent", text)

    def _per_instance(self, group: list[Item], rsp: httpx.Response) -> list[Result]:
        """Each instance's result from a 2xx or 409 answer: delivered only if listed in ReferencedSOPSequence."""
        parsed = StowResponse.parse(rsp.content)
        if parsed is None:
            if rsp.status_code == 409:
                return self._all(group, "permanent", self._http_error(rsp))
            return self._all(group, "permanent", self._not_stow(rsp))
        return [self._instance(it, parsed, rsp) for it in group]

    def _instance(self, it: Item, parsed: StowResponse, rsp: httpx.Response) -> Result:
        syntax = it.transfer_syntax
        uid = it.sop_instance
        if uid in parsed.failed:
            reason = parsed.failed[uid]
            if reason is None:
                text = f"{self.label} refused it (in FailedSOPSequence, without a FailureReason)"
                return Result(it, "permanent", None, text, sent_syntax=syntax)
            kind, said = classify_status(reason)
            if kind == "delivered":  # a "failure" reason that is success or duplicate: stored
                return Result(it, "delivered", reason, "", warning=said, sent_syntax=syntax)
            text = f"{self.label} refused it (STOW-RS FailureReason): {said}"
            return Result(it, kind, reason, text, sent_syntax=syntax)
        if uid in parsed.stored:
            warning = parsed.stored[uid]
            note = "" if warning is None else f"STOW-RS WarningReason 0x{warning:04X}"
            return Result(it, "delivered", Status.SUCCESS, "", warning=note, sent_syntax=syntax)
        if rsp.status_code == 409:
            return Result(it, "permanent", None, self._http_error(rsp), sent_syntax=syntax)
        text = (
            f"{self.label}: the STOW-RS response (HTTP {rsp.status_code}) lists this instance neither as stored "
            "(ReferencedSOPSequence) nor as failed (FailedSOPSequence), so it is not counted as delivered: "
            "check the server's log, then `dicom-node queue retry` sends it again"
        )
        return Result(it, "permanent", None, text, sent_syntax=syntax)

    def _not_stow(self, rsp: httpx.Response) -> str:
        """A 2xx whose body is no STOW-RS response: a login page or proxy answering in the server's place."""
        kind = rsp.headers.get("Content-Type", "").split(";")[0].strip().lower()
        text = rsp.text.strip()
        if not text:
            what = "an empty body"
        elif kind == "application/dicom+xml":
            what = "application/dicom+xml, not the application/dicom+json it was asked for"
        elif kind == "text/html" or text.startswith("<"):
            what = "an HTML page"
        else:
            what = f"{kind or 'a body without Content-Type'} that is not DICOM JSON"
        said = " ".join(text.split())[:BODY_EXCERPT]
        return (
            f"the server at {self.endpoint} did not answer as a STOW-RS origin server (HTTP {rsp.status_code} "
            f"with {what}): check [[destinations]] url for {self.dest.name!r}; the instances may or may not be "
            "stored there, so they are not counted as delivered" + (f" (server said: {said})" if said else "")
        )

    def _http_error(self, rsp: httpx.Response) -> str:
        """The HTTP status, what the server said, and what to change."""
        code = rsp.status_code
        said = " ".join(rsp.text.split())[:BODY_EXCERPT] if rsp.content else ""
        name = self.dest.name
        hint = {
            401: f"check the token or username/password of [[destinations]] {name!r}",
            403: f"the credentials of [[destinations]] {name!r} are not allowed to store; check them",
            404: f"check the url of [[destinations]] {name!r} (instances are POSTed to {self.endpoint})",
            405: f"check the url of [[destinations]] {name!r}: {self.endpoint} does not take STOW-RS",
            413: "the instance is larger than the server accepts",
            415: 'the server does not accept multipart/related; type="application/dicom"',
        }.get(code, "")
        if 300 <= code < 400:
            hint = f"redirected to {rsp.headers.get('Location', '?')}: set the url of [[destinations]] {name!r} to it"
        elif code in (408, 429) or code >= 500:
            hint = "the server is unavailable; trying again later"
            if rsp.headers.get("Retry-After"):
                hint += f" (it asks to wait: Retry-After {rsp.headers['Retry-After']})"
        phrase = f" {rsp.reason_phrase}" if rsp.reason_phrase else ""
        return (
            f"{self.label}: HTTP {code}{phrase}"
            + (f": {hint}" if hint else "")
            + (f" (server said: {said})" if said else "")
        )
