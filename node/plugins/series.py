"""Loading a stored series for a plugin: sorted along the slice normal, checked, pixels read lazily.

Sorting is by each slice's position projected on the normal of its plane
(row x column direction), not by one coordinate or by Instance Number, so
sagittal, coronal, oblique and tilted-gantry series come out in spatial
order. A series that cannot form a volume (mixed orientations or sizes,
two slices at one position) fails with a message saying which instances.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, cast

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset

from node.plugins.api import GeometryError, SeriesInput, StudyInput, geometry

#: Makes the array the pixels are decoded into: (shape, dtype) -> array. np.empty by default; a memory-mapped
#: file when the voxels go to a worker in another environment (node.plugins.worker.share_voxels).
Allocate = Callable[[tuple[int, ...], Any], np.ndarray]

#: Positions closer than this (mm) along the normal are "the same position".
SAME_POSITION_MM = 1e-3


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """``n`` numbers of a multi-valued attribute (None when it is missing or not that)."""
    try:
        v = tuple(float(x) for x in cast("Iterable[Any]", value))
    except (TypeError, ValueError):
        return None
    return v if len(v) == n else None


def _pair(value: object) -> tuple[float, float] | None:
    """Pixel Spacing as (row spacing, column spacing)."""
    v = _floats(value, 2)
    return None if v is None else (v[0], v[1])


def _orientation(iop: tuple[float, ...]) -> geometry.Orientation:
    """Image Orientation (Patient)'s six cosines as the row and the column direction."""
    return (iop[0], iop[1], iop[2]), (iop[3], iop[4], iop[5])


def _frames(ds: Dataset) -> int:
    try:
        return max(1, int(ds.get("NumberOfFrames", 1) or 1))
    except (TypeError, ValueError):
        return 1


def load_series(files: list[Path]) -> SeriesInput:
    """A series from its files (any order); pixels are decoded only when the plugin asks."""
    if not files:
        raise GeometryError("the series has no instances")
    datasets = [dcmread(f, stop_before_pixels=True) for f in files]
    images = [(d, f) for d, f in zip(datasets, files, strict=True) if "Rows" in d]
    if not images:
        raise GeometryError("the series has no images (no instance has Rows/Columns)")
    if len(images) == 1 and _frames(images[0][0]) > 1:
        return _multiframe(*images[0])
    multi = [f.name for d, f in images if _frames(d) > 1]
    if multi:
        raise GeometryError(
            f"the series mixes {len(multi)} multi-frame instance(s) with others ({multi[0]}, ...); "
            "plugins take one multi-frame instance or single-frame images"
        )
    sizes = {(int(d.Rows), int(d.Columns), int(d.get("SamplesPerPixel", 1))) for d, _ in images}
    if len(sizes) > 1:
        raise GeometryError(
            f"the images differ in size ({', '.join(f'{r}x{c}' for r, c, _ in sorted(sizes))}); "
            "they do not form one volume"
        )
    found_iops = [_floats(d.get("ImageOrientationPatient"), 6) for d, _ in images]
    found_ipps = [_floats(d.get("ImagePositionPatient"), 3) for d, _ in images]
    iops = [v for v in found_iops if v is not None]
    ipps = [v for v in found_ipps if v is not None]
    orientation: geometry.Orientation | None = None
    positions: np.ndarray | None = None
    if len(iops) == len(ipps) == len(images):
        ref = np.array(iops[0])
        for (d, f), iop in zip(images, iops, strict=True):
            if not np.allclose(iop, ref, atol=1e-3):
                raise GeometryError(
                    f"{f.name} (instance {d.get('InstanceNumber')}) has another orientation "
                    f"than the first image: {iop} vs {tuple(ref)}"
                )
        orientation = _orientation(iops[0])
        dist = np.asarray(ipps, dtype=float) @ geometry.normal(orientation)
        order = np.argsort(dist, kind="stable")
        sd = dist[order]
        same = np.nonzero(np.diff(sd) < SAME_POSITION_MM)[0]
        if len(same):
            a, b = images[order[same[0]]], images[order[same[0] + 1]]
            raise GeometryError(
                f"duplicate positions: {a[1].name} (instance {a[0].get('InstanceNumber')}) and {b[1].name} "
                f"(instance {b[0].get('InstanceNumber')}) are both at {ipps[order[same[0]]]}; "
                f"{len(same)} slice(s) share a position, so the series is not one volume"
            )
        images = [images[i] for i in order]
        positions = np.array([ipps[i] for i in order])
    else:
        # 2-D images without patient geometry (e.g. some XA, US or SC): keep Instance Number order
        images.sort(key=lambda t: (int(t[0].get("InstanceNumber", 0) or 0), str(t[1])))
    spacing = _pair(images[0][0].get("PixelSpacing"))
    paths = [f for _, f in images]

    def load(allocate: Allocate = np.empty) -> np.ndarray:
        first = dcmread(paths[0])
        a0 = first.pixel_array
        out = allocate((len(paths), *a0.shape), a0.dtype)
        out[0] = a0
        del first
        for i, p in enumerate(paths[1:], 1):
            out[i] = dcmread(p).pixel_array
        return out

    return SeriesInput(
        datasets=[d for d, _ in images],
        files=paths,
        frames=None,
        _loader=load,
        positions=positions,
        orientation=orientation,
        pixel_spacing=spacing,
    )


def _multiframe(ds: Dataset, path: Path) -> SeriesInput:
    n = _frames(ds)
    shared = ds.get("SharedFunctionalGroupsSequence")
    per = ds.get("PerFrameFunctionalGroupsSequence")
    sh = shared[0] if shared else Dataset()

    def group(i: int, name: str) -> Dataset | None:
        item: Dataset
        if per is not None and i < len(per) and name in per[i]:
            item = per[i][name][0]
            return item
        if name in sh:
            item = sh[name][0]
            return item
        return None

    found_positions, found_iops = [], []
    for i in range(n):
        pos = group(i, "PlanePositionSequence")
        ori = group(i, "PlaneOrientationSequence")
        found_positions.append(_floats(pos.get("ImagePositionPatient") if pos else None, 3))
        found_iops.append(_floats(ori.get("ImageOrientationPatient") if ori else None, 6))
    positions = [v for v in found_positions if v is not None]
    iops = [v for v in found_iops if v is not None]
    measures = group(0, "PixelMeasuresSequence")
    spacing = _pair(measures.get("PixelSpacing") if measures else ds.get("PixelSpacing"))
    frames = list(range(n))
    pos_arr: np.ndarray | None = None
    orientation: geometry.Orientation | None = None
    if len(positions) == len(iops) == n:
        ref = np.array(iops[0])
        if not all(np.allclose(o, ref, atol=1e-3) for o in iops):
            raise GeometryError("the frames of the multi-frame instance have different orientations")
        orientation = _orientation(iops[0])
        dist = np.asarray(positions, dtype=float) @ geometry.normal(orientation)
        order = np.argsort(dist, kind="stable")
        if np.any(np.diff(dist[order]) < SAME_POSITION_MM):
            raise GeometryError(
                "duplicate positions: frames of the multi-frame instance share a position "
                "(several stacks or time points?), so it is not one volume"
            )
        frames = [int(i) for i in order]
        pos_arr = np.array([positions[i] for i in frames])

    def load(allocate: Allocate = np.empty) -> np.ndarray:
        arr = dcmread(path).pixel_array
        out = allocate((len(frames), *arr.shape[1:]), arr.dtype)
        np.take(arr, frames, axis=0, out=out)
        return out

    return SeriesInput(
        datasets=[ds],
        files=[path],
        frames=frames,
        _loader=load,
        positions=pos_arr,
        orientation=orientation,
        pixel_spacing=spacing,
    )


def load_priors(priors: list[dict[str, Any]]) -> list[StudyInput]:
    """The prior studies of a job (``WorkSpec.priors``, newest first) as StudyInputs keyed by Series Instance UID.

    Each series is loaded like the job's own (sorted, checked, pixels read only when a plugin asks). A
    prior series that cannot form a volume is left out with the reason in the log, not the job failed:
    the plugin still gets the current study and whatever priors loaded.
    """
    import logging

    log = logging.getLogger(__name__)
    out = []
    for p in priors:
        inputs: dict[str, SeriesInput] = {}
        for files in p.get("series", []):
            try:
                s = load_series([Path(f) for f in files])
            except (GeometryError, OSError, ValueError) as e:
                log.warning("prior study %s: a series (%d files) left out: %s", p.get("study_uid", ""), len(files), e)
                continue
            inputs[str(s.first.get("SeriesInstanceUID", "") or len(inputs))] = s
        first = next(iter(inputs.values()), None)
        out.append(
            StudyInput(
                inputs,
                study_uid=str(p.get("study_uid", "")),
                study_date=str(p.get("study_date", "")),
                patient_id=str(first.first.get("PatientID", "")) if first is not None else "",
            )
        )
    return out
