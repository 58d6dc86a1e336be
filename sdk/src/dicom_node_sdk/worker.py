"""``python -m dicom_node_sdk.worker --socket PATH --plugin NAME=module:attr``: a warm plugin worker.

The node starts one per plugin (and device) in the plugin's own environment. It imports the plugin,
calls ``setup()`` once (a class plugin: one instance per worker), listens on the Unix socket, then
prints ONE JSON line on stdout:

    {"protocol": 1, "ready": true, "pid": N, "setup_seconds": s, "plugin": INFO}
    {"protocol": 1, "ready": false, "error": "..."}          (and exits 1)

and serves one connection at a time, any number of requests on each (see dicom_node_sdk.protocol),
until it is killed. A plugin that raises, or parameters it refuses, are answers, never the end of the
worker. Everything else it says goes to stderr, which the node keeps in its log; so does whatever
the plugin prints.

It dies with the process that started it (Linux: PR_SET_PDEATHSIG). Note that the kernel sends that
signal when the parent *thread* ends: the node starts workers from a thread that lives as long as they do.
"""

from __future__ import annotations

import argparse
import ctypes
import logging
import os
import signal
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from dicom_node_sdk._info import PluginInfo, as_results
from dicom_node_sdk._process import answer, forget_working_directory, take_stdout
from dicom_node_sdk.errors import GeometryError, PluginError, ResultError
from dicom_node_sdk.loading import PluginLoadError, installed_plugins, load
from dicom_node_sdk.params import ParamsError
from dicom_node_sdk.protocol import (
    PROTOCOL,
    ProtocolError,
    decode_series,
    info_to_json,
    recv_message,
    result_from_json,
    result_to_json,
    send_message,
)

log = logging.getLogger("dicom_node_sdk.worker")

_PR_SET_PDEATHSIG = 1


def die_with_parent(parent: int) -> None:
    """Ask the kernel to kill this process when its parent ends; exit now if it already has."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
                log.warning(
                    "prctl(PR_SET_PDEATHSIG) failed (errno %d): this worker may outlive the node", ctypes.get_errno()
                )
        except (OSError, AttributeError) as e:
            log.warning("cannot ask to die with the node (%s): this worker may outlive it", e)
    if os.getppid() != parent:  # the parent ended before the request took effect
        log.error("the process that started this worker (pid %d) has ended; exiting", parent)
        os._exit(1)


class Worker:
    """One plugin, set up, answering requests."""

    def __init__(self, name: str, target: str, info: PluginInfo, runner: Callable[..., Any]) -> None:
        self.name, self.target, self.info, self.runner = name, target, info, runner
        self.jobs = 0
        self._hold: Any = None

    def handle(self, msg: dict[str, Any]) -> dict[str, Any]:
        op = msg.get("op")
        if op == "hello":
            theirs = msg.get("protocol")
            if theirs != PROTOCOL:
                return {
                    "ok": False,
                    "kind": "ProtocolError",
                    "error": f"protocol {theirs!r} is not spoken here: this worker (dicom-node-sdk in "
                    f"{sys.executable}) speaks protocol {PROTOCOL}; install the dicom-node-sdk of the "
                    "node's version into the plugin's environment",
                }
            return {"ok": True, "protocol": PROTOCOL, "pid": os.getpid(), "jobs": self.jobs}
        if op == "run":
            self.jobs += 1
            # The job's arrays and maps are freed when run() returns (reference counting; a full
            # gc.collect() here would cost tens of ms per job in a process with many imports).
            return self.run(msg)
        return {"ok": False, "kind": "ProtocolError", "error": f"unknown request {op!r} (protocol {PROTOCOL})"}

    def _refused(self, kind: str, text: str, retryable: bool = False) -> dict[str, Any]:
        log.warning("job %d: %s: %s", self.jobs, kind, text)
        return {"ok": False, "error": text, "retryable": retryable, "kind": kind}

    def run(self, msg: dict[str, Any]) -> dict[str, Any]:
        name = self.info.name or self.name
        try:
            out_dir = Path(str(msg["out_dir"]))
            if not out_dir.is_dir():
                raise ProtocolError(f"out_dir {out_dir} is not a folder")
            series = decode_series(msg["series"])
            series.previous = [result_from_json(r) for r in msg.get("previous") or []]
            params = self.info.validate_params(msg.get("params") or {})
        except ParamsError as e:
            return self._refused("ParamsError", f"plugin {name}: {e}")
        except (ProtocolError, KeyError, TypeError, ValueError) as e:
            return self._refused(
                "ProtocolError", f"a run request that is not protocol {PROTOCOL}: {type(e).__name__}: {e}"
            )
        t = time.perf_counter()
        # Unmapping a large volume takes milliseconds: done after the reply is sent (see serve_connection).
        self._hold = series
        try:
            out = as_results(name, self.runner(series, params))
            seconds = time.perf_counter() - t
            stem = f"w{os.getpid()}-{self.jobs:05d}"
            results = [result_to_json(r, out_dir, f"{stem}-{i}") for i, r in enumerate(out)]
            parameters = self.info.dump_params(params)
        except PluginError as e:
            return self._refused("PluginError", str(e), bool(e.retryable))
        except GeometryError as e:
            return self._refused("GeometryError", str(e))
        except ResultError as e:  # a result the plugin made wrong: the message says what to change
            return self._refused("ResultError", str(e))
        except (Exception, SystemExit) as e:  # noqa: BLE001 (MemoryError too): the job fails, the worker serves on
            log.error("job %d failed:\n%s", self.jobs, traceback.format_exc())
            tb = traceback.extract_tb(e.__traceback__)
            where = f" ({Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
            return self._refused("Exception", f"{type(e).__name__}: {e}{where}")
        log.info(
            "job %d: %s %s on %d slice(s): %d result(s) in %.3f s",
            self.jobs,
            name,
            self.info.version,
            len(series),
            len(results),
            seconds,
        )
        return {
            "ok": True,
            "results": results,
            "seconds": seconds,
            "plugin": f"{name} {self.info.version}",
            "parameters": parameters,
        }

    def serve_connection(self, conn: socket.socket) -> None:
        """Requests until the client closes the connection (or breaks the protocol)."""
        while True:
            try:
                msg = recv_message(conn)
            except ProtocolError as e:
                send_message(conn, {"ok": False, "kind": "ProtocolError", "error": str(e)})
                return
            if msg is None:
                return
            send_message(conn, self.handle(msg))
            self._hold = None  # the job's series and its mapped voxels go now, with the node already answered

    def serve(self, listener: socket.socket) -> None:
        while True:
            conn, _ = listener.accept()
            with conn:
                try:
                    self.serve_connection(conn)
                except (ConnectionError, OSError) as e:  # the client went away mid-request: next one
                    log.warning("connection lost: %s", e)


class Terminated(BaseException):
    """SIGTERM: the node stops this worker (not an exception of the plugin's, so never taken for one)."""


def _terminate(*_: Any) -> None:
    raise Terminated


def _listen(path: str) -> socket.socket:
    """A listening Unix socket at ``path`` (a stale socket file left there is replaced)."""
    p = Path(path)
    if p.is_socket():
        p.unlink()
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(path)
    s.listen(8)
    return s


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m dicom_node_sdk.worker", description=__doc__.split("\n")[0])
    ap.add_argument("--socket", required=True, help="the Unix socket to listen on")
    ap.add_argument("--plugin", required=True, metavar="NAME=module:attr", help="the plugin this worker runs")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit if this process is no longer the parent")
    args = ap.parse_args(argv)
    forget_working_directory()
    parent = args.parent_pid if args.parent_pid is not None else os.getppid()
    out = take_stdout()
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format=f"%(asctime)s worker[{os.getpid()}] %(levelname)s %(message)s"
    )
    die_with_parent(parent)
    name, sep, target = args.plugin.partition("=")
    if not sep or not name:
        answer(out, {"protocol": PROTOCOL, "ready": False, "error": f"--plugin {args.plugin!r}: give NAME=module:attr"})
        return 1
    t = time.perf_counter()
    try:
        info = load(name, target)
        described = info_to_json(info, target)
        runner = info.prepare()
    except PluginLoadError as e:
        answer(out, {"protocol": PROTOCOL, "ready": False, "error": str(e)})
        return 1
    except (Exception, SystemExit) as e:  # noqa: BLE001: setup() failed
        log.error("%s cannot start:\n%s", name, traceback.format_exc())
        answer(
            out,
            {
                "protocol": PROTOCOL,
                "ready": False,
                "error": f"plugin {name!r} ({target}) cannot start: {type(e).__name__}: {e}",
            },
        )
        return 1
    setup_seconds = time.perf_counter() - t
    try:
        listener = _listen(args.socket)
    except OSError as e:
        answer(out, {"protocol": PROTOCOL, "ready": False, "error": f"cannot listen on {args.socket}: {e}"})
        return 1
    described["dist"], described["dist_version"] = next(
        ((ep.dist, ep.dist_version) for ep in installed_plugins() if ep.target == target), ("", "")
    )
    signal.signal(signal.SIGTERM, _terminate)
    log.info("%s %s ready on %s (setup %.2f s)", info.name, info.version, args.socket, setup_seconds)
    answer(
        out,
        {"protocol": PROTOCOL, "ready": True, "pid": os.getpid(), "setup_seconds": setup_seconds, "plugin": described},
    )
    try:
        Worker(name, target, info, runner).serve(listener)
    except Terminated:
        log.info("terminated")
    finally:
        listener.close()
        Path(args.socket).unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
