"""The STOW-RS sender: a ``type = "dicomweb"`` destination, fed by the same durable queue as C-STORE.

A :class:`StowSender` has the shape of :class:`node.send.scu.Sender` (``send``, ``close``, ``open``), so the
dispatcher's workers, back-off, circuit breaker, audit trail and metrics treat a DICOMweb destination like a
DIMSE one. Instances go in batches (at most :data:`MAX_ITEMS` instances and :data:`MAX_BYTES` bytes each) as one
``multipart/related; type="application/dicom"`` POST to ``<url>/studies`` (PS3.18 10.5), streamed from the
stored files as they are (no transcoding, nothing read into memory whole), over one kept-alive HTTP
connection per worker.

What the answer means for each instance (PS3.18 10.5.3):

* 200: every instance stored (a WarningReason in its ReferencedSOPSequence item is logged as a warning).
* 202 / 409: the instances listed in FailedSOPSequence failed with their FailureReason, classified as a
  C-STORE status is (:func:`node.send.failures.classify_status`: 0xA7xx out of resources is retried, the rest
  fails at once); the others of a 202 were stored, the others of a 409 failed with the response's text.
* 408, 429, 5xx, a refused or reset connection, a timeout: the destination is unavailable; the batch is
  retried with back-off (the breaker opens as for an association that cannot be opened).
* 413 for a batch of several: each instance is sent on its own; for one instance it fails.
* Other 4xx (400, 401, 403, 404, 415...) and redirects: a permanent failure naming the HTTP status, what the
  server said, and the setting to check (``url``, ``token``, ``username``/``password``).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from node.config import DestinationSection
from node.dicom.status import Status
from node.send.failures import classify_status
from node.send.scu import Item, Result, tls_context

log = logging.getLogger(__name__)

#: Instances in one STOW-RS request.
MAX_ITEMS = 32
#: Bytes of instances in one STOW-RS request (one larger instance goes alone).
MAX_BYTES = 64 * 1024 * 1024
#: Files are streamed in pieces of this size.
CHUNK = 1024 * 1024
#: Of an error response's body, this many characters go into the delivery's error.
BODY_EXCERPT = 300

_REFERENCED_SOP_SEQUENCE = "00081199"
_FAILED_SOP_SEQUENCE = "00081198"
_REFERENCED_SOP_INSTANCE_UID = "00081155"
_FAILURE_REASON = "00081197"
_WARNING_REASON = "00081196"


@dataclass(frozen=True)
class StowResponse:
    """What a STOW-RS response says per SOP Instance UID: failure reasons and warning reasons."""

    failed: dict[str, int]
    warnings: dict[str, int]

    @classmethod
    def parse(cls, body: bytes) -> StowResponse:
        """Read the DICOM JSON response (PS3.18 F.2); a body that is not one says nothing per instance."""
        try:
            doc = json.loads(body) if body.strip() else {}
        except ValueError:
            return cls({}, {})
        if isinstance(doc, list):  # some servers answer with an array of one data set
            doc = doc[0] if doc and isinstance(doc[0], dict) else {}
        if not isinstance(doc, dict):
            return cls({}, {})
        return cls(
            _reasons(doc, _FAILED_SOP_SEQUENCE, _FAILURE_REASON),
            _reasons(doc, _REFERENCED_SOP_SEQUENCE, _WARNING_REASON),
        )


def _reasons(doc: dict[str, Any], sequence: str, reason: str) -> dict[str, int]:
    """{SOP Instance UID: reason} of the items of ``sequence`` that carry ``reason``."""
    out: dict[str, int] = {}
    items = doc.get(sequence, {}).get("Value", []) if isinstance(doc.get(sequence), dict) else []
    for it in items:
        if not isinstance(it, dict):
            continue
        uid = _first(it, _REFERENCED_SOP_INSTANCE_UID)
        code = _first(it, reason)
        if isinstance(uid, str) and code is not None:
            try:
                out[uid] = int(code)
            except (TypeError, ValueError):
                continue
    return out


def _first(item: dict[str, Any], tag: str) -> Any:
    value = item.get(tag, {}).get("Value") if isinstance(item.get(tag), dict) else None
    return value[0] if isinstance(value, list) and value else None


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
                        done(Result(it, "transient", None, why, attempted=False))
                self.close()
                return results
        return results

    def _post(self, group: list[Item], size_of: dict[int, int]) -> list[Result]:
        """One STOW-RS request for ``group``; a result per item."""
        boundary = uuid.uuid4().hex
        heads = [
            f"--{boundary}\r\nContent-Type: application/dicom\r\nContent-Length: {size_of[id(it)]}\r\n\r\n".encode()
            for it in group
        ]
        tail = f"--{boundary}--\r\n".encode()
        length = sum(len(h) + size_of[id(it)] + 2 for h, it in zip(heads, group, strict=True)) + len(tail)

        def body() -> Iterator[bytes]:
            for head, it in zip(heads, group, strict=True):
                yield head
                left = size_of[id(it)]
                with it.path.open("rb") as f:
                    while left > 0:
                        chunk = f.read(min(CHUNK, left))
                        if not chunk:
                            raise OSError(f"{it.path} is shorter than when the request began")
                        left -= len(chunk)
                        yield chunk
                yield b"\r\n"
            yield tail

        headers = {
            "Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}',
            "Content-Length": str(length),
        }
        try:
            rsp = self._http().post(self.endpoint, content=body(), headers=headers)
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
            return self._all(group, "transient", text)
        return self._all(group, "permanent", text)

    def _per_instance(self, group: list[Item], rsp: httpx.Response) -> list[Result]:
        parsed = StowResponse.parse(rsp.content)
        out = []
        for it in group:
            syntax = it.transfer_syntax
            reason = parsed.failed.get(it.sop_instance)
            if reason is not None:
                kind, text = classify_status(reason)
                if kind == "delivered":  # a "failure" reason that is success or duplicate: stored
                    out.append(Result(it, "delivered", reason, "", warning=text, sent_syntax=syntax))
                else:
                    out.append(
                        Result(
                            it,
                            kind,
                            reason,
                            f"{self.label} refused it (STOW-RS FailureReason): {text}",
                            sent_syntax=syntax,
                        )
                    )
            elif rsp.status_code == 409:
                out.append(Result(it, "permanent", None, self._http_error(rsp), sent_syntax=syntax))
            else:
                warning = parsed.warnings.get(it.sop_instance)
                note = "" if warning is None else f"STOW-RS WarningReason 0x{warning:04X}"
                out.append(Result(it, "delivered", Status.SUCCESS, "", warning=note, sent_syntax=syntax))
        return out

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
        phrase = f" {rsp.reason_phrase}" if rsp.reason_phrase else ""
        return (
            f"{self.label}: HTTP {code}{phrase}"
            + (f": {hint}" if hint else "")
            + (f" (server said: {said})" if said else "")
        )
