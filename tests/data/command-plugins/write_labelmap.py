"""A command plugin for the tests: reads the DICOM files in INPUT, writes a label map into OUTPUT.

Runs with any python3 that has numpy and pydicom (2.x or 3.x): the node's, or Debian's in the
test container image. Labels: 1 where a pixel is above its slice's mean, 2 in the first
(slice index + 2) rows; so a wrong slice order or axis order shows. It prints one JSON line
about what it saw (environment, input files and their modes) for the test to check.

usage: write_labelmap.py INPUT OUTPUT [--metainfo FILE] [--nifti ORNT|canonical|shifted] [--empty]
"""

import argparse
import json
import os
import shutil
import stat
import sys
from pathlib import Path

import numpy as np
import pydicom


def labels(files):
    out = []
    for k, f in enumerate(files):
        px = pydicom.dcmread(str(f)).pixel_array.astype(np.float64)
        lab = (px > px.mean()).astype(np.uint8)
        lab[: k + 2] = 2
        out.append(lab)
    return np.stack(out)


def lps_affine(files):
    """(slice, row, column) index -> LPS mm, from the headers (as a DICOM-to-NIfTI converter computes it)."""
    first, last = pydicom.dcmread(str(files[0])), pydicom.dcmread(str(files[-1]))
    iop = np.array([float(v) for v in first.ImageOrientationPatient])
    dr, dc = (float(v) for v in first.PixelSpacing)
    p0 = np.array([float(v) for v in first.ImagePositionPatient])
    p1 = np.array([float(v) for v in last.ImagePositionPatient])
    a = np.eye(4)
    a[:3, 2], a[:3, 1] = iop[:3] * dc, iop[3:] * dr
    a[:3, 0] = (p1 - p0) / max(1, len(files) - 1)
    a[:3, 3] = p0
    return a


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("input")
    ap.add_argument("output")
    ap.add_argument("--metainfo")
    ap.add_argument("--nifti")
    ap.add_argument("--empty", action="store_true")
    args = ap.parse_args()
    inp, out = Path(args.input), Path(args.output)
    files = sorted(p for p in inp.iterdir() if p.name.endswith(".dcm"))
    print(
        json.dumps(
            {
                "input": [p.name for p in sorted(inp.iterdir())],
                "modes": sorted({oct(stat.S_IMODE(p.stat().st_mode)) for p in inp.iterdir()}),
                "writable": os.access(files[0], os.W_OK),
                "env": {
                    k: v
                    for k, v in os.environ.items()
                    if k.startswith(("MERCURE_", "MONAI_", "HOLOSCAN_", "CUDA_", "EXTRA_"))
                },
                "task": json.loads((inp / "task.json").read_text()),
            }
        )
    )
    sys.stdout.flush()
    lab = labels(files)
    if args.empty:
        lab[:] = 0
    if args.metainfo:
        shutil.copyfile(args.metainfo, out / "metainfo.json")
    if not args.nifti:
        np.save(out / "labels.npy", lab)
        return
    import nibabel as nib

    ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps_affine(files)
    if args.nifti == "shifted":
        ras[:3, 3] += ras[:3, 0]  # one slice off: not the input grid
    img = nib.Nifti1Image(lab, ras)
    if args.nifti == "canonical":
        img = nib.as_closest_canonical(img)
    elif args.nifti != "shifted":
        ornt = np.array([[float(x) for x in axis.split(",")] for axis in args.nifti.split(";")])
        img = img.as_reoriented(ornt)
    nib.save(img, str(out / "labels.nii.gz"))


if __name__ == "__main__":
    main()
