"""What a plugin gets: pixels decoded from every transfer syntax the node stores, in spatial order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from helpers import SHARED, make_ct_series

from node.plugins.api import GeometryError
from node.plugins.series import load_series

ONE_SLICE = SHARED / "transfer-syntaxes" / "one-mr-slice"


@pytest.mark.parametrize("name", [f"{i}.dcm" for i in range(2, 10)])
def test_every_lossless_syntax_loads_the_same_pixels(name):
    """Implicit/big endian, RLE, JPEG lossless, JPEG-LS and JPEG 2000 all give the reference voxels."""
    ref = load_series([ONE_SLICE / "1.dcm"]).voxels()
    series = load_series([ONE_SLICE / name])
    assert pydicom.dcmread(ONE_SLICE / name, stop_before_pixels=True).file_meta.TransferSyntaxUID != (
        pydicom.dcmread(ONE_SLICE / "1.dcm", stop_before_pixels=True).file_meta.TransferSyntaxUID
    )
    np.testing.assert_array_equal(series.voxels(), ref)


def test_slices_sorted_along_the_normal_not_by_file_or_instance_number(tmp_path: Path):
    files = make_ct_series(tmp_path, 6)
    # Shuffle Instance Numbers so that neither file order nor Instance Number gives the spatial order.
    for f, n in zip(files, [4, 1, 6, 2, 5, 3], strict=True):
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = n
        ds.save_as(f)
    series = load_series(list(reversed(files)))
    z = [float(d.ImagePositionPatient[2]) for d in series.datasets]
    assert z == sorted(z)
    np.testing.assert_array_equal(series.voxels()[0], pydicom.dcmread(files[0]).pixel_array)
    assert series.spacing == pytest.approx((2.5, 0.5, 0.5))
    a = series.affine
    assert a is not None and np.allclose(a @ [5, 0, 0, 1], [*series.positions[5], 1])


def test_a_series_that_is_not_one_volume_says_why(tmp_path: Path):
    files = make_ct_series(tmp_path, 3)
    ds = pydicom.dcmread(files[2])
    ds.ImagePositionPatient = pydicom.dcmread(files[0]).ImagePositionPatient
    ds.save_as(files[2])
    with pytest.raises(GeometryError, match="duplicate positions: .*0001.dcm.* and .*0003.dcm|0003.dcm.* and .*0001"):
        load_series(files)
