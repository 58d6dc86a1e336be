"""The example model package (examples/onnx-organs) in an environment of its own, checked against its reference.

The plugin runs in a venv with numpy 1.x and pydicom 2.x (the node has numpy 2 and pydicom 3), on a
real CT series, through its installed entry point, one instance serving several series as a warm
worker does. Its label map is compared with ``reference.py`` computed here, in the node's Python:
two numpy major versions, onnxruntime's float32 kernels against a float64 computation.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from node.plugins.series import load_series
from tests.helpers import REPO

EXAMPLE = REPO / "examples" / "onnx-organs"
CT = "series/ct-head-philips-5mm"
MR = "series/mr-t1-sag-siemens"

#: Runs in the plugin's environment: builds a SeriesInput as a worker does (headers read there, voxels from a
#: .npy the node wrote), loads the plugin by its entry point, makes ONE instance, calls setup once, then runs
#: each requested job. Prints one JSON line.
ENV_SCRIPT = r"""
import json, os, sys
from importlib.metadata import entry_points, version
import numpy as np, pydicom
from dicom_node_sdk import SeriesInput, as_info

spec = json.load(open(sys.argv[1]))
eps = entry_points()
eps = eps.select(group="dicom_node.plugins") if hasattr(eps, "select") else eps.get("dicom_node.plugins", [])
(ep,) = [e for e in eps if e.name == "onnx-tissue"]
cls = ep.load()
info = as_info(cls, ep.name)
datasets = [pydicom.dcmread(f, stop_before_pixels=True) for f in spec["files"]]
series = SeriesInput(datasets, spec["files"], _loader=lambda: np.load(spec["voxels"], mmap_mode="c"))
instance = cls()
instance.setup()
out = {"numpy": np.__version__, "pydicom": pydicom.__version__, "onnxruntime": version("onnxruntime"),
       "pid": os.getpid(), "gpu": info.gpu, "has_setup": info.has_setup, "schema": info.schema(), "runs": []}
for i, params in enumerate(spec["runs"]):
    try:
        results = instance.run(series, info.validate_params(params))
    except Exception as e:
        out["runs"].append({"error": type(e).__name__, "message": str(e)})
        continue
    (seg,) = results
    path = os.path.join(spec["out"], "run%d.npy" % i)
    np.save(path, seg.masks)
    out["runs"].append({
        "masks": path, "kind": seg.kind, "description": seg.description,
        "segments": [{"label": s.label, "category": [s.category.value, s.category.scheme_designator],
                      "type": [s.type.value, s.type.scheme_designator, s.type.meaning], "color": list(s.color)}
                     for s in seg.segments],
    })
print(json.dumps(out))
"""


def run_plugin(python: Path, tmp_path: Path, folder: Path, runs: list[dict], **env: str) -> dict:
    """Run onnx-tissue in its environment on the series in ``folder``, once per entry of ``runs`` (one instance)."""
    series = load_series(sorted(p for p in folder.iterdir() if p.name != "DIRFILE"))
    voxels = tmp_path / "voxels.npy"
    np.save(voxels, series.voxels())
    spec = tmp_path / "spec.json"
    spec.write_text(
        json.dumps({"files": [str(f) for f in series.files], "voxels": str(voxels), "out": str(tmp_path), "runs": runs})
    )
    # cwd elsewhere than the repository: its dicom_node.egg-info would show the node's entry points there.
    done = subprocess.run(
        [str(python), "-c", ENV_SCRIPT, str(spec)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, **env},
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_environment_has_other_numpy_and_pydicom_than_the_node(onnx_python: Path, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(onnx_python), "-c", "import numpy, pydicom, onnxruntime; print(numpy.__version__, pydicom.__version__)"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    env_numpy, env_pydicom = done.stdout.split()
    assert env_numpy.startswith("1.") and env_pydicom.startswith("2."), done.stdout
    assert np.__version__.split(".")[0] != "1" and pydicom.__version__.split(".")[0] != "2"


def test_model_script_writes_the_same_checked_graph_each_time(onnx_python: Path, tmp_path: Path) -> None:
    """``python -m dicom_node_example_onnx.make_model OUT`` (and by env var): a valid ONNX file, byte for byte stable."""
    a, b = tmp_path / "a.onnx", tmp_path / "sub" / "b.onnx"
    subprocess.run(
        [str(onnx_python), "-m", "dicom_node_example_onnx.make_model", str(a)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
    )
    subprocess.run(
        [str(onnx_python), "-m", "dicom_node_example_onnx.make_model"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=120,
        env={**os.environ, "DICOM_NODE_ONNX_TISSUE_MODEL": str(b)},
    )
    assert a.read_bytes() == b.read_bytes()
    check = (
        "import onnx, sys; m = onnx.load(sys.argv[1]); onnx.checker.check_model(m, full_check=True); "
        "print(' '.join(n.op_type for n in m.graph.node), m.opset_import[0].version)"
    )
    done = subprocess.run(
        [str(onnx_python), "-c", check, str(a)], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["Unsqueeze", "Clip", "Pad", "Conv", "Mul", "Concat", "Conv", "ArgMax", "Cast", "13"]


def test_plugin_in_its_environment_matches_the_reference_on_a_real_ct(
    onnx_python: Path, tmp_path: Path, shared_data: Path, reference
) -> None:
    model = tmp_path / "models" / "tissue.onnx"  # not there yet: setup builds it
    runs = [{}, {"batch_size": 5}, {"batch_size": 64, "kind": "labelmap"}]  # 28 slices: a last batch of 3, one batch
    out = run_plugin(onnx_python, tmp_path, shared_data / CT, runs, DICOM_NODE_ONNX_TISSUE_MODEL=str(model))
    assert model.is_file()
    assert out["numpy"].startswith("1.") and out["pydicom"].startswith("2.")
    assert out["gpu"] == "optional" and out["has_setup"] is True

    # One setup, in the environment's process, serving three jobs.
    assert [r["description"] for r in out["runs"]] == [
        f"onnx-tissue setup #1 in pid {out['pid']}, job {n} (CPU)" for n in (1, 2, 3)
    ]
    assert out["pid"] != os.getpid()
    assert [r["kind"] for r in out["runs"]] == ["binary", "binary", "labelmap"]

    # Segments: category Tissue, types of DICOM CID 7166 as pydicom 3 (the node's) names them.
    tissue = [codes.cid7150.Tissue.value, "SCT"]
    expected = [
        ("Fat", codes.cid7166.AdiposeTissue),
        ("Soft tissue", codes.cid7166.SoftTissue),
        ("Bone", codes.cid7166.BoneTissue),
    ]
    for run in out["runs"]:
        assert [(s["label"], s["category"], s["type"]) for s in run["segments"]] == [
            (label, tissue, [code.value, code.scheme_designator, code.meaning]) for label, code in expected
        ]

    # The label map against the float64 numpy reference, computed in this (numpy 2) Python.
    hu = load_series(sorted(p for p in (shared_data / CT).iterdir() if p.name != "DIRFILE")).rescaled()
    want, margin = reference.labels(hu)
    for run in out["runs"]:
        got = np.load(run["masks"])
        assert got.shape == hu.shape and got.dtype == np.uint8
        differ = got != want
        # float32 (onnxruntime) and float64 (reference) may pick different classes only on a class boundary,
        # where the two best scores tie within float32 rounding. Measured: 0 voxels of 7.3 million differ.
        assert differ.mean() <= 1e-5, f"{differ.sum()} voxels differ"
        assert np.all(margin[differ] < 1e-3), (
            f"voxels differ away from a class boundary: margins {margin[differ].max()}"
        )

    # What a CT head holds: every class, none taking everything (fractions of the 28 x 512 x 512 voxels).
    fractions = np.bincount(want.ravel(), minlength=4) / want.size
    assert fractions[0] > 0.5 and all(0.005 < f < 0.2 for f in fractions[1:]), fractions


def test_refuses_what_it_cannot_segment_and_asks_for_cuda_only_when_there(
    onnx_python: Path, tmp_path: Path, shared_data: Path
) -> None:
    """An MR series and bad parameters fail with messages that say why; a GPU worker without CUDA runs on the CPU."""
    out = run_plugin(
        onnx_python,
        tmp_path,
        shared_data / MR,
        [{}, {"batch_size": 0}, {"kind": "fractional"}],
        DICOM_NODE_DEVICE="cuda",
        CUDA_VISIBLE_DEVICES="0",
        DICOM_NODE_ONNX_TISSUE_MODEL=str(tmp_path / "tissue.onnx"),
    )
    mr, small, kind = out["runs"]
    assert mr == {"error": "PluginError", "message": "onnx-tissue classifies CT values (HU); this series is MR"}
    assert small["error"] == "ParamsError" and "batch_size must be between 1 and 512 (got 0)" in small["message"]
    assert kind["error"] == "ParamsError" and "kind" in kind["message"]

    ct = run_plugin(
        onnx_python,
        tmp_path,
        shared_data / CT,
        [{}],
        DICOM_NODE_DEVICE="cuda",
        CUDA_VISIBLE_DEVICES="0",
        DICOM_NODE_ONNX_TISSUE_MODEL=str(tmp_path / "tissue.onnx"),
    )
    assert ct["runs"][0]["description"].endswith("job 1 (CPU)")


def test_class_boundaries_are_the_documented_ones(reference) -> None:
    """The README's table: air up to -295 HU, fat to -25, soft tissue to 167, bone above (on the smoothed value)."""
    hu = np.arange(-1100.0, 3200.0, 0.5)  # one constant slice per value: smoothing leaves it as it is
    labels, _ = reference.labels(np.broadcast_to(hu[:, None, None], (len(hu), 3, 3)))
    per_value = labels[:, 1, 1]
    changes = np.flatnonzero(np.diff(per_value)) + 1
    assert per_value[changes].tolist() == [1, 2, 3]
    assert np.allclose(hu[changes], [-295, -25, 167], atol=1), hu[changes]  # the README rounds to 1 HU
    assert per_value[0] == 0 and per_value[-1] == 3  # below the clip range: air; far above: bone
