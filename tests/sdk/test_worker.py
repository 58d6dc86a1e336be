"""Warm workers over protocol v1, in the node's own Python and in other environments (numpy 1, pydicom 2,
Python 3.9): results equal to the local computation, setup once, failures as answers, a worker that dies.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import struct
import subprocess
import sys

import numpy as np
import psutil
import pytest
import sdk_plugins
from conftest import plugin_env, read_line
from dicom_node_sdk.protocol import PROTOCOL, RemoteError, WorkerClient, WorkerGone, encode_series
from helpers import wait_for

ORGANS = "organs=sdk_plugins:Organs"
FAULTY = "faulty=sdk_plugins:faulty"


def test_runs_in_any_environment_give_the_local_results_and_setup_runs_once(python, workers, ct_series, exchange):
    w = workers(python, ORGANS)
    assert w.ready["ready"] is True, w.stderr()
    info = w.ready["plugin"]
    assert (info["name"], info["version"], info["setup"], info["gpu"]) == ("sdk-organs", "1.2", True, "optional")
    assert info["schema"]["properties"]["bone"]["default"] == 300.0
    expected = sdk_plugins.compute(ct_series, sdk_plugins.OrganParams(bone=250))
    msg = encode_series(ct_series, exchange / "voxels.npy")
    with WorkerClient(w.socket, timeout=120) as client:
        assert client.hello()["jobs"] == 0
        for n in (1, 2, 3):
            reply = client.run(msg, {"bone": 250}, out_dir=exchange)
            seg, vol, img = reply.results
            assert seg.description == f"setups=1 runs={n} pid={w.ready['pid']}"
            np.testing.assert_array_equal(seg.masks, expected[0].masks)
            assert seg.kind == "labelmap"
            assert [
                (s.label, s.category, s.type, s.color, s.anatomic_region, s.type_modifier) for s in seg.segments
            ] == [
                (s.label, s.category, s.type, s.color, s.anatomic_region, s.type_modifier) for s in expected[0].segments
            ]
            np.testing.assert_allclose(vol.values, expected[1].values, rtol=1e-6)
            assert (vol.name, vol.precision, vol.units) == ("half", 0.5, expected[1].units)
            np.testing.assert_array_equal(img.pixels, expected[2].pixels)
            assert (list(img.source_slices), img.patient_orientation, img.pixel_spacing) == (
                [None],
                ("L", "F"),
                (5.0, 0.5),
            )
        assert reply.plugin == "sdk-organs 1.2"
        assert reply.parameters == {"bone": 250.0, "tissue": [-100.0, 100.0], "kind": "labelmap", "label": None}
        assert client.hello()["jobs"] == 3


def test_parameters_are_checked_in_the_worker_with_errors_naming_the_key(old_python, workers, ct_series, exchange):
    organs, faulty = workers(old_python, ORGANS), workers(old_python, FAULTY)
    plain = workers(old_python, "plain=sdk_plugins:plain")
    msg = encode_series(ct_series, exchange / "voxels.npy")
    cases = [
        (organs, {"bone": "high"}, "bone: Input should be a valid number"),
        (organs, {"tissue": [5, 1]}, "tissue is [lower, upper] with lower < upper"),
        (organs, {"kind": "fractional"}, "kind: Input should be 'labelmap', 'binary'"),
        (faulty, {"mode": "ok", "speed": 2}, "speed: Extra inputs are not permitted"),
        (plain, {"anything": 1}, "anything: Extra inputs are not permitted"),
    ]
    for w, params, text in cases:
        with WorkerClient(w.socket, timeout=60) as client, pytest.raises(RemoteError) as e:
            client.run(msg, params, out_dir=exchange)
        assert e.value.kind == "ParamsError" and text in e.value.message, e.value.message
        assert not e.value.retryable
    with WorkerClient(organs.socket, timeout=60) as client:  # the same worker still works
        assert client.run(msg, {"label": "Skull"}, out_dir=exchange).results[0].segments[1].label == "Skull"
    with WorkerClient(plain.socket, timeout=60) as client:
        reply = client.run(msg, {}, out_dir=exchange)
        assert (reply.results, reply.parameters) == ([], {})


def test_pydantic_parameters_in_an_environment_that_has_pydantic(workers, ct_series, exchange):
    w = workers(sys.executable, "bone=node.plugins.builtin.threshold:threshold_seg")
    assert w.ready["plugin"]["schema"]["properties"]["segments"], w.ready
    msg = encode_series(ct_series, exchange / "voxels.npy")
    with WorkerClient(w.socket, timeout=60) as client:
        with pytest.raises(RemoteError) as e:
            client.run(msg, {"segments": [{"label": "Bone", "lower": "x"}]}, out_dir=exchange)
        assert e.value.kind == "ParamsError"
        assert "segments.0.lower: Input should be a valid number" in e.value.message, e.value.message
        reply = client.run(msg, {"segments": [{"label": "Bone", "lower": 300}]}, out_dir=exchange)
    np.testing.assert_array_equal(reply.results[0].masks[..., 0], ct_series.rescaled() >= 300)
    assert reply.parameters["segments"][0]["lower"] == 300.0 and reply.parameters["fill_holes"] is False


def test_a_failing_plugin_is_an_answer_and_the_worker_serves_on(old_python, workers, ct_series, exchange):
    w = workers(old_python, FAULTY)
    msg = encode_series(ct_series, exchange / "voxels.npy")
    expected = {
        "plugin-error": ("PluginError", False, "the model found no head in this series"),
        "retry": ("PluginError", True, "the licence server did not answer"),
        "crash": ("Exception", False, "ZeroDivisionError: division by zero (sdk_plugins.py:"),
        "bad-result": ("PluginError", False, "plugin sdk-faulty returned a str; results are Segmentation"),
        "wrong-result": ("ResultError", False, "a label map must hold integers (0 = background, 1..1), got float32"),
        "exit": ("Exception", False, "SystemExit: 3"),
    }
    with WorkerClient(w.socket, timeout=60) as client:
        for mode, (kind, retryable, text) in expected.items():
            with pytest.raises(RemoteError) as e:
                client.run(msg, {"mode": mode}, out_dir=exchange)
            assert (e.value.kind, e.value.retryable) == (kind, retryable) and text in e.value.message, e.value.message
        reply = client.run(msg, {"mode": "print"}, out_dir=exchange)  # stdout of a plugin goes to the log
        assert reply.results[0].masks.shape == (28, 4, 4)
        assert client.hello() == {"ok": True, "protocol": PROTOCOL, "pid": w.ready["pid"], "jobs": 7}
    assert "a plugin printing to stdout" in w.stderr()


def test_another_protocol_version_or_garbage_gets_a_clear_answer(old_python, workers):
    w = workers(old_python, FAULTY)
    with WorkerClient(w.socket, timeout=30) as client:
        reply = client.request({"op": "hello", "protocol": 2})
        assert reply["ok"] is False and reply["kind"] == "ProtocolError"
        assert "protocol 2 is not spoken here" in reply["error"] and f"speaks protocol {PROTOCOL}" in reply["error"]
        assert "unknown request 'launch'" in client.request({"op": "launch"})["error"]
        assert "a run request that is not protocol 1" in client.request({"op": "run", "series": {}})["error"]
        assert client.hello()["ok"] is True
    with socket.socket(socket.AF_UNIX) as raw:  # a length no message has: answered, then the connection closed
        raw.settimeout(30)
        raw.connect(w.socket)
        raw.sendall(struct.pack(">I", 2**31) + b"{}")
        n = struct.unpack(">I", raw.recv(4))[0]
        assert "not protocol 1" in json.loads(raw.recv(n))["error"]
    with WorkerClient(w.socket, timeout=30) as client:  # and the worker takes the next connection
        assert client.hello()["pid"] == w.ready["pid"]


def test_a_worker_that_cannot_start_says_why_on_its_ready_line(old_python, workers):
    bad = workers(old_python, "bad=sdk_plugins:BadSetup")
    assert bad.ready == {
        "protocol": 1,
        "ready": False,
        "error": "plugin 'bad' (sdk_plugins:BadSetup) cannot start: "
        "RuntimeError: weights file /models/missing.onnx not found",
    }
    assert bad.proc.wait(timeout=30) == 1
    missing = workers(old_python, "gone=no_such_module:plugin")
    assert missing.ready["ready"] is False
    assert "cannot be loaded: ModuleNotFoundError: No module named 'no_such_module'" in missing.ready["error"]
    wrong = workers(old_python, "number=sdk_plugins:not_a_plugin")
    assert "plugin 'number' is a int; decorate a function with @plugin" in wrong.ready["error"]


def test_a_killed_worker_is_worker_gone_and_a_slow_one_a_timeout(old_python, workers, ct_series, exchange):
    msg = encode_series(ct_series, exchange / "voxels.npy")
    w = workers(old_python, FAULTY)
    with WorkerClient(w.socket, timeout=60) as client, pytest.raises(WorkerGone, match="closed the connection"):
        client.run(msg, {"mode": "die"}, out_dir=exchange)  # killed mid-request (as the OOM killer does)
    w2 = workers(old_python, FAULTY)
    client = WorkerClient(w2.socket, timeout=60)
    assert client.hello()["ok"]
    w2.proc.send_signal(signal.SIGKILL)
    w2.proc.wait(timeout=30)
    with pytest.raises(WorkerGone):
        client.run(msg, {}, out_dir=exchange)
    with pytest.raises(WorkerGone, match="no worker listens"):
        WorkerClient(w2.socket).hello()
    w3 = workers(old_python, FAULTY)
    with WorkerClient(w3.socket, timeout=0.5) as slow, pytest.raises(TimeoutError, match="did not answer 'run'"):
        slow.run(msg, {"mode": "sleep", "seconds": 5}, out_dir=exchange)


def test_a_worker_dies_with_the_process_that_started_it(old_python, tmp_path):
    """The node killed (SIGKILL: no cleanup of its own) takes its workers along."""
    parent = (
        "import subprocess, sys\n"
        f"w = subprocess.Popen([{old_python!r}, '-m', 'dicom_node_sdk.worker', '--socket', {str(tmp_path / 'p.sock')!r},"
        f" '--plugin', {FAULTY!r}], stdout=subprocess.PIPE, text=True)\n"
        "print(w.pid, w.stdout.readline().strip(), flush=True)\n"
        "import time; time.sleep(300)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", parent], stdout=subprocess.PIPE, text=True, env=plugin_env())
    try:
        pid_text, line = read_line(proc, 120).split(" ", 1)
        assert json.loads(line)["ready"] is True
        worker = psutil.Process(int(pid_text))
        assert worker.ppid() == proc.pid
        proc.kill()
        proc.wait(timeout=30)

        def gone() -> bool:
            try:
                return worker.status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        wait_for(gone, 30, "the worker to end with its parent")
    finally:
        proc.kill()
        proc.wait(timeout=30)
        if psutil.pid_exists(int(pid_text)) and not gone():
            os.kill(int(pid_text), signal.SIGKILL)


def test_a_plugin_may_change_its_input_voxels_privately(old_python, workers, ct_series, exchange):
    """The voxels are mapped copy-on-write: a plugin that scribbles on them changes neither the node's file
    (which the next step of a chain reads) nor what the next job sees."""
    msg = encode_series(ct_series, exchange / "voxels.npy")
    np.testing.assert_array_equal(np.load(exchange / "voxels.npy"), ct_series.voxels())
    w = workers(old_python, FAULTY)
    with WorkerClient(w.socket, timeout=60) as client:
        assert client.run(msg, {"mode": "scribble"}, out_dir=exchange).results[0].description == "scribbled"
        assert client.run(msg, {"mode": "scribble"}, out_dir=exchange).results[0].description == "scribbled"
    np.testing.assert_array_equal(np.load(exchange / "voxels.npy"), ct_series.voxels())
