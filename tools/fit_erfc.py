"""Fits the polynomial behind the f32 erf in src/cpu/gelu.rs.

For 1 <= x <= 4, erfc(x) = exp(-x^2) * R(x) with R smooth; R is fitted as a degree-9 polynomial in t = 1/x by
weighted least squares (relative error) at Chebyshev nodes, against mpmath at 30 digits. Prints the
coefficients (lowest degree first) and the worst relative error of R, evaluated in float32 by Horner's rule.
"""

import mpmath as mp
import numpy as np

mp.mp.dps = 30
DEGREE = 9


def r_exact(x):
    return float(mp.erfc(x) * mp.exp(x * x))


nodes = 2.5 + 1.5 * np.cos(np.pi * (np.arange(600) + 0.5) / 600)
values = np.array([r_exact(x) for x in nodes])
design = np.vander(1.0 / nodes, DEGREE + 1, increasing=True)
coef, *_ = np.linalg.lstsq(design / values[:, None], np.ones_like(values), rcond=None)

test = np.linspace(1.0, 4.0, 20001)
exact = np.array([r_exact(x) for x in test])
t32 = (np.float32(1.0) / test.astype(np.float32)).astype(np.float32)
acc = np.full_like(t32, np.float32(coef[-1]))
for c in coef[-2::-1]:
    acc = (acc * t32 + np.float32(c)).astype(np.float32)
print("coefficients:", ", ".join(repr(float(c)) for c in coef))
print("max relative error of R in f32:", float(np.max(np.abs(acc / exact - 1))))
