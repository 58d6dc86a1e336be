"""The plugin contract: what a plugin gets, what it returns, and how it declares itself.

A plugin is a function or a class that takes a :class:`SeriesInput` and its
validated parameters and returns results: :class:`Segmentation` (masks and
what they show), :class:`Images` (pictures for Secondary Capture) or
:class:`Volume` (a derived image series or parametric map). It never builds
DICOM, makes UIDs or copies patient data: the node does that, so every output
references its sources correctly and identifies the algorithm. Results check
their arrays when they are made (:class:`ResultError` says what to change);
the geometry behind :class:`SeriesInput` is in :mod:`dicom_node_sdk.geometry`.

This module needs only numpy and pydicom (any current major version), so the
same contract works in the node and in a plugin's own environment (a venv with
its own torch, numpy and pydicom); the node imports it as ``node.plugins.api``.

Function form::

    from dataclasses import dataclass
    from dicom_node_sdk import plugin, Segmentation, Segment, codes

    @dataclass
    class Params:              # or a pydantic model, where the environment has pydantic
        lower: float = 300

    @plugin(name="bone", version="1.0", params=Params)
    def bone(series, params):
        mask = series.rescaled() > params.lower
        return [Segmentation(mask, [Segment("Bone", codes.SCT.Tissue, codes.SCT.Bone)])]

    bone(series, Params(lower=250))   # the decorated function is still the function (a unit test calls it)

Class form: subclass :class:`Plugin`, set ``name``, ``version`` and
``Params``, implement ``run(self, series, params)`` and, to load weights once
per worker process rather than once per job, ``setup(self)``.

A plugin that needs several series of a study (a contrast and a non-contrast CT, say) declares
``takes="study"`` and gets a :class:`StudyInput` (the named inputs of a study rule) instead::

    @plugin(name="enhancement", version="1.0", takes="study")
    def enhancement(study, params):
        pre, post = study["ct_plain"].rescaled(), study["ct_contrast"].rescaled()
        ...                                   # outputs are built on study.primary
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node_sdk import _info, geometry
from dicom_node_sdk import params as _params
from dicom_node_sdk._info import Returned
from dicom_node_sdk.errors import GeometryError, PluginError, ResultError
from dicom_node_sdk.params import NoParams, ParamsError
from dicom_node_sdk.results import (
    Images,
    Measurement,
    MeasurementGroup,
    Measurements,
    QualitativeFinding,
    Result,
    Segment,
    Segmentation,
    Volume,
)

if sys.version_info >= (3, 10):
    from typing import ParamSpec
else:  # Python 3.9 has no ParamSpec; only type checkers read it, and they run on a newer Python
    from typing import TypeVar as ParamSpec

__all__ = [
    "GPU_MODES",
    "Code",
    "GeometryError",
    "Images",
    "Measurement",
    "MeasurementGroup",
    "Measurements",
    "NoParams",
    "ParamsError",
    "Plugin",
    "PluginError",
    "PluginFunction",
    "QualitativeFinding",
    "Result",
    "ResultError",
    "Returned",
    "Segment",
    "Segmentation",
    "SeriesInput",
    "StudyInput",
    "Volume",
    "codes",
    "plugin",
]


# -- input -------------------------------------------------------------------


@dataclass
class SeriesInput:
    """A series as a plugin sees it: sorted metadata, lazily loaded pixels and geometry.

    Slices are sorted along the slice normal (row x column direction), so
    sagittal, coronal and tilted series come out in spatial order. A single
    multi-frame instance gives one slice per frame.
    """

    datasets: list[Dataset]
    files: list[Path] = field(default_factory=list)
    #: For multi-frame input: the frame index (0-based) of each slice in the source instance.
    frames: list[int] | None = None
    _loader: Callable[[], np.ndarray] | None = field(default=None, repr=False)
    #: Per-slice positions (x, y, z) in patient coordinates, when the series has them.
    positions: np.ndarray | None = None
    #: Row and column direction cosines.
    orientation: tuple[tuple[float, float, float], tuple[float, float, float]] | None = None
    #: (row spacing, column spacing) in mm, i.e. PixelSpacing.
    pixel_spacing: tuple[float, float] | None = None
    #: Results of the plugins that ran before this one in the same job (a chain), in order.
    previous: list[Result] = field(default_factory=list)
    #: Prior studies of the same patient (newest first) when the rule's action asks for them; else empty.
    priors: list[StudyInput] = field(default_factory=list)
    #: The study this series is an input of, when a study rule (``scope = "study"``) made the job.
    study: StudyInput | None = None

    @property
    def first(self) -> Dataset:
        return self.datasets[0]

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", ""))

    def __len__(self) -> int:
        return len(self.frames) if self.frames is not None else len(self.datasets)

    @cached_property
    def _voxels(self) -> np.ndarray:
        if self._loader is None:
            raise RuntimeError("this series has no pixel loader")
        return self._loader()

    def voxels(self) -> np.ndarray:
        """Stored values, shape (slices, rows, cols) or (slices, rows, cols, 3) for colour; read on first use."""
        return self._voxels

    def rescaled(self) -> np.ndarray:
        """Values after Rescale Slope/Intercept (Hounsfield units for CT), float32."""
        return self._rescaled

    @cached_property
    def _rescaled(self) -> np.ndarray:
        v = self.voxels().astype(np.float32)
        slopes, intercepts = self._rescale()
        if np.all(slopes == 1) and np.all(intercepts == 0):
            return v
        out: np.ndarray = v * slopes[:, None, None] + intercepts[:, None, None]
        return out

    def uniform_rescale(self) -> tuple[float | None, float]:
        """(slope, intercept) when every slice shares them, else (None, 0): lets a plugin work on stored values."""
        slopes, intercepts = self._rescale()
        if len(slopes) and np.all(slopes == slopes[0]) and np.all(intercepts == intercepts[0]):
            return float(slopes[0]), float(intercepts[0])
        return None, 0.0

    def _rescale(self) -> tuple[np.ndarray, np.ndarray]:
        n = len(self)
        if self.frames is not None:
            ds = self.first
            slope = float(ds.get("RescaleSlope", 1) or 1)
            intercept = float(ds.get("RescaleIntercept", 0) or 0)
            groups = ds.get("PerFrameFunctionalGroupsSequence")
            shared = ds.get("SharedFunctionalGroupsSequence")
            if shared and "PixelValueTransformationSequence" in shared[0]:
                t = shared[0].PixelValueTransformationSequence[0]
                slope, intercept = float(t.RescaleSlope), float(t.RescaleIntercept)
            slopes, intercepts = np.full(n, slope, np.float32), np.full(n, intercept, np.float32)
            if groups:
                for i, f in enumerate(self.frames):
                    g = groups[f]
                    if "PixelValueTransformationSequence" in g:
                        t = g.PixelValueTransformationSequence[0]
                        slopes[i], intercepts[i] = float(t.RescaleSlope), float(t.RescaleIntercept)
            return slopes, intercepts
        slopes = np.array([float(d.get("RescaleSlope", 1) or 1) for d in self.datasets], np.float32)
        intercepts = np.array([float(d.get("RescaleIntercept", 0) or 0) for d in self.datasets], np.float32)
        return slopes, intercepts

    @property
    def normal(self) -> np.ndarray | None:
        """The slice normal, row direction x column direction (None without Image Orientation)."""
        return None if self.orientation is None else geometry.normal(self.orientation)

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """(slice, row, column) spacing in mm; the slice spacing is the median distance between slices."""
        return geometry.spacing(self.positions, self.orientation, self.pixel_spacing)

    @property
    def affine(self) -> np.ndarray | None:
        """4x4 matrix from (slice, row, column) voxel indices to patient coordinates (mm)."""
        return geometry.affine(self.positions, self.orientation, self.pixel_spacing)

    @property
    def spacing_is_uniform(self) -> bool:
        """Whether the slices are evenly spaced (within 1%); without positions, True."""
        return geometry.spacing_is_uniform(self.positions, self.orientation)


@dataclass
class StudyInput:
    """A study as a ``takes="study"`` plugin sees it: its named series, the primary one, and its priors.

    A study rule that declares ``inputs`` names each series it needs (``study["ct_contrast"]``); one that
    declares none gets every series of the study, keyed ``series-<SeriesNumber>`` (the Series Instance
    UID where a series has no number or shares it). A prior study's inputs are keyed by Series Instance
    UID. Outputs are always built on :attr:`primary`: its geometry, frame of reference and patient.
    """

    inputs: dict[str, SeriesInput]
    study_uid: str = ""
    study_date: str = ""
    patient_id: str = ""
    #: Prior studies of the same patient, newest first (empty unless the action asks for priors).
    priors: list[StudyInput] = field(default_factory=list)
    #: The name of the input outputs are built on ("": the first input).
    primary_name: str = ""

    @property
    def primary(self) -> SeriesInput:
        """The input outputs are built on: the rule's ``primary`` input, else the first one."""
        if self.primary_name:
            return self[self.primary_name]
        if not self.inputs:
            raise KeyError("this study input has no series")
        return next(iter(self.inputs.values()))

    def __getitem__(self, name: str) -> SeriesInput:
        try:
            return self.inputs[name]
        except KeyError:
            known = ", ".join(self.inputs) or "none"
            raise KeyError(f"no input named {name!r} (inputs: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self.inputs

    def __iter__(self) -> Iterator[str]:
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)


# -- declaring plugins ---------------------------------------------------------

#: What a plugin says about GPUs: it never uses one, uses one when there is one, or cannot run without one.
GPU_MODES = ("none", "optional", "required")
#: What a plugin takes: one series (:class:`SeriesInput`), or a study's named series (:class:`StudyInput`).
_TAKES = ("series", "study")

_P = ParamSpec("_P")
_R = TypeVar("_R", bound=Returned)


class PluginFunction(_info.PluginInfo, Generic[_P, _R]):
    """A function declared with ``@plugin``: called, it is the function; the node reads the rest.

    ``bone(series, params)`` runs the function and returns what it returns (a unit test calls it so);
    ``bone.name``, ``bone.version``, ``bone.validate_params({...})`` and the other attributes say
    how the node runs it.
    """

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        return cast("Callable[_P, _R]", self.run)(*args, **kwargs)


def _beside(fn: Any, path: str | None) -> str | None:
    """A template path relative to the file that declared the plugin."""
    if path is None or Path(path).is_absolute():
        return path
    try:
        return str(Path(inspect.getfile(fn)).resolve().parent / path)
    except TypeError:
        return path


def _gpu(value: str, name: str) -> str:
    if value not in GPU_MODES:
        raise ValueError(f"plugin {name!r}: gpu must be one of {', '.join(GPU_MODES)} (got {value!r})")
    return value


def _takes(value: str, name: str) -> str:
    if value not in _TAKES:
        raise ValueError(f"plugin {name!r}: takes must be one of {', '.join(_TAKES)} (got {value!r})")
    return value


def plugin(
    name: str,
    version: str,
    *,
    params: type | None = NoParams,
    description: str = "",
    max_attempts: int | None = None,
    family: Code = codes.cid7162.ArtificialIntelligence,
    segment_template: str | None = None,
    gpu: str = "none",
    takes: str = "series",
) -> Callable[[Callable[_P, _R]], PluginFunction[_P, _R]]:
    """Declare a function as a plugin (see the module docstring).

    The function takes the series (``takes="study"``: the :class:`StudyInput`) and the validated
    parameters and returns one result, a list of them, or None. What the decorator returns is still
    callable as the function.
    """
    checked = _params.check_params_type(params, name)
    _gpu(gpu, name)
    _takes(takes, name)

    def wrap(fn: Callable[_P, _R]) -> PluginFunction[_P, _R]:
        declared: PluginFunction[_P, _R] = PluginFunction(
            name,
            version,
            cast("Callable[[SeriesInput, Any], Returned]", fn),
            checked,
            description or (fn.__doc__ or "").strip().split("\n")[0],
            max_attempts,
            family,
            _beside(fn, segment_template),
            gpu,
            takes=takes,
        )
        # What help(), inspect.signature() and a traceback show: the function's own name, doc and signature.
        for attr in ("__module__", "__name__", "__qualname__", "__doc__"):
            if hasattr(fn, attr):
                object.__setattr__(declared, attr, getattr(fn, attr))
        object.__setattr__(declared, "__wrapped__", fn)
        return declared

    return wrap


class Plugin:
    """Base class for plugins written as a class.

    ``setup(self)`` (optional) loads what every job needs (weights, a session): a warm worker makes one
    instance per process and calls it once, then ``run`` for each job; the node's own fork-per-job
    runner makes an instance per job and calls ``setup`` before ``run``. Import heavy libraries (torch)
    in ``setup``, not at module level: listing the plugins imports the module.
    """

    name: str = ""
    version: str = ""
    description: str = ""
    Params: type | None = NoParams
    max_attempts: int | None = None
    family: Code = codes.cid7162.ArtificialIntelligence
    segment_template: str | None = None
    gpu: str = "none"
    #: "series" (run gets a SeriesInput) or "study" (run gets a StudyInput: a study rule's inputs).
    takes: str = "series"

    def setup(self) -> None:
        """Load what every job needs; runs once per instance, before its first ``run``."""

    def run(self, series: SeriesInput, params: Any) -> Returned:
        raise NotImplementedError

    @classmethod
    def info(cls) -> _info.PluginInfo:
        """The plugin as the node knows it (what the node's loader makes of this class)."""

        def run(series: SeriesInput, params: Any) -> Returned:
            instance = cls()
            instance.setup()
            return instance.run(series, params)

        return _info.PluginInfo(
            cls.name,
            cls.version,
            run,
            _params.check_params_type(cls.Params, cls.name),
            cls.description or (cls.__doc__ or "").strip().split("\n")[0],
            cls.max_attempts,
            cls.family,
            _beside(cls, cls.segment_template),
            _gpu(cls.gpu, cls.name),
            takes=_takes(cls.takes, cls.name),
            plugin_class=cls,
            has_setup=getattr(cls, "setup", None) is not Plugin.setup,
        )
