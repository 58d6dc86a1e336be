"""The model's fixed weights, in plain numpy: one definition for the ONNX graph and the reference.

The model is a per-voxel Gaussian classifier of CT values. It smooths each slice with a 3x3 binomial
kernel (slices are not mixed, so any slice thickness works), then scores four classes by their
log-likelihood under a normal distribution of Hounsfield units and takes the best:

====  ===========  =========  =======  ==========================================
label class        mean (HU)  sd (HU)  on a smoothed value, wins between
====  ===========  =========  =======  ==========================================
0     air          -1000      200      -1024 and -295 HU (background, no segment)
1     fat          -100       50       -295 and -25 HU
2     soft tissue  40         40       -25 and 167 HU
3     bone         1000       350      above 167 HU
====  ===========  =========  =======  ==========================================

Scores are quadratic in the smoothed value x (in units of 1000 HU, which keeps float32 sums well
conditioned): ``score_c(x) = a_c x^2 + b_c x + c_c``, so the graph computes them as a 1x1
convolution of ``[x, x^2]``. Values are clipped to [-1024, 3071] HU first: a scanner's padding
value outside the field of view (-2048, -3024) is air, not the widest class.
"""

from __future__ import annotations

import numpy as np

#: (label, class name, mean HU, standard deviation HU); the label is the index.
CLASSES: tuple[tuple[int, str, float, float], ...] = (
    (0, "air", -1000.0, 200.0),
    (1, "fat", -100.0, 50.0),
    (2, "soft tissue", 40.0, 40.0),
    (3, "bone", 1000.0, 350.0),
)

#: CT values are clipped to this range before smoothing (12-bit CT, as stored by most scanners).
HU_MIN, HU_MAX = -1024.0, 3071.0

#: Units of the smoothed value: 1000 HU.
SCALE = 1e-3

#: The in-plane smoothing kernel (binomial 3x3, sums to 1), applied with edge padding.
KERNEL = np.outer([1.0, 2.0, 1.0], [1.0, 2.0, 1.0]) / 16.0


def score_weights() -> tuple[np.ndarray, np.ndarray]:
    """``(w, b)``: per class, ``score = w[c, 0] * x + w[c, 1] * x**2 + b[c]`` (x in units of 1000 HU).

    The log-likelihood of a normal distribution, ``-(x - m)^2 / (2 s^2) - ln s``, expanded.
    """
    m = np.array([c[2] for c in CLASSES]) * SCALE
    s = np.array([c[3] for c in CLASSES]) * SCALE
    w = np.stack([m / s**2, -1.0 / (2 * s**2)], axis=1)
    b = -(m**2) / (2 * s**2) - np.log(s)
    return w, b
