"""The variable-projection solver behind the law's fit (docs/method.md §5).

For fixed exponents (alpha, beta) the law delta_l = C x^alpha l^-beta + b is linear in (C, b), which a
closed-form least-squares solve gives exactly, so only the two exponents are searched: first on a grid, then by
scipy.optimize.least_squares (bounded, trust-region) from the grid's best local minima.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
from scipy.optimize import least_squares

from memcli.commands.law.points import Point

ALPHA_BOUNDS = (0.0, 3.0)
BETA_BOUNDS = (-1.0, 3.0)
_GRID_ALPHA = np.linspace(*ALPHA_BOUNDS, 31)
_GRID_BETA = np.linspace(*BETA_BOUNDS, 41)

# Local refinement starts besides the grid's minima: the paper's exponents and two far from them.
FIXED_STARTS = ((0.6, 0.5), (0.2, 0.1), (1.5, 1.5))


class _Projection:
    """Variable projection: for fixed exponents, the best (C >= 0, b) in closed form.

    With the basis f = x^alpha l^-beta, the least-squares line y ~ C f + b has C = cov(f, y) / var(f) and
    b = mean(y) - C mean(f), so the residual is y_c - C f_c (the _c arrays centred). Capacities and lengths are
    divided by their geometric means so the basis stays near 1 whatever the units (ranks or millions of
    parameters); C is converted back to the original units at the end.
    """

    def __init__(self, x: np.ndarray, length: np.ndarray, y: np.ndarray):
        self.x_ref = float(np.exp(np.mean(np.log(x))))
        self.l_ref = float(np.exp(np.mean(np.log(length))))
        self.log_x = np.log(x / self.x_ref)
        self.log_l = np.log(length / self.l_ref)
        self.y = y
        self.y_centred = y - y.mean()

    def _basis(self, exponents):
        f = np.exp(exponents[0] * self.log_x - exponents[1] * self.log_l)
        f_centred = f - f.mean()
        variance = f_centred @ f_centred
        # A negative slope is clipped: the best C >= 0 then lies on the boundary C = 0, b = mean(y).
        C = max(float(f_centred @ self.y_centred) / variance, 0.0) if variance > 0 else 0.0
        return f, f_centred, variance, C

    def residuals(self, exponents: np.ndarray) -> np.ndarray:
        _, f_centred, _, C = self._basis(exponents)
        return self.y_centred - C * f_centred

    def jacobian(self, exponents: np.ndarray) -> np.ndarray:
        """Exact derivative of the projected residuals with respect to (alpha, beta)."""
        f, f_centred, variance, C = self._basis(exponents)
        J = np.zeros((self.y.size, 2))
        if C <= 0:
            return J
        for k, dlog in enumerate((self.log_x, -self.log_l)):
            g = f * dlog
            g_centred = g - g.mean()
            dC = (g_centred @ self.y_centred - 2 * C * (g_centred @ f_centred)) / variance
            J[:, k] = -(dC * f_centred + C * g_centred)
        return J

    def grid_sse(self, alpha: np.ndarray, beta: np.ndarray) -> np.ndarray:
        """Projected sum of squared residuals on the grid alpha x beta (1-D arrays), vectorised.

        The projected SSE is sum(y_c^2) - max(f.y_c, 0)^2 / var(f), and since the basis factorises,
        f_i = exp(a log x_i) exp(-b log l_i), every sum over points is a small matrix product.
        """
        ea = np.exp(np.outer(alpha, self.log_x))
        el = np.exp(-np.outer(beta, self.log_l))
        sum_f = ea @ el.T
        sum_f2 = (ea**2) @ (el**2).T
        covariance = (ea * self.y_centred) @ el.T
        variance = sum_f2 - sum_f**2 / self.y.size
        explained = np.divide(np.maximum(covariance, 0) ** 2, variance, out=np.zeros_like(variance),
                              where=variance > 1e-12 * sum_f2)
        return self.y_centred @ self.y_centred - explained

    def coefficients(self, alpha: float, beta: float) -> tuple[float, float, float, float]:
        f, _, _, C = self._basis((alpha, beta))
        b = float(self.y.mean() - C * f.mean())
        C_units = C * self.x_ref ** (-alpha) * self.l_ref**beta
        return float(C_units), float(alpha), float(beta), b


def _grid_starts(projection: _Projection, n_starts: int) -> list[tuple[tuple[float, float], float]]:
    """The grid's best local minima of the projected sum of squares (exponents, SSE), best first."""
    A, B = np.meshgrid(_GRID_ALPHA, _GRID_BETA, indexing="ij")
    sse = projection.grid_sse(_GRID_ALPHA, _GRID_BETA)
    padded = np.pad(sse, 1, constant_values=np.inf)
    rows, cols = sse.shape
    is_min = np.ones_like(sse, dtype=bool)
    for di in (-1, 0, 1):
        for dj in (-1, 0, 1):
            if di or dj:
                is_min &= sse <= padded[1 + di:1 + di + rows, 1 + dj:1 + dj + cols]
    # Where the best slope is negative, C is clipped to 0 and the SSE is flat (the total sum of squares):
    # that plateau holds no real minimum.
    is_min &= sse < (1 - 1e-9) * (projection.y_centred @ projection.y_centred)
    candidates = np.flatnonzero(is_min.ravel())
    if candidates.size == 0:
        candidates = np.array([int(np.argmin(sse))])
    best = candidates[np.argsort(sse.ravel()[candidates], kind="stable")][:n_starts]
    return [((float(A.ravel()[k]), float(B.ravel()[k])), float(sse.ravel()[k])) for k in best]


@dataclass
class CoreFit:
    coefficients: tuple[float, float, float, float]
    result: Any
    costs: list[float]


def fit_core(points: Sequence[Point], n_starts: int = 3, extra_starts: Sequence[tuple[float, float]] = (),
              exhaustive: bool = True) -> CoreFit:
    """Fit the law to points (already checked): grid search over the exponents, then local refinement.

    The refinement runs from each extra start and from the grid's best local minima. With exhaustive=False
    (the bootstrap), a grid start is only refined when its grid value beats the best refined cost so far.
    Plain (non-robust) least squares: the paper fits and scores the law that way, and with variable projection
    the inner solve for (C, b) is a plain least-squares one, so a robust outer loss would be inconsistent.
    """
    x = np.array([p.x for p in points], dtype=float)
    length = np.array([p.length for p in points], dtype=float)
    y = np.array([p.delta_l for p in points], dtype=float)
    projection = _Projection(x, length, y)
    lower, upper = (ALPHA_BOUNDS[0], BETA_BOUNDS[0]), (ALPHA_BOUNDS[1], BETA_BOUNDS[1])
    starts = [(tuple(start), -math.inf) for start in extra_starts]
    starts += [(start, sse) for start, sse in _grid_starts(projection, n_starts)
               if all(max(abs(start[0] - a), abs(start[1] - b)) > 1e-9 for (a, b), _ in starts)]
    results = []
    for start, grid_sse in starts:
        if results and not exhaustive and grid_sse / 2 >= min(r.cost for r in results):
            continue
        start = np.clip(start, lower, upper)
        results.append(least_squares(projection.residuals, start, jac=projection.jacobian,
                                     bounds=(lower, upper), method="trf"))
    best = min(results, key=lambda r: r.cost)
    return CoreFit(projection.coefficients(*best.x), best, [float(r.cost) for r in results])
