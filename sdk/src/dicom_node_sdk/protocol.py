"""The worker protocol, version 1: what the node and a plugin's warm worker say to each other.

Both ends live here, so they cannot drift apart: the node (its job process) uses
:class:`WorkerClient`; the worker (``python -m dicom_node_sdk.worker``) uses the same encoders.

- Framing: a 4-byte big-endian length, then that many bytes of UTF-8 JSON (one object).
- Arrays never go through the socket: they are ``.npy`` files written with
  ``numpy.lib.format.open_memmap`` and read with ``numpy.load(mmap_mode="c")`` (copy-on-write: a
  plugin may change its input privately), so a 300 MB volume costs a file write on one side and page
  faults on the other, not a pickle through a pipe. The node puts them in the job's folder, in the
  page cache of its data directory.
- A series goes as its file paths, geometry and voxels file; the worker reads the DICOM headers only
  if the plugin looks at ``series.datasets`` (a model that needs only voxels pays nothing).
- Codes (pydicom ``Code``) are ``[value, scheme, meaning]`` or ``[value, scheme, meaning, version]``.

The messages are described in the node's docs (docs/plugins.md) and in :func:`encode_series`,
:func:`result_to_json` and :func:`info_to_json`.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.sr.coding import Code

from dicom_node_sdk._info import PluginInfo
from dicom_node_sdk.api import Images, Result, Segment, Segmentation, SeriesInput, Volume
from dicom_node_sdk.results import Measurement, MeasurementGroup, Measurements, QualitativeFinding

__all__ = [
    "MAX_MESSAGE",
    "PROTOCOL",
    "ProtocolError",
    "RemoteError",
    "RunReply",
    "WorkerClient",
    "WorkerGone",
    "code_from_json",
    "code_to_json",
    "decode_series",
    "encode_series",
    "info_to_json",
    "load_array",
    "recv_message",
    "result_from_json",
    "result_to_json",
    "save_array",
    "send_message",
]

PROTOCOL = 1
#: The largest message either side accepts (messages carry paths and metadata, never arrays).
MAX_MESSAGE = 256 * 2**20
_HEADER = struct.Struct(">I")


class ProtocolError(Exception):
    """A message that is not protocol v1 (bad length, not JSON, not an object)."""


class WorkerGone(ConnectionError):
    """The worker closed the connection or died before answering (killed, crashed, out of memory)."""


class RemoteError(Exception):
    """The worker answered that the request failed: the plugin raised, or the parameters were refused.

    ``kind`` is "PluginError", "ParamsError", "GeometryError", "Exception" or "ProtocolError";
    ``retryable`` is what the plugin said (PluginError(retryable=True)); the node applies its policy.
    """

    def __init__(self, message: str, retryable: bool = False, kind: str = "Exception") -> None:
        super().__init__(message)
        self.message = message
        self.retryable = retryable
        self.kind = kind


# -- framing ---------------------------------------------------------------------------


def send_message(sock: socket.socket, obj: dict[str, Any]) -> None:
    """One message: length, then JSON."""
    data = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    if len(data) > MAX_MESSAGE:
        raise ProtocolError(f"message of {len(data)} bytes exceeds the protocol's {MAX_MESSAGE}")
    sock.sendall(_HEADER.pack(len(data)) + data)


def _recv_exact(sock: socket.socket, n: int, started: bool) -> bytes | None:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0 and not started:
                return None
            raise ConnectionError(f"connection closed in the middle of a message ({got} of {n} bytes)")
        got += k
    return bytes(buf)


def recv_message(sock: socket.socket) -> dict[str, Any] | None:
    """The next message, or None when the peer closed the connection between messages."""
    head = _recv_exact(sock, _HEADER.size, started=False)
    if head is None:
        return None
    (n,) = _HEADER.unpack(head)
    if n > MAX_MESSAGE:
        raise ProtocolError(f"a message of {n} bytes announced (at most {MAX_MESSAGE}): not protocol {PROTOCOL}")
    body = _recv_exact(sock, n, started=True) or b""
    try:
        obj = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ProtocolError(f"a message that is not UTF-8 JSON: {e}") from None
    if not isinstance(obj, dict):
        raise ProtocolError(f"a message that is a JSON {type(obj).__name__}, not an object")
    return obj


# -- values ----------------------------------------------------------------------------


def code_to_json(code: Code | None) -> list[str] | None:
    if code is None:
        return None
    out = [str(code.value), str(code.scheme_designator), str(code.meaning)]
    if getattr(code, "scheme_version", None):
        out.append(str(code.scheme_version))
    return out


def code_from_json(value: Sequence[str] | None) -> Code | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or len(value) not in (3, 4):
        raise ProtocolError(f"a code is [value, scheme, meaning(, version)], not {value!r}")
    return Code(*(str(v) for v in value))


def save_array(array: Any, path: str | os.PathLike[str]) -> str:
    """Write ``array`` as an ``.npy`` file at ``path`` (through a memory map: no second copy in memory).

    An array that already is that file, mapped (the node decodes the voxels straight into it), is kept
    as it is: re-creating the file would truncate the very data being copied.
    """
    if _maps_file(array, path):  # a shared mapping of that very file: what it holds is in the file already
        return str(path)
    a = np.asarray(array)
    if isinstance(a.base, np.memmap) or isinstance(array, np.memmap):
        source = getattr(array, "filename", None) or getattr(a.base, "filename", None)
        if source and os.path.exists(path) and os.path.samefile(source, path):
            a = np.array(a)  # a part of that very file: copy it out before the file is re-created
    if a.dtype.hasobject:
        raise TypeError(f"an array of Python objects cannot be handed over (dtype {a.dtype}); use numbers or bools")
    if a.size == 0:  # an empty file cannot be memory-mapped
        with open(path, "wb") as f:
            np.lib.format.write_array(f, a, allow_pickle=False)
        return str(path)
    # Plain writes: through a memory map each 4 KiB page would fault in first (tens of ms per 100 MB).
    with open(path, "wb") as f:
        np.lib.format.write_array(f, np.ascontiguousarray(a), allow_pickle=False)
    return str(path)


def _maps_file(array: Any, path: str | os.PathLike[str]) -> bool:
    """Whether ``array`` is the whole of the ``.npy`` file at ``path``, memory-mapped (rewriting it would zero it)."""
    if not isinstance(array, np.memmap) or not array.filename or not os.path.exists(path):
        return False
    try:
        if not os.path.samefile(array.filename, path):
            return False
    except OSError:
        return False
    try:
        on_disk = np.load(str(path), mmap_mode="r", allow_pickle=False)
    except ValueError:
        return False
    same = (on_disk.offset, on_disk.shape, on_disk.dtype, on_disk.flags.c_contiguous) == (
        array.offset,
        array.shape,
        array.dtype,
        array.flags.c_contiguous,
    )
    del on_disk
    return bool(same)


def load_array(path: str | os.PathLike[str]) -> np.ndarray:
    """An ``.npy`` file as a copy-on-write memory map (an empty array as itself).

    Not populated up front: on a private writable mapping the kernel would copy every page to do it
    (MAP_POPULATE there costs more than the page faults it saves); pages are mapped as they are read.
    """
    array: np.ndarray
    try:
        array = np.load(str(path), mmap_mode="c", allow_pickle=False)
    except ValueError:  # mmap of an empty array
        array = np.load(str(path), allow_pickle=False)
    return array


def _floats(value: Any) -> list[float] | None:
    return None if value is None else [float(x) for x in value]


def _segment_to_json(s: Segment) -> dict[str, Any]:
    return {
        "label": str(s.label),
        "category": code_to_json(s.category),
        "type": code_to_json(s.type),
        "color": None if s.color is None else [int(c) for c in s.color],
        "anatomic_region": code_to_json(s.anatomic_region),
        "type_modifier": code_to_json(s.type_modifier),
        "anatomic_region_modifier": code_to_json(s.anatomic_region_modifier),
        "description": str(s.description),
        "algorithm_type": str(s.algorithm_type),
    }


def _required_code(value: Sequence[str] | None, what: str) -> Code:
    code = code_from_json(value)
    if code is None:
        raise ProtocolError(f"a segment's {what} is a code, not null")
    return code


def _segment_from_json(d: dict[str, Any]) -> Segment:
    color = d.get("color")
    return Segment(
        label=str(d["label"]),
        category=_required_code(d["category"], "category"),
        type=_required_code(d["type"], "type"),
        color=None if color is None else (int(color[0]), int(color[1]), int(color[2])),
        anatomic_region=code_from_json(d.get("anatomic_region")),
        type_modifier=code_from_json(d.get("type_modifier")),
        anatomic_region_modifier=code_from_json(d.get("anatomic_region_modifier")),
        description=str(d.get("description", "")),
        algorithm_type=str(d.get("algorithm_type", "AUTOMATIC")),
    )


def result_to_json(result: Result, folder: str | os.PathLike[str], stem: str) -> dict[str, Any]:
    """A plugin result as a RESULT message; its array goes to ``folder/stem-<field>.npy``."""
    base = Path(folder) / stem
    if isinstance(result, Segmentation):
        return {
            "type": "segmentation",
            "masks": save_array(result.masks, f"{base}-masks.npy"),
            "segments": [_segment_to_json(s) for s in result.segments],
            "kind": str(result.kind),
            "description": str(result.description),
        }
    if isinstance(result, Images):
        src = None if result.source_slices is None else [None if i is None else int(i) for i in result.source_slices]
        return {
            "type": "images",
            "pixels": save_array(result.pixels, f"{base}-pixels.npy"),
            "source_slices": src,
            "description": str(result.description),
            "patient_orientation": None if result.patient_orientation is None else list(result.patient_orientation),
            "pixel_spacing": _floats(result.pixel_spacing),
        }
    if isinstance(result, Volume):
        affine = None if result.affine is None else np.asarray(result.affine, dtype=float).tolist()
        return {
            "type": "volume",
            "values": save_array(result.values, f"{base}-values.npy"),
            "name": str(result.name),
            "precision": None if result.precision is None else float(result.precision),
            "description": str(result.description),
            "kind": str(result.kind),
            "units": code_to_json(result.units),
            "affine": affine,
        }
    if isinstance(result, Measurements):
        return _measurements_to_json(result)
    raise TypeError(f"a plugin result is a Segmentation, Images, Volume or Measurements, not a {type(result).__name__}")


def result_from_json(d: dict[str, Any]) -> Result:
    """A RESULT message as the plugin result it describes (arrays memory-mapped from their files)."""
    kind = d.get("type")
    if kind == "segmentation":
        return Segmentation(
            load_array(d["masks"]),
            [_segment_from_json(s) for s in d.get("segments", [])],
            kind=d.get("kind", "binary"),
            description=d.get("description", ""),
        )
    if kind == "images":
        po = d.get("patient_orientation")
        ps = d.get("pixel_spacing")
        return Images(
            load_array(d["pixels"]),
            source_slices=d.get("source_slices"),
            description=d.get("description", ""),
            patient_orientation=None if po is None else tuple(po),
            pixel_spacing=None if ps is None else (float(ps[0]), float(ps[1])),
        )
    if kind == "volume":
        affine = d.get("affine")
        return Volume(
            load_array(d["values"]),
            name=d.get("name", ""),
            precision=d.get("precision"),
            description=d.get("description", ""),
            kind=d.get("kind", "image"),
            units=code_from_json(d.get("units")),
            affine=None if affine is None else np.array(affine, dtype=float),
        )
    if kind == "measurements":
        return _measurements_from_json(d)
    raise ProtocolError(
        f"a result of type {kind!r}: protocol {PROTOCOL} knows segmentation, images, volume and measurements"
    )


def _measurements_to_json(m: Measurements) -> dict[str, Any]:
    """Measurements as JSON: no arrays, only codes and numbers (floats round-trip exactly in JSON)."""
    return {
        "type": "measurements",
        "title": code_to_json(m.title),
        "description": str(m.description),
        "evidence_series": [str(u) for u in m.evidence_series],
        "groups": [
            {
                "tracking_id": g.tracking_id,
                "finding": code_to_json(g.finding),
                "measurements": [
                    [code_to_json(x.name), float(x.value), code_to_json(x.unit), code_to_json(x.derivation)]
                    for x in g.measurements
                ],
                "qualitative": [[code_to_json(q.name), code_to_json(q.value)] for q in g.qualitative],
                "segment": g.segment,
                "segmentation": g.segmentation,
                "finding_site": code_to_json(g.finding_site),
                "source_slices": None if g.source_slices is None else [int(i) for i in g.source_slices],
            }
            for g in m.groups
        ],
    }


def _code_of(value: Any, what: str) -> Code:
    code = code_from_json(value)
    if code is None:
        raise ProtocolError(f"{what} is a code, not null")
    return code


def _measurements_from_json(d: dict[str, Any]) -> Measurements:
    groups = [
        MeasurementGroup(
            tracking_id=g["tracking_id"],
            finding=_code_of(g["finding"], "a measurement group's finding"),
            measurements=[
                Measurement(
                    _code_of(name, "a measurement's name"),
                    value,
                    _code_of(unit, "a measurement's unit"),
                    code_from_json(derivation),
                )
                for name, value, unit, derivation in g.get("measurements", [])
            ],
            qualitative=[
                QualitativeFinding(_code_of(n, "a qualitative finding's name"), _code_of(v, "its value"))
                for n, v in g.get("qualitative", [])
            ],
            segment=g.get("segment"),
            segmentation=g.get("segmentation"),
            finding_site=code_from_json(g.get("finding_site")),
            source_slices=g.get("source_slices"),
        )
        for g in d.get("groups", [])
    ]
    return Measurements(
        groups,
        title=_code_of(d["title"], "a report's title"),
        description=d.get("description", ""),
        evidence_series=d.get("evidence_series", []),
    )


# -- series ----------------------------------------------------------------------------


def encode_series(series: SeriesInput, voxels_path: str | os.PathLike[str]) -> dict[str, Any]:
    """A SERIES message for ``series``; its voxels are written to ``voxels_path`` (an ``.npy`` file).

    Besides the fields of the protocol, ``rescale`` carries each slice's slope and intercept, so
    ``series.rescaled()`` in the worker needs no DICOM header.
    """
    slopes, intercepts = series._rescale()
    return {
        "files": [str(f) for f in series.files],
        "frames": None if series.frames is None else [int(i) for i in series.frames],
        "positions": None if series.positions is None else np.asarray(series.positions, dtype=float).tolist(),
        "orientation": None if series.orientation is None else [_floats(v) for v in series.orientation],
        "pixel_spacing": _floats(series.pixel_spacing),
        "voxels": {"path": save_array(series.voxels(), voxels_path)},
        "rescale": {"slopes": [float(x) for x in slopes], "intercepts": [float(x) for x in intercepts]},
    }


class LazyDatasets(Sequence):  # type: ignore[type-arg]  # of pydicom Datasets; Python 3.9 has no Sequence[...] base here
    """``series.datasets`` in a worker: each file's header (no pixels), read when first looked at."""

    def __init__(self, files: Sequence[Path]) -> None:
        self._files = list(files)
        self._loaded: list[Any] | None = None
        self._single: dict[int, Any] = {}

    def _all(self) -> list[Any]:
        if self._loaded is None:
            from pydicom import dcmread

            self._loaded = [
                self._single.get(i) or dcmread(str(f), stop_before_pixels=True) for i, f in enumerate(self._files)
            ]
        return self._loaded

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, int) and self._loaded is None:  # series.first / modality: one header, not all
            from pydicom import dcmread

            n = len(self._files)
            if not -n <= i < n:
                raise IndexError(i)
            one = self._single.get(i % n)
            if one is None:
                one = self._single[i % n] = dcmread(str(self._files[i]), stop_before_pixels=True)
            return one
        return self._all()[i]

    def __iter__(self) -> Iterator[Any]:
        return iter(self._all())

    def __repr__(self) -> str:
        state = "read" if self._loaded is not None else "not read yet"
        return f"<{len(self)} DICOM headers, {state}>"


@dataclass
class RemoteSeries(SeriesInput):
    """A SeriesInput from a SERIES message: voxels memory-mapped, headers read on first use."""

    #: (slopes, intercepts) per slice as the node read them, when it sent them.
    rescale_values: tuple[np.ndarray, np.ndarray] | None = None

    def _rescale(self) -> tuple[np.ndarray, np.ndarray]:
        if self.rescale_values is not None:
            return self.rescale_values
        return super()._rescale()


def decode_series(msg: dict[str, Any]) -> SeriesInput:
    """The SeriesInput a SERIES message describes; raises ProtocolError for a message without files or voxels."""
    try:
        files = [Path(f) for f in msg["files"]]
        voxels = str(msg["voxels"]["path"])
    except (KeyError, TypeError) as e:
        raise ProtocolError(f"a series needs 'files' and 'voxels': {e}") from None
    orientation = msg.get("orientation")
    spacing = msg.get("pixel_spacing")
    positions = msg.get("positions")
    rescale = msg.get("rescale")
    return RemoteSeries(
        datasets=LazyDatasets(files),  # type: ignore[arg-type]  # a list to authors; read lazily here
        files=files,
        frames=msg.get("frames"),
        _loader=lambda: load_array(voxels),
        positions=None if positions is None else np.array(positions, dtype=float),
        orientation=None if orientation is None else (tuple(orientation[0]), tuple(orientation[1])),
        pixel_spacing=None if spacing is None else (float(spacing[0]), float(spacing[1])),
        rescale_values=None
        if rescale is None
        else (np.array(rescale["slopes"], np.float32), np.array(rescale["intercepts"], np.float32)),
    )


# -- plugin info -------------------------------------------------------------------------


def info_to_json(info: PluginInfo, target: str, dist: str = "", dist_version: str = "") -> dict[str, Any]:
    """What the node learns about a plugin in another environment (ready line, discovery)."""
    return {
        "name": info.name,
        "version": info.version,
        "description": info.description,
        "target": target,
        "schema": info.schema(),
        "max_attempts": info.max_attempts,
        "family": code_to_json(info.family),
        "segment_template": info.segment_template,
        "setup": info.has_setup,
        "gpu": info.gpu,
        "takes": getattr(info, "takes", "series"),
        "dist": dist,
        "dist_version": dist_version,
    }


# -- the node's side -----------------------------------------------------------------------


@dataclass
class RunReply:
    """A successful run: the results (arrays mapped from the worker's files), the plugin's time, and its identity."""

    results: list[Result]
    seconds: float
    #: "name version"
    plugin: str
    #: The parameters it ran with, defaults included (JSON values).
    parameters: dict[str, Any]


class WorkerClient:
    """One connection to a warm worker (which serves one connection at a time, any number of requests on it).

    Connects on first use. Any failure of the connection itself (refused, closed, the worker killed
    mid-request) is :class:`WorkerGone`; a request the worker answers as failed is :class:`RemoteError`;
    ``timeout`` (seconds per send/receive, None: wait as long as it takes) raises ``TimeoutError``.
    After WorkerGone or a timeout the connection is closed; a worker may not be reused after a timeout.
    """

    def __init__(self, socket_path: str | os.PathLike[str], timeout: float | None = None) -> None:
        self.socket_path = str(socket_path)
        self.timeout = timeout
        self._sock: socket.socket | None = None

    def __enter__(self) -> WorkerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connect(self) -> socket.socket:
        if self._sock is None:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(self.timeout)
            try:
                s.connect(self.socket_path)
            except (FileNotFoundError, ConnectionRefusedError) as e:
                s.close()
                raise WorkerGone(f"no worker listens on {self.socket_path}: {e.strerror or e}") from None
            self._sock = s
        return self._sock

    def request(self, msg: dict[str, Any]) -> dict[str, Any]:
        """Send one request and return the worker's reply as it is (``ok`` true or false)."""
        sock = self._connect()
        try:
            send_message(sock, msg)
            reply = recv_message(sock)
        except socket.timeout:  # TimeoutError from Python 3.10 on; an OSError before
            self.close()
            raise TimeoutError(
                f"the worker at {self.socket_path} did not answer {msg.get('op')!r} within {self.timeout} s"
            ) from None
        except (ConnectionError, OSError) as e:
            self.close()
            raise WorkerGone(f"the worker at {self.socket_path} went away during {msg.get('op')!r}: {e}") from None
        if reply is None:
            self.close()
            raise WorkerGone(
                f"the worker at {self.socket_path} closed the connection without answering "
                f"{msg.get('op')!r} (it was killed, crashed or ran out of memory)"
            )
        return reply

    def hello(self) -> dict[str, Any]:
        """``{"ok": true, "protocol": 1, "pid": N, "jobs": served}``; RemoteError when the worker speaks another version."""
        reply = self.request({"op": "hello", "protocol": PROTOCOL})
        if not reply.get("ok"):
            raise RemoteError(str(reply.get("error", "refused")), False, str(reply.get("kind", "ProtocolError")))
        return reply

    def run(
        self,
        series_msg: dict[str, Any],
        params: dict[str, Any] | None,
        *,
        attempt: int = 1,
        out_dir: str | os.PathLike[str],
        previous: Sequence[Result | dict[str, Any]] = (),
    ) -> RunReply:
        """Run the worker's plugin on a series (from :func:`encode_series`).

        ``previous`` (results of earlier steps of the chain) are written to ``out_dir`` for the worker;
        the worker writes its result arrays to ``out_dir`` too. RemoteError when the plugin fails.
        """
        prev = [
            r if isinstance(r, dict) else result_to_json(r, out_dir, f"previous-{i}") for i, r in enumerate(previous)
        ]
        reply = self.request(
            {
                "op": "run",
                "series": series_msg,
                "params": params or {},
                "attempt": int(attempt),
                "out_dir": str(out_dir),
                "previous": prev,
            }
        )
        if not reply.get("ok"):
            raise RemoteError(
                str(reply.get("error", "the plugin failed")),
                bool(reply.get("retryable", False)),
                str(reply.get("kind", "Exception")),
            )
        return RunReply(
            [result_from_json(r) for r in reply.get("results", [])],
            float(reply.get("seconds", 0.0)),
            str(reply.get("plugin", "")),
            dict(reply.get("parameters") or {}),
        )
