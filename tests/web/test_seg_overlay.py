"""The SEG overlay of the series page (node.web.preview.seg_overlay_png) on highdicom's real SEG test objects
and the 4-slice CT they segment, and on a label map SEG made from them."""

from __future__ import annotations

import io
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image

from node.web.preview import NoPreview, seg_overlay_png


@pytest.fixture(scope="module")
def sources(shared_data: Path) -> dict[str, Path]:
    """The CT slices by SOP Instance UID (as the index finds a stored instance)."""
    folder = shared_data / "seg" / "ct2-source"
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID): p for p in sorted(folder.iterdir())}


def _rgb(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _coloured(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 0] != rgb[..., 1]) | (rgb[..., 1] != rgb[..., 2])


def _fullest(seg: pydicom.Dataset) -> tuple[str, np.ndarray]:
    """The source slice with the most segmented pixels, and which pixels any segment covers on it."""
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)
    masks: dict[str, np.ndarray] = {}
    for item, frame in zip(seg.PerFrameFunctionalGroupsSequence, frames, strict=True):
        uid = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        masks[uid] = masks.get(uid, np.zeros(frame.shape, bool)) | (frame > 0)
    uid = max(masks, key=lambda u: int(masks[u].sum()))
    return uid, masks[uid]


@pytest.mark.parametrize(
    "name", ["seg_image_ct_binary", "seg_image_ct_binary_overlap", "seg_image_ct_binary_fractional"]
)
def test_exactly_the_segmented_pixels_of_the_fullest_slice_are_coloured(name, shared_data, sources):
    path = shared_data / "seg" / f"{name}.dcm"
    uid, mask = _fullest(pydicom.dcmread(path))
    rgb = _rgb(seg_overlay_png(path, sources.__getitem__))
    assert rgb.shape[:2] == mask.shape
    assert mask.any() and (_coloured(rgb) == mask).all()
    # Outside the segments the slice is the CT itself, windowed as its plain preview.
    from node.web.preview import render_png

    plain = _rgb(render_png(sources[uid]))
    assert (rgb[~mask] == plain[~mask]).all()


def test_each_segment_in_its_recommended_colour_on_a_label_map(tmp_path, sources):
    """A LABELMAP SEG (one frame per slice, values = segment numbers) with two coloured segments."""
    images = [pydicom.dcmread(p) for p in sources.values()]
    images.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
    labels = np.zeros((len(images), images[0].Rows, images[0].Columns), np.uint8)
    labels[1, 2:6, 2:6] = 1
    labels[1, 8:12, 8:14] = 2
    labels[2, 3:5, 3:5] = 1
    red, blue = hd.color.CIELabColor.from_rgb(255, 0, 0), hd.color.CIELabColor.from_rgb(0, 0, 255)
    algorithm = hd.AlgorithmIdentificationSequence("test", hd.sr.CodedConcept("123", "99TEST", "test"), "1")
    segments = [
        hd.seg.SegmentDescription(
            n,
            label,
            hd.sr.CodedConcept("91723000", "SCT", "Anatomical structure"),
            hd.sr.CodedConcept("123037004", "SCT", "Anatomical structure"),
            hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm,
            display_color=colour,
        )
        for n, label, colour in ((1, "first", red), (2, "second", blue))
    ]
    seg = hd.seg.Segmentation(
        images,
        labels,
        hd.seg.SegmentationTypeValues.LABELMAP,
        segments,
        hd.UID(),
        1,
        hd.UID(),
        1,
        "dicom-node",
        "test",
        "1",
        "1",
    )
    path = tmp_path / "labelmap.dcm"
    seg.save_as(path)
    rgb = _rgb(seg_overlay_png(path, sources.__getitem__))
    assert (_coloured(rgb) == (labels[1] > 0)).all()  # slice 1 holds the most
    grey = _rgb(seg_overlay_png(path, sources.__getitem__, str(images[1].SOPInstanceUID)))
    assert (grey == rgb).all()  # the same slice, asked by name
    # Half the segment's colour over the CT: red keeps red above green and blue; blue, blue above the others.
    r, g, b = rgb[3, 3]
    assert r > g and r > b and g == b
    r, g, b = rgb[9, 9]
    assert b > r and b > g and r == g
    # Another slice, by its SOP Instance UID: only its one segment.
    other = _rgb(seg_overlay_png(path, sources.__getitem__, str(images[2].SOPInstanceUID)))
    assert (_coloured(other) == (labels[2] > 0)).all()


def test_what_cannot_be_drawn_says_why(shared_data, sources):
    single = shared_data / "seg" / "seg_image_ct_binary_single_frame.dcm"
    with pytest.raises(NoPreview, match="source slice is not stored here"):
        seg_overlay_png(single, sources.__getitem__)
    binary = shared_data / "seg" / "seg_image_ct_binary.dcm"
    with pytest.raises(NoPreview, match="has no frame of source instance 1.2.3"):
        seg_overlay_png(binary, sources.__getitem__, "1.2.3")
    ct = next(iter(sources.values()))
    with pytest.raises(NoPreview, match="cannot read the segmentation"):
        seg_overlay_png(ct, sources.__getitem__)
