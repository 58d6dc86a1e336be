"""The plugin contract as an author meets it: results that say what to change when made wrong, a complete
``__all__``, and a decorated plugin that is still the function (callable in a unit test, typed as it)."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import dicom_node_sdk
import numpy as np
import pytest
from dicom_node_sdk import Code, Images, ResultError, Segment, Segmentation, Volume, api, codes, plugin
from dicom_node_sdk.loading import as_info

BONE = Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone)
LIVER = Segment("Liver", codes.SCT.AnatomicalStructure, codes.SCT.Liver)
SHAPE = (4, 6, 5)  # slices, rows, columns


def _labels(top: int = 2) -> np.ndarray:
    return np.arange(np.prod(SHAPE)).reshape(SHAPE) % (top + 1)


#: (what a plugin wrote, what the error must say): each names the field and what to change.
MADE_WRONG: dict[str, tuple[Any, str]] = {
    # Segment
    "segment-category-str": (
        lambda: Segment("Bone", "Tissue", codes.SCT.Bone),  # type: ignore[arg-type]
        r"Segment 'Bone': category must be a pydicom Code, e.g. codes.SCT.Liver",
    ),
    "segment-color": (
        lambda: Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone, color=(300, 0, 0)),
        r"color must be \(red, green, blue\), each 0-255; got \(300, 0, 0\)",
    ),
    "segment-algorithm-type": (
        lambda: Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone, algorithm_type="AI"),
        r"algorithm_type must be one of 'AUTOMATIC', 'SEMIAUTOMATIC', 'MANUAL'; got 'AI'",
    ),
    # Segmentation
    "seg-kind": (lambda: Segmentation(_labels(1), [BONE], kind="mask"), r"Segmentation.kind must be one of 'binary'"),
    "seg-negative-undescribed": (
        lambda: Segmentation(-_labels(1), []),  # (labels a segment template describes)
        r"label values must be 0 \(background\) or more; found -1",
    ),
    "seg-fractional-two": (
        lambda: Segmentation(np.zeros(SHAPE), [BONE, LIVER], "fractional"),
        r"one fractional mask holds one segment, but 2 are described: stack one per segment",
    ),
    "seg-segment-type": (lambda: Segmentation(_labels(1), ["Bone"]), r"segments\[0\] must be a Segment, not a str"),
    "seg-2d": (
        lambda: Segmentation(np.zeros((6, 5), bool), [BONE]),
        r"masks must be \(slices, rows, columns\) as a label map or \(slices, rows, columns, segments\) as stacked masks; "
        r"got shape \(6, 5\)",
    ),
    "seg-stack-count": (
        lambda: Segmentation(np.zeros((*SHAPE, 3), bool), [BONE, LIVER]),
        r"3 stacked masks but 2 segment descriptions: give one Segment per mask",
    ),
    "seg-fractional-ints": (
        lambda: Segmentation(np.zeros((*SHAPE, 1), np.uint8), [BONE], "fractional"),
        r"fractional Segmentation needs float masks in \[0, 1\].*got uint8; convert with masks.astype\(np.float32\)",
    ),
    "seg-fractional-range": (
        lambda: Segmentation(np.full((*SHAPE, 1), 1.5), [BONE], "fractional"),
        r"must lie in \[0, 1\] \(no NaN\); found values 1.5..1.5",
    ),
    "seg-fractional-nan": (
        lambda: Segmentation(np.full((*SHAPE, 1), np.nan), [BONE], "fractional"),
        r"must lie in \[0, 1\] \(no NaN\); found NaN",
    ),
    "seg-bool-two-segments": (
        lambda: Segmentation(np.zeros(SHAPE, bool), [BONE, LIVER]),
        r"a boolean label map holds one segment, but 2 are described: give integer labels 0..n, or stack",
    ),
    "seg-float-labels": (
        lambda: Segmentation(np.zeros(SHAPE, np.float32), [BONE]),
        r"a label map must hold integers \(0 = background, 1..1\), got float32; convert with masks.astype\(np.uint8\)",
    ),
    "seg-label-range": (
        lambda: Segmentation(_labels(3), [BONE, LIVER]),
        r"label values must be 0..2 \(one Segment per label\); found 0..3: describe every label with a Segment",
    ),
    "seg-negative-label": (lambda: Segmentation(-_labels(1), [BONE]), r"label values must be 0..1 .*found -1..0"),
    "seg-overlap": (
        lambda: Segmentation(np.ones((*SHAPE, 2), bool), [BONE, LIVER], "labelmap"),
        r'stacked masks overlap, so they cannot be one label map; use kind="binary"',
    ),
    "seg-objects": (
        lambda: Segmentation(np.full(SHAPE, None), [BONE]),
        r"Segmentation.masks must be booleans or numbers, not object",
    ),
    # Images
    "images-rgba": (
        lambda: Images(np.zeros((1, 6, 5, 4), np.uint8)),
        r"pixels must be \(n, rows, columns\) grey or \(n, rows, columns, 3\) RGB; got shape \(1, 6, 5, 4\): drop the "
        r"alpha channel with pixels\[..., :3\]",
    ),
    "images-1d": (lambda: Images(np.zeros(5, np.uint8)), r"got shape \(5,\)"),
    "images-rgb-16": (
        lambda: Images(np.zeros((1, 6, 5, 3), np.uint16)),
        r"RGB Images.pixels must be uint8, got uint16",
    ),
    "images-float": (
        lambda: Images(np.zeros((2, 6, 5), np.float32)),
        r"grey Images.pixels must be uint8 or uint16, got float32: window them first, e.g. np.clip",
    ),
    "images-sources-count": (
        lambda: Images(np.zeros((3, 6, 5), np.uint8), [0, 1]),
        r"3 images but 2 source_slices: give one slice index \(or None\) per image",
    ),
    "images-sources-negative": (
        lambda: Images(np.zeros((2, 6, 5), np.uint8), [0, -1]),
        r"source_slices holds -1; each is the index \(0, 1, ...\) of the input slice",
    ),
    "images-orientation": (
        lambda: Images(np.zeros((1, 6, 5), np.uint8), patient_orientation=("left", "F")),
        r"patient_orientation must be .* letters L, R, A, P, H, F, e.g. \(\"L\", \"F\"\); got \('left', 'F'\)",
    ),
    "images-spacing": (
        lambda: Images(np.zeros((1, 6, 5), np.uint8), pixel_spacing=(0.5, 0)),
        r"Images.pixel_spacing must be \(row spacing, column spacing\) in mm, both > 0; got \(0.5, 0\)",
    ),
    # Volume
    "volume-kind": (
        lambda: Volume(np.zeros(SHAPE), kind="map"),
        r"Volume.kind must be one of 'image', 'parametric-map'",
    ),
    "volume-complex": (
        lambda: Volume(np.zeros(SHAPE, complex)),
        r"Volume.values must be real numbers, not complex128: convert with .astype\(np.float32\)",
    ),
    "volume-bool": (lambda: Volume(np.zeros(SHAPE, bool)), r"must be real numbers, not bool"),
    "volume-2d": (
        lambda: Volume(np.zeros((6, 5))),
        r"Volume.values must be \(slices, rows, columns\); got shape \(6, 5\)",
    ),
    "volume-empty": (lambda: Volume(np.zeros((0, 6, 5))), r"Volume.values is empty \(shape \(0, 6, 5\)\)"),
    "volume-nan": (
        lambda: Volume(np.full(SHAPE, np.inf)),
        r"holds NaN or infinite values; replace them before returning it, e.g. np.nan_to_num",
    ),
    "volume-precision": (lambda: Volume(np.zeros(SHAPE), precision=-1), r"precision must be a number >= 0"),
    "volume-units": (lambda: Volume(np.zeros(SHAPE), units="mm"), r"Volume.units must be a UCUM pydicom Code"),
    "volume-affine-shape": (
        lambda: Volume(np.zeros(SHAPE), affine=np.eye(3)),
        r"Volume.affine must be a finite 4x4 matrix, not shape \(3, 3\)",
    ),
    "volume-affine-flat": (
        lambda: Volume(np.zeros(SHAPE), affine=np.diag([0.0, 1, 1, 1])),
        r"Volume.affine has a zero-length slice axis",
    ),
}


@pytest.mark.parametrize("case", list(MADE_WRONG))
def test_a_result_made_wrong_says_what_to_change(case):
    make, message = MADE_WRONG[case]
    with pytest.raises(ResultError, match=message):
        make()


def test_result_errors_are_value_errors_and_right_results_are_taken_as_given():
    assert issubclass(ResultError, ValueError)
    # the forms the docs list, each accepted
    Segmentation(_labels(2), [BONE, LIVER])
    Segmentation(_labels(1) > 0, [BONE])
    Segmentation(np.zeros((*SHAPE, 2), bool), [BONE, LIVER], "labelmap")
    Segmentation(np.random.default_rng(0).random((*SHAPE, 1)), [BONE], "fractional")
    Segmentation(np.zeros((0, 6, 5), bool), [BONE])  # no slices: nothing to check
    # without descriptions, for a segment template: label values and masks as the template numbers them
    Segmentation(_labels(7), [])
    Segmentation(np.zeros((*SHAPE, 3), bool), [])
    Segment("Bone", codes.SCT.Tissue, Code("3138006", "SCT", "Bone"), color=(np.uint8(1), 2, 3))
    Volume(np.arange(120, dtype=np.int16).reshape(SHAPE), affine=np.diag([2.0, 1, 1, 1]), precision=0)
    # normalised: arrays, one 2-D picture as one image, lists of source slices
    masks = Segmentation(_labels(1).tolist(), (BONE,)).masks
    assert isinstance(masks, np.ndarray) and masks.shape == SHAPE
    one = Images(np.zeros((6, 5), np.uint8), source_slices=(np.int64(3),), patient_orientation=["L", "F"])
    assert one.pixels.shape == (1, 6, 5) and one.source_slices == [3] and one.patient_orientation == ("L", "F")


def test_transpose_hint_names_the_axes_to_move():
    from dicom_node_sdk.results import transpose_hint

    assert transpose_hint((512, 512, 28), (28, 512, 512)) == ": transpose it with .transpose(2, 0, 1)"
    assert transpose_hint((28, 512, 512, 3), (28, 512, 512, 3)) == ""
    assert transpose_hint((27, 512, 512), (28, 512, 512)) == ""


# -- __all__ --------------------------------------------------------------------------------------


def _defined_here(module: Any) -> set[str]:
    """Public names of ``module`` that the SDK defines (not numpy, typing or the standard library)."""
    out = set()
    for name, obj in vars(module).items():
        if name.startswith("_") or inspect.ismodule(obj):
            continue
        origin = getattr(obj, "__module__", None)
        if origin is None or origin.startswith("dicom_node_sdk"):  # constants (a tuple) have no __module__
            out.add(name)
    return out


def test_all_is_complete_and_importable_from_the_package():
    missing = _defined_here(api) - set(api.__all__)
    assert not missing, f"public in dicom_node_sdk.api but not in its __all__: {sorted(missing)}"
    assert set(dicom_node_sdk.__all__) == {*api.__all__, "__version__", "geometry"}
    for name in api.__all__:
        assert getattr(dicom_node_sdk, name) is getattr(api, name), name
    exec(f"from dicom_node_sdk import {', '.join(api.__all__)}", {})
    # the node's side is not part of the contract
    assert not {"PluginInfo", "as_info", "as_results"} & set(api.__all__)


# -- a decorated plugin is still its function --------------------------------------------------------


def test_a_decorated_plugin_is_callable_like_its_function():
    calls: list[tuple[Any, Any]] = []

    @plugin(name="bone", version="1.0")
    def bone(series: Any, params: Any) -> list[Segmentation]:
        """Bone above 300 HU."""
        calls.append((series, params))
        return [Segmentation(np.asarray(series) > 300, [BONE])]

    volume = np.full(SHAPE, 400)
    (seg,) = bone(volume, None)
    assert calls == [(volume, None)] and seg.masks.all()
    assert (bone.name, bone.version, bone.description) == ("bone", "1.0", "Bone above 300 HU.")
    assert bone.__name__ == "bone" and bone.__doc__ == "Bone above 300 HU."
    assert list(inspect.signature(bone).parameters) == ["series", "params"]
    assert as_info(bone, "bone") is bone  # what the node loads: the same object


def test_the_builtin_threshold_seg_runs_when_called(ct_series):
    from node.plugins.builtin.distance import distance_map
    from node.plugins.builtin.threshold import threshold_seg

    (seg,) = threshold_seg(ct_series, threshold_seg.validate_params({}))  # bone: 300 HU and above
    bone = ct_series.rescaled() >= 300
    assert isinstance(seg, Segmentation) and seg.segments[0].label == "Bone"
    np.testing.assert_array_equal(seg.masks[..., 0], bone)
    ct_series.previous = [seg]
    try:
        distances = distance_map(ct_series, distance_map.params())  # one Volume, not a list
    finally:
        ct_series.previous = []
    assert isinstance(distances, Volume) and distances.values.shape == bone.shape
    assert (distances.values[bone] <= 0).all() and (distances.values[~bone] > 0).all()


def test_the_decorator_keeps_the_functions_type(tmp_path, request):
    """mypy takes a plugin returning one Volume, keeps its parameters, and refuses a plugin returning a str."""
    code = textwrap.dedent(
        """
        from __future__ import annotations
        import numpy as np
        from dicom_node_sdk import SeriesInput, Volume, plugin

        @plugin(name="one", version="1")
        def one(series: SeriesInput, params: object) -> Volume:
            return Volume(np.zeros((1, 2, 2)))

        volume: Volume = one(SeriesInput(datasets=[]), None)
        one("x")

        @plugin(name="text", version="1")
        def text(series: SeriesInput, params: object) -> str:
            return "no"
        """
    )
    path = tmp_path / "typed_plugin.py"
    path.write_text(code)
    cache = request.config.cache.mkdir("mypy-sdk") if request.config.cache else tmp_path / "cache"
    out = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(cache), "--no-error-summary", str(path)],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    ).stdout
    errors = {(int(m[1]), m[2]) for m in re.finditer(r"typed_plugin\.py:(\d+): error: .*\[([a-z-]+)\]", out)}
    assert errors == {(11, "call-arg"), (11, "arg-type"), (13, "type-var")}, out


def test_sdk_sources_have_no_node_imports():
    """The SDK runs in plugin environments without the node: nothing under sdk/ imports ``node``."""
    root = Path(dicom_node_sdk.__file__).parent
    for py in root.glob("*.py"):
        assert not re.search(r"^\s*(from|import) node\b", py.read_text(), re.M), py.name


# -- a wrong result fails its job with the same message, never the worker ------------------------------


@pytest.mark.parametrize(
    ("mode", "error"),
    [
        (
            "wrong-result",
            "running plugin sdk-faulty: a label map must hold integers (0 = background, 1..1), got float32; "
            "convert with masks.astype(np.uint8)",
        ),
        (
            "slices-last",
            "building output 1 of 1 (sdk-faulty): Segmentation.masks must be (slices, rows, columns) = "
            "(28, 512, 512) like the series; got (512, 512, 28): transpose it with .transpose(2, 0, 1)",
        ),
    ],
)
def test_a_wrong_result_fails_the_job_saying_what_to_change(mode, error, tmp_path):
    from helpers import series_files

    from node.plugins.worker import StepSpec, WorkSpec, run

    files = [str(f) for f in series_files("ct-head-philips-5mm")]
    spec = WorkSpec(
        files, [StepSpec("sdk-faulty", "sdk_plugins:faulty", {"mode": mode})], str(tmp_path), ("1", 1, "r", 0)
    )
    result = run(spec)
    assert (result.ok, result.retryable, result.outputs) == (False, False, [])
    assert result.error == error
