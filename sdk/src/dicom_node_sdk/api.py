"""The plugin contract: what a plugin gets, what it returns, and how it declares itself.

A plugin is a function or a class that takes a :class:`SeriesInput` and its
validated parameters and returns results: :class:`Segmentation` (masks and
what they show), :class:`Images` (pictures for Secondary Capture) or
:class:`Volume` (a derived image series or parametric map). It never builds
DICOM, makes UIDs or copies patient data: the node does that, so every output
references its sources correctly and identifies the algorithm.

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

Class form: subclass :class:`Plugin`, set ``name``, ``version`` and
``Params``, implement ``run(self, series, params)`` and, to load weights once
per worker process rather than once per job, ``setup(self)``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicom_node_sdk import params as _params
from dicom_node_sdk.params import NoParams, ParamsError

__all__ = [
    "GPU_MODES",
    "Code",
    "GeometryError",
    "Images",
    "NoParams",
    "ParamsError",
    "Plugin",
    "PluginError",
    "PluginInfo",
    "Result",
    "Segment",
    "Segmentation",
    "SeriesInput",
    "Volume",
    "as_info",
    "codes",
    "plugin",
]


class PluginError(Exception):
    """Raised by a plugin for a failure it understands; ``retryable`` if another attempt may succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


# -- outputs -----------------------------------------------------------------


@dataclass
class Segment:
    """What one segment shows, as coded concepts (e.g. SNOMED CT from ``pydicom.sr.codedict.codes``)."""

    label: str
    category: Code
    type: Code
    #: Display colour, RGB 0-255; the node picks one when not given.
    color: tuple[int, int, int] | None = None
    anatomic_region: Code | None = None
    #: E.g. left/right (SNOMED CT); goes with ``type``.
    type_modifier: Code | None = None
    #: E.g. left/right; goes with ``anatomic_region``.
    anatomic_region_modifier: Code | None = None
    #: Segment Description, free text (optional).
    description: str = ""
    #: "AUTOMATIC" (the default: a plugin made it) or "SEMIAUTOMATIC" (e.g. a model refined by hand).
    algorithm_type: str = "AUTOMATIC"


@dataclass
class Segmentation:
    """Masks over the input slices.

    ``masks`` is either a label map of shape (slices, rows, cols) with 0 for
    background and segment numbers 1..n, or stacked masks of shape
    (slices, rows, cols, n): booleans, or floats in [0, 1] for a FRACTIONAL
    result (probabilities). Slices are in the order of ``series.datasets``.
    """

    masks: np.ndarray
    segments: Sequence[Segment]
    #: How the node should encode it; "binary" suits most viewers.
    kind: Literal["binary", "labelmap", "fractional"] = "binary"
    description: str = ""


@dataclass
class Images:
    """Pictures for Secondary Capture: (n, rows, cols) grey (uint8/uint16) or (n, rows, cols, 3) RGB uint8."""

    pixels: np.ndarray
    #: For each image, the index of the input slice it shows (None: a derived view such as a projection).
    source_slices: Sequence[int | None] | None = None
    description: str = ""
    #: For derived views: the patient directions of the rows and columns (DICOM Patient Orientation,
    #: e.g. ("L", "F") for a coronal projection). Images of a source slice take the slice's.
    patient_orientation: tuple[str, str] | None = None
    #: For derived views: (row spacing, column spacing) in mm. Images of a source slice at its size
    #: take the slice's Pixel Spacing; other images have none unless given here.
    pixel_spacing: tuple[float, float] | None = None


@dataclass
class Volume:
    """A volume of numbers on the input's grid: (slices, rows, cols), slices in the order of ``series.datasets``.

    Returned as a derived image series of the source's kind (CT stays CT Image, MR stays MR
    Image): a denoised or subtracted series, a probability map, anything that should stack,
    scroll and measure like the original. Integer values that fit 16 bits are stored exactly;
    anything else is stored in 16 bits with a Rescale Slope/Intercept, and the node reports the
    largest error that costs (``precision`` makes a larger one an error).
    """

    values: np.ndarray
    #: What it is, e.g. "denoised" (the Series Description unless the rule sets one).
    name: str = ""
    #: Largest acceptable error of a stored value (same units as ``values``); None: whatever 16 bits give.
    precision: float | None = None
    #: How it was derived, for Derivation Description (default: the plugin's name and version).
    description: str = ""
    #: "image": a derived image series of the source's kind; "parametric-map": one Parametric Map
    #: instance with float values and their units (a probability, a distance, a perfusion map).
    kind: Literal["image", "parametric-map"] = "image"
    #: The values' units as a UCUM code, e.g. ``Code("mm", "UCUM", "millimeter")``; for a parametric
    #: map (default: ``1``, no units).
    units: Code | None = None
    #: A grid of its own (resampled, registered): 4x4 from (slice, row, column) indices to the source's
    #: patient coordinates in mm, as ``SeriesInput.affine``. None: the input's grid.
    affine: np.ndarray | None = None


Result = Union[Segmentation, Images, Volume]


# -- input -------------------------------------------------------------------


class GeometryError(ValueError):
    """The series cannot form a volume (reason in the message)."""


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
        return v * slopes[:, None, None] + intercepts[:, None, None]

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
        if self.orientation is None:
            return None
        return np.cross(np.array(self.orientation[0]), np.array(self.orientation[1]))

    @property
    def spacing(self) -> tuple[float, float, float] | None:
        """(slice, row, column) spacing in mm; the slice spacing is the median distance between slices."""
        if self.pixel_spacing is None:
            return None
        dz = float("nan")
        if self.positions is not None and len(self.positions) > 1 and self.normal is not None:
            d = np.diff(self.positions @ self.normal)
            dz = float(np.median(np.abs(d)))
        return (dz, self.pixel_spacing[0], self.pixel_spacing[1])

    @property
    def affine(self) -> np.ndarray | None:
        """4x4 matrix from (slice, row, column) voxel indices to patient coordinates (mm)."""
        if self.orientation is None or self.pixel_spacing is None or self.positions is None:
            return None
        row_dir, col_dir = np.array(self.orientation[0]), np.array(self.orientation[1])
        dr, dc = self.pixel_spacing
        a = np.eye(4)
        # index (k, i, j): column index j moves along the row direction, row index i along the column direction
        a[:3, 2] = row_dir * dc
        a[:3, 1] = col_dir * dr
        if len(self.positions) > 1:
            a[:3, 0] = (self.positions[-1] - self.positions[0]) / (len(self.positions) - 1)
        else:
            a[:3, 0] = self.normal if self.normal is not None else (0, 0, 1)
        a[:3, 3] = self.positions[0]
        return a

    @property
    def spacing_is_uniform(self) -> bool:
        if self.positions is None or len(self.positions) < 3 or self.normal is None:
            return True
        d = np.diff(self.positions @ self.normal)
        return bool(np.allclose(d, d[0], rtol=0.01, atol=0.01))


# -- declaring plugins ---------------------------------------------------------

#: What a plugin says about GPUs: it never uses one, uses one when there is one, or cannot run without one.
GPU_MODES = ("none", "optional", "required")

Runner = Callable[[SeriesInput, Any], Sequence[Result]]


@dataclass(frozen=True)
class PluginInfo:
    """A plugin as the node knows it."""

    name: str
    version: str
    #: Runs one job. For a class plugin: a new instance per call, set up first (the fork-per-job path);
    #: a long-lived worker calls :meth:`prepare` instead, once.
    run: Runner
    #: A dataclass, a pydantic model or NoParams (see dicom_node_sdk.params).
    params: type = NoParams
    description: str = ""
    #: The plugin's retry policy: at most this many attempts for failures it marks retryable
    #: (PluginError(retryable=True)); None leaves it to the rule's max_attempts.
    max_attempts: int | None = None
    #: Algorithm Family (CID 7162), e.g. codes.cid7162.ArtificialIntelligence or
    #: codes.cid7162.MorphologicalOperations for classical image processing.
    family: Code = codes.cid7162.ArtificialIntelligence
    #: The plugin's own dcmqi metainfo.json for its segments (absolute, or relative to the module that
    #: declared it); a rule's ``segment_template`` takes precedence.
    segment_template: str | None = None
    #: "none", "optional" (uses a GPU when given one) or "required" (waits for one).
    gpu: str = "none"
    #: The class of a class plugin (None for a function): a worker makes one instance of it per process.
    plugin_class: type[Plugin] | None = field(default=None, repr=False, compare=False)

    @property
    def has_setup(self) -> bool:
        """Whether the plugin is a class with its own ``setup`` (weights to load once per worker)."""
        return self.plugin_class is not None and _defines_setup(self.plugin_class)

    def prepare(self) -> Runner:
        """The run function of a long-lived process: for a class plugin, one instance, set up now."""
        if self.plugin_class is None:
            return self.run
        instance = self.plugin_class()
        instance.setup()
        return instance.run

    def validate_params(self, params: dict[str, Any] | None) -> Any:
        """A rule's ``params`` as the plugin's parameter object; raises ParamsError listing every problem."""
        return _params.validate(self.params, params)

    def schema(self) -> dict[str, Any]:
        """The parameters' JSON schema."""
        return _params.schema(self.params)

    def dump_params(self, params: Any) -> dict[str, Any]:
        """Validated parameters as JSON values, defaults included (what an output records it ran with)."""
        return _params.dump(self.params, params)


def _beside(fn: Any, path: str | None) -> str | None:
    """A template path relative to the file that declared the plugin."""
    if path is None or Path(path).is_absolute():
        return path
    import inspect

    try:
        return str(Path(inspect.getfile(fn)).resolve().parent / path)
    except TypeError:
        return path


def _gpu(value: str, name: str) -> str:
    if value not in GPU_MODES:
        raise ValueError(f"plugin {name!r}: gpu must be one of {', '.join(GPU_MODES)} (got {value!r})")
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
) -> Callable[[Runner], PluginInfo]:
    """Declare a function as a plugin (see the module docstring)."""
    params = _params.check_params_type(params, name)
    _gpu(gpu, name)

    def wrap(fn: Runner) -> PluginInfo:
        return PluginInfo(
            name,
            version,
            fn,
            params,
            description or (fn.__doc__ or "").strip().split("\n")[0],
            max_attempts,
            family,
            _beside(fn, segment_template),
            gpu,
        )

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

    def setup(self) -> None:
        """Load what every job needs; runs once per instance, before its first ``run``."""

    def run(self, series: SeriesInput, params: Any) -> Sequence[Result]:
        raise NotImplementedError

    @classmethod
    def info(cls) -> PluginInfo:
        def run(series: SeriesInput, params: Any) -> Sequence[Result]:
            instance = cls()
            instance.setup()
            return instance.run(series, params)

        return PluginInfo(
            cls.name,
            cls.version,
            run,
            _params.check_params_type(cls.Params, cls.name),
            cls.description or (cls.__doc__ or "").strip().split("\n")[0],
            cls.max_attempts,
            cls.family,
            _beside(cls, cls.segment_template),
            _gpu(cls.gpu, cls.name),
            plugin_class=cls,
        )


def _defines_setup(cls: type) -> bool:
    return getattr(cls, "setup", None) is not Plugin.setup


def as_results(name: str, out: Any) -> list[Result]:
    """What a plugin's run returned as a list of results (None: none; one result: a list of it).

    Raises PluginError naming the plugin for anything that is not a Segmentation, Images or Volume.
    """
    if out is None:
        return []
    items = list(out) if isinstance(out, (list, tuple)) else [out]
    for r in items:
        if not isinstance(r, (Segmentation, Images, Volume)):
            raise PluginError(
                f"plugin {name} returned a {type(r).__name__}; results are Segmentation, Images or Volume"
            )
    return items


def as_info(obj: Any, name: str) -> PluginInfo:
    """Whatever an entry point or config names, as a PluginInfo (or a TypeError saying what it should be)."""
    if isinstance(obj, PluginInfo):
        return obj
    if isinstance(obj, type) and issubclass(obj, Plugin):
        return obj.info()
    raise TypeError(
        f"plugin {name!r} is a {type(obj).__name__}; decorate a function with @plugin(...) or "
        "subclass dicom_node_sdk.Plugin (node.plugins.api.Plugin)"
    )
