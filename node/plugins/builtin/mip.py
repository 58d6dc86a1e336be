"""``mip-sc``: maximum-intensity projections (axial, coronal, sagittal) as grey Secondary Capture key images.

1. **True geometry.** The voxels are first put on an orthogonal grid of the
   series' own frame (slice normal, column and row directions;
   ``node.plugins.geometry.orthogonal_volume``): a tilted gantry's slices,
   shifted in-plane against each other, are moved back to their true places
   (linear interpolation), and uneven slices are brought to even spacing (the
   median distance between them) by linear interpolation along the normal.
   Projections on the index grid would shear the anatomy (0.7 mm per slice on
   a 16.5 degree tilt) under a Pixel Spacing that claims otherwise. A regular
   series (unsheared, even slices) is used as it is. As in gantry-tilt
   correction elsewhere, the frame keeps the acquisition's tilt: the views of
   a tilted CT are perpendicular to its slices, and their Patient Orientation
   says so (e.g. ("L", "FP") for the coronal view of a 16.5 degree tilt).
2. **Window.** The rescaled values (HU for CT) map linearly to grey in
   [0, 255] as in ``overlay-sc``: ``clip((v - (center - width / 2)) / width,
   0, 1) * 255``. Without a given window: CT 300/1500 (a MIP shows the
   densest voxels: bone, contrast), otherwise the first image's Window
   Center/Width, otherwise the 0.5th to 99.5th percentile of the series.
   Windowing is monotonic, so projecting the windowed volume equals
   windowing the projection of the values.
3. **Views in patient terms.** Each volume axis (slices, rows, columns) is
   matched to the patient axis it is most parallel to (the assignment with
   the largest sum of |cosines|), so "coronal" means a projection along the
   patient's anterior-posterior axis whatever the acquisition plane: for an
   axial series it projects along the rows, for a sagittal one along the
   columns.
4. **Layout.** The projection along the slice axis (the axial MIP of an axial
   series) keeps the source's rows and columns (widened by the in-plane shift
   of a tilted series' slices), and so its Patient Orientation (("L", "P") for
   a head-first supine axial series). The other views are laid out as
   radiologists read them: axial with the patient's left to the right of the
   image and posterior down (("L", "P")), coronal left to the right and feet
   down (("L", "F")), sagittal posterior to the right and feet down
   (("P", "F")); an axis that points the other way is flipped. Patient
   Orientation is computed from the resulting directions (so an oblique
   series gets two-letter values such as "LP").
5. **Square pixels.** The picture is resampled (``scipy.ndimage.zoom``,
   linear) from its (vertical, horizontal) spacing to square pixels of the
   finer spacing, so coronal and sagittal views of thick slices are not
   squashed. ``max_size`` caps the longer side. The result is rounded to
   uint8, with its true Pixel Spacing.

Each view is its own result, so its own SC series with one image that
references the whole source series. A single slice (or a series without a
known spacing) has only its own plane: the views across the slices are left
out, and the job fails only if the rule asked for none of the views that
remain.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from scipy import ndimage

from node.plugins.api import Images, PluginError, SeriesInput, geometry, plugin
from node.plugins.builtin.body_parts import Values, values_of
from node.plugins.builtin.overlay import resolve_window, window
from node.plugins.geometry import orthogonal_volume, slice_frame

View = Literal["axial", "coronal", "sagittal"]
VIEWS: tuple[View, ...] = ("axial", "coronal", "sagittal")

#: Default windows (center, width) by modality.
DEFAULT_WINDOWS = {"CT": (300.0, 1500.0)}

#: Per view: the patient axis projected along (0 = x/left, 1 = y/posterior, 2 = z/head) and the directions
#: the image's columns (left to right) and rows (top to bottom) should point to.
LAYOUT: dict[str, tuple[int, tuple[float, float, float], tuple[float, float, float]]] = {
    "axial": (2, (1, 0, 0), (0, 1, 0)),  # L, P
    "coronal": (1, (1, 0, 0), (0, 0, -1)),  # L, F
    "sagittal": (0, (0, 1, 0), (0, 0, -1)),  # P, F
}


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")

    views: list[View] = Field(default_factory=lambda: list(VIEWS), min_length=1)
    #: Window (rescaled values, HU for CT); by default CT 300/1500, else the image's window or the value range.
    window_center: float | None = None
    window_width: float | None = Field(None, gt=0)
    #: Resample to square pixels (off: one pixel per voxel, as a viewer would stretch it).
    square_pixels: bool = True
    #: Longest side of a resampled picture, in pixels.
    max_size: int = Field(2048, ge=16, le=8192)

    @field_validator("views")
    @classmethod
    def _unique(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"views repeat: {v}")
        return v


def axis_directions(series: SeriesInput) -> np.ndarray:
    """Unit patient-space directions of the volume axes (slices, rows, columns), one per row."""
    if series.orientation is None:
        raise PluginError("mip-sc needs Image Orientation (Patient) to tell axial, coronal and sagittal apart")
    return geometry.axis_directions(series.orientation)


def true_grid(series: SeriesInput, values: Values) -> tuple[np.ndarray, tuple[float, float, float]]:
    """The voxels on an orthogonal grid of the series' own frame (step 1 of the module docstring), and its spacing."""
    nan = float("nan")
    if len(series) < 2 or series.positions is None or series.pixel_spacing is None:
        # one slice, or no geometry: only the projection along the slices is possible, on the index grid
        return values.array, series.spacing or (nan, nan, nan)
    frame = slice_frame(series, "mip-sc")
    volume, dz = orthogonal_volume(frame, values.array, fill=float(values.array.min()))
    return volume, (dz, *frame.pixel_spacing)


def through_plane_possible(grid: tuple[np.ndarray, tuple[float, float, float]]) -> bool:
    """Whether views across the slices can be drawn: several slices, a known spacing between them."""
    volume, spacing = grid
    return volume.shape[0] >= 2 and math.isfinite(spacing[0]) and spacing[0] > 0


def in_plane_view(series: SeriesInput) -> str:
    """The view that projects along the slices (axial for an axial series, sagittal for a sagittal one)."""
    along = geometry.patient_axes(axis_directions(series))[0]
    return next(v for v, (axis, *_rest) in LAYOUT.items() if axis == along)


def project(
    series: SeriesInput,
    values: Values,
    grid: tuple[np.ndarray, tuple[float, float, float]],
    window_: tuple[float, float],
    view: str,
    square: bool,
    max_size: int,
) -> tuple[np.ndarray, tuple[str, str], tuple[float, float] | None]:
    """The MIP for ``view`` in grey (windowed), laid out and resampled; its Patient Orientation and Pixel Spacing."""
    dirs = axis_directions(series)
    owner = geometry.patient_axes(dirs)
    along, want_h, want_v = LAYOUT[view]
    p = owner.index(along)
    volume, spacing = grid
    if p != 0 and not through_plane_possible(grid):
        raise PluginError(f"the {view} MIP projects across the slices, which needs several slices with a known spacing")
    # the rescale and the window are increasing: the projection of the windowed values is the windowed projection
    img = window(values.rescaled(volume.max(axis=p)), *window_)
    rest = [a for a in range(3) if a != p]  # the volume axes of img's rows and columns, in that order
    if p == 0:  # the source plane: keep its layout
        h_axis, v_axis, h_sign, v_sign = 2, 1, 1, 1
    else:
        # the remaining axis most parallel to the wanted column direction runs horizontally
        h_axis = max(rest, key=lambda a: abs(float(dirs[a] @ want_h)))
        v_axis = next(a for a in rest if a != h_axis)
        if rest.index(h_axis) == 0:  # img is (horizontal, vertical): make it (vertical, horizontal)
            img = img.T
        h_sign = 1 if dirs[h_axis] @ want_h >= 0 else -1
        v_sign = 1 if dirs[v_axis] @ want_v >= 0 else -1
        img = img[::v_sign, ::h_sign]
    orientation = geometry.patient_orientation([*(dirs[h_axis] * h_sign), *(dirs[v_axis] * v_sign)]) or ("L", "P")
    sv, sh = spacing[v_axis], spacing[h_axis]
    if square and math.isfinite(sv) and math.isfinite(sh) and not math.isclose(sv, sh, rel_tol=1e-3):
        target = min(sv, sh)
        longest = max(img.shape[0] * sv, img.shape[1] * sh)
        target = max(target, longest / max_size)
        before = img.shape
        img = ndimage.zoom(img, (sv / target, sh / target), order=1, mode="nearest", grid_mode=True)
        sv, sh = before[0] * sv / img.shape[0], before[1] * sh / img.shape[1]
    pixel_spacing = (float(sv), float(sh)) if math.isfinite(sv) and math.isfinite(sh) and sv > 0 and sh > 0 else None
    return np.rint(np.clip(img, 0, 255)).astype(np.uint8), orientation, pixel_spacing


@plugin(name="mip-sc", version="1.0", params=Params)
def mip_sc(series: SeriesInput, params: Params) -> list[Images]:
    """Maximum-intensity projections of the windowed volume (axial, coronal, sagittal) as key images."""
    values = values_of(series)
    if values.array.ndim != 3:
        raise PluginError("mip-sc takes grey images (one sample per pixel)")
    center_width = resolve_window(series, values, params.window_center, params.window_width, DEFAULT_WINDOWS)
    grid = true_grid(series, values)
    views = list(params.views)
    if not through_plane_possible(grid):
        # One slice (or no spacing): only its own plane can be drawn; the other views are left out, not failed.
        own = in_plane_view(series)
        if own not in views:
            raise PluginError(
                f"the series has a single slice (or no known spacing), so only the {own} view can "
                f"be drawn, and views = {views} does not ask for it"
            )
        views = [own]
    out = []
    for view in views:
        img, orientation, spacing = project(
            series, values, grid, center_width, view, params.square_pixels, params.max_size
        )
        out.append(
            Images(
                img[None],
                source_slices=None,
                description=f"MIP {view}",
                patient_orientation=orientation,
                pixel_spacing=spacing,
            )
        )
    return out
