"""The Parametric Memory Law: loading run results, fitting, bootstrap intervals, prediction and planning.

    delta_l(x, l) = C * x**alpha * l**(-beta) + b

x is the adapter's capacity (LoRA rank, or trainable parameter count N), l the number of answer tokens and
delta_l = L_init - L_final the drop in mean answer-token cross-entropy (nats). Runs that ended saturated
(L_final <= ln 2: every token is already likely enough to be recalled) no longer follow the law and are
dropped before fitting (PAPER.md, section 2).

The fit is variable projection: for fixed exponents (alpha, beta) the model is linear in (C, b), which a
closed-form least-squares solve gives exactly, so only the two exponents are searched, first on a grid and
then by scipy.optimize.least_squares from the grid's best local minima.
"""

from __future__ import annotations

import csv
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
from scipy.optimize import least_squares

from .errors import UserError

LN2 = math.log(2.0)
CAPACITIES = ("rank", "params")
COEFFICIENTS = ("C", "alpha", "beta", "b")
N_PARAMETERS = len(COEFFICIENTS)
LAW_FORMAT = "memcli.law/1"

ALPHA_BOUNDS = (0.0, 3.0)
BETA_BOUNDS = (-1.0, 3.0)
_GRID_ALPHA = np.linspace(*ALPHA_BOUNDS, 31)
_GRID_BETA = np.linspace(*BETA_BOUNDS, 41)

# Local refinement starts besides the grid's minima: the paper's exponents and two far from them.
_FIXED_STARTS = ((0.6, 0.5), (0.2, 0.1), (1.5, 1.5))

_LENGTH_COLUMNS = ("length", "answer_tokens")


class LawError(UserError, ValueError):
    """Bad input to the law: a file, a field, too little data, or a law of another capacity measure."""


# --------------------------------------------------------------------------------------------- points


@dataclass(frozen=True)
class Point:
    """One run: capacity x, answer length l and the loss drop delta_l (with the losses when known)."""

    x: float
    length: float
    delta_l: float
    l_final: float | None = None
    l_init: float | None = None
    rank: float | None = None
    params: float | None = None
    method: str | None = None
    source: str = ""
    capacity: str = "rank"  # what x measures: "rank" or "params"

    @property
    def saturated(self) -> bool:
        return self.l_final is not None and self.l_final <= LN2

    def to_row(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None and k != "capacity"}


@dataclass(frozen=True)
class Dropped:
    point: Point
    reason: str


def load_points(inputs: Sequence[Path | str], capacity: str = "rank") -> list[Point]:
    """Read runs from sweep folders, run folders, summary.json files and CSV/JSONL tables."""
    _check_capacity(capacity)
    if not inputs:
        raise LawError("no input given: pass a sweep folder, run folders, or a CSV/JSONL table")
    points: list[Point] = []
    seen: set[Path] = set()
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            summaries = _find_summaries(path)
            if not summaries:
                raise LawError(f"{path}: no summary.json found (looked in the folder and two levels below)")
            for summary in summaries:
                if summary.resolve() not in seen:
                    seen.add(summary.resolve())
                    points.append(_read_summary(summary, capacity))
        elif path.is_file():
            suffix = path.suffix.lower()
            if path.name == "summary.json":
                if path.resolve() not in seen:
                    seen.add(path.resolve())
                    points.append(_read_summary(path, capacity))
            elif suffix == ".csv":
                points.extend(_read_csv(path, capacity))
            elif suffix in (".jsonl", ".ndjson"):
                points.extend(_read_jsonl(path, capacity))
            else:
                raise LawError(f"{path}: not a sweep folder, run folder, summary.json, .csv or .jsonl file")
        else:
            raise LawError(f"{path}: no such file or folder")
    return points


def _check_capacity(capacity: str) -> None:
    if capacity not in CAPACITIES:
        raise LawError(f"capacity must be 'rank' or 'params', not {capacity!r}")


def _find_summaries(folder: Path) -> list[Path]:
    own = folder / "summary.json"
    if own.is_file():
        return [own]
    found = set(folder.glob("*/summary.json")) | set(folder.glob("*/*/summary.json"))
    return sorted(p for p in found if p.is_file())


def _read_summary(path: Path, capacity: str) -> Point:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as exc:
        raise LawError(f"{path}: cannot read ({exc})") from None
    except json.JSONDecodeError as exc:
        raise LawError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise LawError(f"{path}: expected a JSON object")
    return _make_point(data, capacity, str(path), length_keys=("answer_tokens", "length"))


def _read_csv(path: Path, capacity: str) -> list[Point]:
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames is None:
                raise LawError(f"{path}: empty file")
            reader.fieldnames = [name.strip().lower() for name in reader.fieldnames]
            _check_columns(path, reader.fieldnames, capacity)
            points = []
            for row in reader:
                where = f"{path}:{reader.line_num}"
                if None in row:
                    raise LawError(f"{where}: more values than columns")
                if all(v is None or not v.strip() for v in row.values()):
                    continue
                points.append(_make_point(row, capacity, where, length_keys=_LENGTH_COLUMNS))
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise LawError(f"{path}: cannot read ({exc})") from None
    if not points:
        raise LawError(f"{path}: no data rows")
    return points


def _read_jsonl(path: Path, capacity: str) -> list[Point]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise LawError(f"{path}: cannot read ({exc})") from None
    points = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LawError(f"{where}: not valid JSON ({exc.msg})") from None
        if not isinstance(row, dict):
            raise LawError(f"{where}: expected a JSON object")
        _check_columns(where, list(row), capacity)
        points.append(_make_point(row, capacity, where, length_keys=_LENGTH_COLUMNS))
    if not points:
        raise LawError(f"{path}: no data rows")
    return points


def _check_columns(where: Path | str, columns: Iterable[str], capacity: str) -> None:
    columns = set(columns)
    missing = []
    if capacity not in columns:
        missing.append(capacity)
    if not columns.intersection(_LENGTH_COLUMNS):
        missing.append("length (or answer_tokens)")
    if "delta_l" not in columns and not {"l_init", "l_final"} <= columns:
        missing.append("delta_l")
    if missing:
        hint = ""
        other = "rank" if capacity == "params" else "params"
        if capacity in missing and other in columns:
            hint = f"; it has '{other}': use --capacity {other}"
        raise LawError(f"{where}: missing column(s) {', '.join(missing)}{hint}")


def _number(row: dict, key: str, where: str, required: bool) -> float | None:
    value = row.get(key)
    if isinstance(value, str):
        value = value.strip()
        if value == "":
            value = None
    if value is None:
        if required:
            raise LawError(f"{where}: missing value for '{key}'")
        return None
    if isinstance(value, bool):
        raise LawError(f"{where}: '{key}' must be a number, not {value!r}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LawError(f"{where}: '{key}' must be a number, not {value!r}") from None
    if not math.isfinite(number):
        raise LawError(f"{where}: '{key}' must be finite, not {value!r}")
    return number


def _make_point(row: dict, capacity: str, where: str, length_keys: Sequence[str]) -> Point:
    length_key = next((k for k in length_keys if k in row), length_keys[0])
    x = _number(row, capacity, where, required=True)
    length = _number(row, length_key, where, required=True)
    l_init = _number(row, "l_init", where, required=False)
    l_final = _number(row, "l_final", where, required=False)
    delta_l = _number(row, "delta_l", where, required=l_init is None or l_final is None)
    if delta_l is None:
        delta_l = l_init - l_final
    if l_final is None and l_init is not None:
        l_final = l_init - delta_l
    if x <= 0:
        raise LawError(f"{where}: '{capacity}' must be positive, not {x:g}")
    if length <= 0:
        raise LawError(f"{where}: '{length_key}' must be positive, not {length:g}")
    rank = _number(row, "rank", where, required=False)
    params = _number(row, "params", where, required=False)
    method = row.get("method")
    return Point(x=x, length=length, delta_l=delta_l, l_final=l_final, l_init=l_init, rank=rank,
                 params=params, method=str(method) if method is not None else None, source=where,
                 capacity=capacity)


def split_saturated(points: Iterable[Point]) -> tuple[list[Point], list[Dropped]]:
    """Separate the runs the law applies to from saturated ones (L_final <= ln 2)."""
    kept: list[Point] = []
    dropped: list[Dropped] = []
    for point in points:
        if point.saturated:
            reason = f"saturated: L_final {point.l_final:.4g} <= ln 2 ({LN2:.4f})"
            dropped.append(Dropped(point, reason))
        else:
            kept.append(point)
    return kept, dropped


def check_fittable(points: Sequence[Point]) -> None:
    """Raise LawError unless the points can determine the law's four coefficients."""
    if not points:
        raise LawError("no usable runs to fit (all were dropped as saturated, or none were given)")
    lengths = {p.length for p in points}
    capacities = {p.x for p in points}
    cells = {(p.x, p.length) for p in points}
    if len(cells) < N_PARAMETERS + 1:
        raise LawError(f"only {len(cells)} distinct (capacity, length) point(s) are usable; the law has "
                       f"{N_PARAMETERS} coefficients, so at least {N_PARAMETERS + 1} are needed")
    if len(lengths) < 2:
        raise LawError(f"all usable runs have the same length ({next(iter(lengths)):g} tokens); "
                       "the length exponent beta needs at least two lengths")
    if len(capacities) < 2:
        raise LawError(f"all usable runs have the same capacity ({next(iter(capacities)):g}); "
                       "the capacity exponent alpha needs at least two")
    if all(p.delta_l <= 0 for p in points):
        raise LawError("every usable run has delta_l <= 0: training never lowered the loss, nothing to fit")


# ------------------------------------------------------------------------------------------- fitting


def law_value(x, length, C, alpha, beta, b):
    """delta_l = C x^alpha l^-beta + b, broadcasting over every argument."""
    return C * np.power(x, alpha) * np.power(length, -beta) + b


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
class _CoreFit:
    coefficients: tuple[float, float, float, float]
    result: Any
    costs: list[float]


def _fit_core(points: Sequence[Point], n_starts: int = 3, extra_starts: Sequence[tuple[float, float]] = (),
              exhaustive: bool = True) -> _CoreFit:
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
    return _CoreFit(projection.coefficients(*best.x), best, [float(r.cost) for r in results])


def _quality(coefficients: Sequence[float], points: Sequence[Point]) -> tuple[float, float]:
    """R^2 and MAPE (%) of the law on the points."""
    x = np.array([p.x for p in points])
    length = np.array([p.length for p in points])
    y = np.array([p.delta_l for p in points])
    predicted = law_value(x, length, *coefficients)
    ss_res = float(((y - predicted) ** 2).sum())
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")
    nonzero = y != 0
    mape = float(np.mean(np.abs((y - predicted)[nonzero] / y[nonzero])) * 100) if nonzero.any() else float("nan")
    return r2, mape


def _extrapolation(points: Sequence[Point]) -> dict[str, Any]:
    """Fit without the longest length, predict it: the error a user sees when planning beyond the data."""
    longest = max(p.length for p in points)
    train = [p for p in points if p.length != longest]
    held = [p for p in points if p.length == longest]
    report: dict[str, Any] = {"held_out_length": longest, "n_points": len(held), "mape": None, "r2": None}
    try:
        check_fittable(train)
    except LawError as exc:
        report["note"] = f"not computed: without length {longest:g}, {exc}"
        return report
    core = _fit_core(train, n_starts=3, extra_starts=_FIXED_STARTS)
    r2, mape = _quality(core.coefficients, held)
    report["mape"] = mape
    report["r2"] = r2 if math.isfinite(r2) else None
    report["coefficients"] = dict(zip(COEFFICIENTS, core.coefficients))
    return report


def _bootstrap(points: Sequence[Point], n_boot: int, seed: int,
               start: tuple[float, float]) -> tuple[np.ndarray, int]:
    """Refit the law on n_boot resamples of the runs; resamples that cannot be fitted are redrawn."""
    rng = np.random.default_rng(seed)
    samples = []
    redrawn = 0
    n = len(points)
    while len(samples) < n_boot:
        resample = [points[i] for i in rng.integers(0, n, size=n)]
        try:
            check_fittable(resample)
        except LawError:
            redrawn += 1
            if redrawn > 10 * max(n_boot, 10):
                raise LawError("the bootstrap cannot draw fittable resamples: too few distinct runs") from None
            continue
        samples.append(_fit_core(resample, n_starts=1, extra_starts=[start], exhaustive=False).coefficients)
    return np.array(samples, dtype=float).reshape(-1, N_PARAMETERS), redrawn


# ---------------------------------------------------------------------------------------------- law


@dataclass
class LawFit:
    """A fitted law: what `memcli fit` writes to law.json and `memcli plan` reads back."""

    capacity: str
    coefficients: dict[str, float]
    intervals: dict[str, list[float]] | None
    level: float
    r2: float
    mape: float
    extrapolation: dict[str, Any]
    convergence: dict[str, Any]
    n_boot: int
    seed: int
    bootstrap: list[list[float]]
    used: list[dict[str, Any]]
    dropped: list[dict[str, Any]]
    x_range: list[float]
    l_range: list[float]
    params_per_rank: float | None = None
    l_init_median: float | None = None
    methods: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # caveats of the fit, e.g. the saturation rule not applied
    format: str = LAW_FORMAT

    @property
    def C(self) -> float:
        return self.coefficients["C"]

    @property
    def alpha(self) -> float:
        return self.coefficients["alpha"]

    @property
    def beta(self) -> float:
        return self.coefficients["beta"]

    @property
    def b(self) -> float:
        return self.coefficients["b"]

    def coefficient_tuple(self) -> tuple[float, float, float, float]:
        return tuple(self.coefficients[name] for name in COEFFICIENTS)

    def bootstrap_array(self) -> np.ndarray:
        return np.array(self.bootstrap, dtype=float).reshape(-1, N_PARAMETERS)

    def to_json(self) -> str:
        """Indented JSON, with one line per bootstrap sample and per run so the file stays readable."""
        fields = []
        for key, value in _finite_or_none(asdict(self)).items():
            if key in ("bootstrap", "used", "dropped") and value:
                rows = ",\n    ".join(json.dumps(row, allow_nan=False) for row in value)
                text = f"[\n    {rows}\n  ]"
            else:
                text = json.dumps(value, indent=2, allow_nan=False).replace("\n", "\n  ")
            fields.append(f"  {json.dumps(key)}: {text}")
        return "{\n" + ",\n".join(fields) + "\n}\n"

    @classmethod
    def from_json(cls, text: str, source: str = "law file") -> LawFit:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise LawError(f"{source}: not valid JSON ({exc})") from None
        if not isinstance(data, dict) or data.get("format") != LAW_FORMAT:
            raise LawError(f"{source}: not a memcli law file (expected \"format\": \"{LAW_FORMAT}\")")
        known = {f.name for f in fields(cls)}
        try:
            law = cls(**{k: v for k, v in data.items() if k in known})
            _check_capacity(law.capacity)
            law.coefficients = {name: float(law.coefficients[name]) for name in COEFFICIENTS}
        except (TypeError, KeyError, ValueError) as exc:
            raise LawError(f"{source}: malformed law file ({exc})") from None
        return law


def _finite_or_none(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, np.generic):
        return _finite_or_none(value.item())
    return value


def _row_order(point: Point) -> tuple:
    return point.x, point.length, point.source


def _params_per_rank(points: Sequence[Point]) -> float | None:
    """Parameters per unit of rank when every run agrees on it (fixed placement), else None."""
    ratios = [p.params / p.rank for p in points if p.params and p.rank]
    if not ratios or max(ratios) - min(ratios) > 1e-9 * max(ratios):
        return None
    return ratios[0]


def fit_law(points: Sequence[Point], n_boot: int = 200, seed: int = 0, level: float = 0.95) -> LawFit:
    """Fit delta_l = C x^alpha l^-beta + b to the unsaturated points, with bootstrap intervals."""
    measures = {p.capacity for p in points}
    if len(measures) > 1:
        raise LawError("the points mix capacity measures (rank and params); load them with one --capacity")
    capacity = measures.pop() if measures else "rank"
    if not 0 < level < 1:
        raise LawError(f"the interval level must lie between 0 and 1, not {level}")
    if n_boot < 0:
        raise LawError(f"the number of bootstrap samples must be >= 0, not {n_boot}")
    kept, dropped = split_saturated(points)
    check_fittable(kept)
    notes = []
    unknown = [p for p in kept if p.l_final is None]
    if unknown:
        notes.append(f"the saturation rule (drop runs with L_final <= ln 2) could not be applied to {len(unknown)} "
                     f"of {len(points)} runs: they have no l_final (nor l_init), e.g. {unknown[0].source}")

    core = _fit_core(kept, n_starts=3, extra_starts=_FIXED_STARTS)
    coefficients = core.coefficients
    r2, mape = _quality(coefficients, kept)

    best_cost = core.result.cost
    agreeing = sum(c <= best_cost * (1 + 1e-6) + 1e-12 for c in core.costs)
    at_bound = []
    for name, value, (low, high) in (("alpha", coefficients[1], ALPHA_BOUNDS),
                                     ("beta", coefficients[2], BETA_BOUNDS)):
        span = high - low
        if value <= low + 1e-6 * span:
            at_bound.append(f"{name} at its lower bound {low:g}")
        elif value >= high - 1e-6 * span:
            at_bound.append(f"{name} at its upper bound {high:g}")
    if coefficients[0] <= 0:
        at_bound.append("C at 0: delta_l does not grow with capacity")
    convergence = {
        "success": bool(core.result.success),
        "status": int(core.result.status),
        "message": str(core.result.message),
        "cost": float(best_cost),
        "nfev": int(core.result.nfev),
        "starts": len(core.costs),
        "agreeing_starts": int(agreeing),
        "at_bound": at_bound,
        "loss": "linear",
    }

    intervals = None
    samples = np.empty((0, N_PARAMETERS))
    redrawn = 0
    if n_boot > 0:
        samples, redrawn = _bootstrap(kept, n_boot, seed, start=(coefficients[1], coefficients[2]))
        tail = (1 - level) / 2 * 100
        low, high = np.percentile(samples, [tail, 100 - tail], axis=0)
        intervals = {name: [float(low[i]), float(high[i])] for i, name in enumerate(COEFFICIENTS)}
    convergence["bootstrap_redrawn"] = redrawn

    used = []
    for point in sorted(kept, key=_row_order):
        row = point.to_row()
        row["predicted"] = float(law_value(point.x, point.length, *coefficients))
        used.append(row)
    l_inits = [p.l_init for p in kept if p.l_init is not None]
    return LawFit(
        capacity=capacity,
        coefficients=dict(zip(COEFFICIENTS, coefficients)),
        intervals=intervals,
        level=level,
        r2=r2,
        mape=mape,
        extrapolation=_extrapolation(kept),
        convergence=convergence,
        n_boot=n_boot,
        seed=seed,
        bootstrap=samples.tolist(),
        used=used,
        dropped=[{**d.point.to_row(), "reason": d.reason}
                 for d in sorted(dropped, key=lambda d: _row_order(d.point))],
        x_range=[min(p.x for p in kept), max(p.x for p in kept)],
        l_range=[min(p.length for p in kept), max(p.length for p in kept)],
        params_per_rank=_params_per_rank(points),
        l_init_median=float(np.median(l_inits)) if l_inits else None,
        methods=sorted({p.method for p in points if p.method}),
        notes=notes,
    )


def save_law(law: LawFit, path: Path | str) -> Path:
    """Write law.json atomically (a temporary file in the same folder, then a rename)."""
    path = Path(path)
    _atomic_write(path, lambda handle: handle.write(law.to_json().encode("utf-8")))
    return path


def load_law(path: Path | str, capacity: str | None = None) -> LawFit:
    """Read law.json; with capacity given, refuse a law fitted on another capacity measure."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise LawError(f"{path}: cannot read the law file ({exc})") from None
    law = LawFit.from_json(text, source=str(path))
    if capacity is not None:
        _check_capacity(capacity)
        if law.capacity != capacity:
            raise LawError(f"{path}: this law was fitted with capacity measured in {law.capacity}, "
                           f"not {capacity}; refit with --capacity {capacity} or plan in {law.capacity}")
    return law


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False)
    try:
        with handle:
            write(handle)
        os.replace(handle.name, path)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise


def predict(law: LawFit, x, length):
    """Predicted delta_l at capacity x and answer length l (numpy broadcasting)."""
    return law_value(np.asarray(x, dtype=float), np.asarray(length, dtype=float), *law.coefficient_tuple())


# -------------------------------------------------------------------------------------------- plan


@dataclass
class Plan:
    """The answer to "how big an adapter does this corpus need?"."""

    capacity: str
    length: float
    l_init: float
    margin: float
    target_l_final: float
    status: str  # "ok" | "minimum" | "unreachable" | "exceeds_max"
    x: int | None
    rank: int | None
    params: int | None
    predicted_delta_l: float | None
    predicted_l_final: float | None
    interval: list[int | None] | None  # capacity units; None at an end means "beyond the maximum"
    level: float
    extrapolation: list[str]
    sentence: str
    l_init_source: str | None = None
    params_per_rank: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _finite_or_none(asdict(self))


def _required_x(need: float, length: float, coefficients: Sequence[float], x_min: float) -> float:
    """Smallest real capacity with predicted delta_l >= need (x_min when any will do, inf when none)."""
    C, alpha, beta, b = coefficients
    if need <= law_value(x_min, length, C, alpha, beta, b):
        return x_min
    if C <= 0 or alpha <= 0:
        return math.inf
    with np.errstate(over="ignore", divide="ignore"):
        x = ((need - b) / (C * length ** (-beta))) ** (1.0 / alpha)
    return max(float(x), x_min)


def _smallest_integer(need: float, length: float, coefficients: Sequence[float], x_real: float,
                      x_min: int) -> int:
    """Round a real solution up to an integer and correct it for floating-point error."""
    x = max(math.ceil(x_real - 1e-9 * x_real), x_min)
    for _ in range(3):
        if x > x_min and law_value(x - 1, length, *coefficients) >= need:
            x -= 1
    for _ in range(3):
        if law_value(x, length, *coefficients) < need:
            x += 1
    return x


def plan(law: LawFit, length: float, l_init: float, margin: float = 0.1, max_rank: int = 4096,
         params_per_rank: float | None = None, capacity: str | None = None,
         l_init_source: str | None = None) -> Plan:
    """The smallest capacity whose predicted L_final = l_init - delta_l(x, l) is <= ln 2 - margin."""
    if capacity is not None and capacity != law.capacity:
        raise LawError(f"the law was fitted with capacity measured in {law.capacity}, not {capacity}")
    for name, value in (("answer length", length), ("L_init", l_init)):
        try:
            valid = math.isfinite(float(value)) and float(value) > 0
        except (TypeError, ValueError):
            valid = False
        if not valid:
            raise LawError(f"the {name} must be a positive number, not {value!r}")
    length, l_init = float(length), float(l_init)
    if not 0 <= margin < LN2:
        raise LawError(f"the margin must lie in [0, ln 2), not {margin}")
    if max_rank < 1:
        raise LawError(f"max rank must be at least 1, not {max_rank}")

    per_rank = params_per_rank if params_per_rank is not None else law.params_per_rank
    if law.capacity == "rank":
        x_min, x_max, unit = 1, max_rank, "rank"
    else:
        x_min = int(math.ceil(per_rank)) if per_rank else 1
        x_max = max_rank * per_rank if per_rank else math.inf
        unit = "parameter count"
    target = LN2 - margin
    need = l_init - target
    coefficients = law.coefficient_tuple()

    x_real = _required_x(need, length, coefficients, x_min)
    if math.isinf(x_real):
        status, x = "unreachable", None
    elif x_real > x_max:
        status, x = "exceeds_max", None
    else:
        x = _smallest_integer(need, length, coefficients, x_real, x_min)
        status = "minimum" if x == x_min else "ok"
        if x > x_max:
            status, x = "exceeds_max", None

    rank = params = None
    if x is not None:
        if law.capacity == "rank":
            rank = x
            params = int(round(x * per_rank)) if per_rank else None
        else:
            params = x
            rank = int(math.ceil(x / per_rank - 1e-9)) if per_rank else None

    predicted = float(law_value(x, length, *coefficients)) if x is not None else None
    interval = _plan_interval(law, need, length, x_min, x_max)
    extrapolation = _extrapolation_notes(law, x, length, unit)
    result = Plan(capacity=law.capacity, length=float(length), l_init=float(l_init), margin=float(margin),
                  target_l_final=target, status=status, x=x, rank=rank, params=params,
                  predicted_delta_l=predicted,
                  predicted_l_final=l_init - predicted if predicted is not None else None,
                  interval=interval, level=law.level, extrapolation=extrapolation, sentence="",
                  l_init_source=l_init_source, params_per_rank=per_rank)
    result.sentence = _plan_sentence(result, law, need, x_real, x_max)
    return result


def _plan_interval(law: LawFit, need: float, length: float, x_min: float,
                   x_max: float) -> list[int | None] | None:
    samples = law.bootstrap_array()
    if samples.shape[0] == 0:
        return None
    required = np.array([_required_x(need, length, row, x_min) for row in samples])
    tail = (1 - law.level) / 2
    ends = [float(np.quantile(required, tail, method="lower")),
            float(np.quantile(required, 1 - tail, method="higher"))]
    return [None if (math.isinf(v) or v > x_max) else max(int(math.ceil(v - 1e-9 * v)), int(x_min))
            for v in ends]


def _extrapolation_notes(law: LawFit, x: int | None, length: float, unit: str) -> list[str]:
    notes = []
    x_low, x_high = law.x_range
    l_low, l_high = law.l_range
    if x is not None and x > x_high:
        notes.append(f"The answer extrapolates: {unit} {x:,} is above the largest fitted {unit} ({x_high:,.0f}).")
    elif x is not None and x < x_low:
        notes.append(f"The answer extrapolates: {unit} {x:,} is below the smallest fitted {unit} ({x_low:,.0f}).")
    if length > l_high:
        notes.append(f"The length extrapolates: {length:,.0f} answer tokens is longer than the longest fitted "
                     f"({l_high:,.0f}).")
    elif length < l_low:
        notes.append(f"The length extrapolates: {length:,.0f} answer tokens is shorter than the shortest fitted "
                     f"({l_low:,.0f}).")
    return notes


def _describe(p: Plan) -> str:
    if p.capacity == "rank":
        return f"rank {p.rank}" + (f" ({p.params:,} parameters)" if p.params is not None else "")
    if p.rank is None:
        return f"{p.params:,} parameters"
    return f"{p.params:,} parameters (rank {p.rank}, which has {round(p.rank * p.params_per_rank):,})"


def _plan_sentence(p: Plan, law: LawFit, need: float, x_real: float, x_max: float) -> str:
    goal = (f"a predicted L_final <= {p.target_l_final:.3f} nats (ln 2 - {p.margin:g}) "
            f"for {p.length:,.0f} answer tokens starting from L_init {p.l_init:.3f}")
    unit = "rank" if p.capacity == "rank" else "parameter count"
    if p.status == "ok":
        return (f"The smallest adapter that reaches {goal} is {_describe(p)}: "
                f"predicted delta_l {p.predicted_delta_l:.3f}, L_final {p.predicted_l_final:.3f}.")
    if p.status == "minimum":
        what = _describe(p)
        if need <= 0:
            why = "the base model's L_init is already below the target"
        elif need <= law.b:
            why = (f"the law's constant b = {law.b:.3f} alone covers the {need:.3f} nats needed, so the answer "
                   "does not depend on capacity; treat it with caution")
        else:
            why = f"it is predicted to lower the loss by {p.predicted_delta_l:.3f} nats, {need:.3f} are needed"
        return f"The smallest adapter, {what}, already reaches {goal}: {why}."
    if p.status == "unreachable":
        return (f"No {unit} reaches {goal}: the fitted law's delta_l does not grow with capacity "
                f"(C = {law.C:.3g}, alpha = {law.alpha:.3g}), so it saturates at b = {law.b:.3f} nats, "
                f"short of the {need:.3f} nats needed.")
    at_max = float(law_value(x_max, p.length, *law.coefficient_tuple()))
    limit = f"rank {x_max:,.0f}" if p.capacity == "rank" else f"{x_max:,.0f} parameters"
    return (f"No adapter up to {limit} reaches {goal}: it would need {unit} ~{x_real:,.0f} "
            f"(delta_l {need:.3f} nats needed, {at_max:.3f} predicted at the maximum).")


# ------------------------------------------------------------------------------------------- plots


PLOT_NAMES = ("pred_vs_obs.png", "delta_l_vs_l.png")  # what plot_fit writes


def plot_fit(law: LawFit, points: Sequence[Point], out_dir: Path | str) -> list[Path]:
    """Write pred_vs_obs.png and delta_l_vs_l.png into out_dir; saturated points are drawn hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    kept, dropped = split_saturated(points)
    dropped_points = [d.point for d in dropped]
    label = "rank" if law.capacity == "rank" else "params"
    written = []

    def arrays(pts):
        return (np.array([p.x for p in pts], dtype=float), np.array([p.length for p in pts], dtype=float),
                np.array([p.delta_l for p in pts], dtype=float))

    # Predicted against observed.
    fig, ax = plt.subplots(figsize=(5.5, 5))
    x, length, y = arrays(kept)
    predicted = predict(law, x, length)
    sc = ax.scatter(y, predicted, c=np.log2(x), cmap="viridis", s=28, label="fitted runs")
    if dropped_points:
        dx, dl, dy = arrays(dropped_points)
        ax.scatter(dy, predict(law, dx, dl), facecolors="none", edgecolors="grey", s=28,
                   label="saturated (not fitted)")
    values = np.concatenate([y, predicted] + ([dy, predict(law, dx, dl)] if dropped_points else []))
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=1, label="y = x")
    ax.set_xlabel("observed delta_l (nats)")
    ax.set_ylabel("predicted delta_l (nats)")
    ax.set_title(f"R² = {law.r2:.3f}, MAPE = {law.mape:.2f} %")
    fig.colorbar(sc, ax=ax, label=f"log2 {label}")
    ax.legend(loc="upper left", fontsize=8)
    written.append(_save_figure(fig, out_dir / "pred_vs_obs.png"))
    plt.close(fig)

    # delta_l against l per capacity, with the fitted curves.
    fig, ax = plt.subplots(figsize=(6.5, 5))
    all_points = list(kept) + dropped_points
    capacities = sorted({p.x for p in all_points})
    cmap = plt.get_cmap("viridis")
    l_grid = np.geomspace(min(p.length for p in all_points), max(p.length for p in all_points), 100)
    for i, cap in enumerate(capacities):
        colour = cmap(i / max(len(capacities) - 1, 1))
        for pts, filled in ((kept, True), (dropped_points, False)):
            sel = [p for p in pts if p.x == cap and p.delta_l > 0]
            if sel:
                ax.scatter([p.length for p in sel], [p.delta_l for p in sel], s=24,
                           color=colour if filled else "none", edgecolors=colour)
        curve = predict(law, cap, l_grid)
        positive = curve > 0
        ax.plot(l_grid[positive], curve[positive], color=colour, lw=1.2, label=f"{label} {cap:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("answer tokens l")
    ax.set_ylabel("delta_l (nats)")
    c, a, bt, b = law.coefficient_tuple()
    ax.set_title(f"delta_l = {c:.3g}·x^{a:.3f}·l^{-bt:.3f} {'-' if b < 0 else '+'} {abs(b):.3g}", fontsize=10)
    ax.legend(fontsize=7, ncol=2 if len(capacities) > 8 else 1)
    written.append(_save_figure(fig, out_dir / "delta_l_vs_l.png"))
    plt.close(fig)
    return written


def _save_figure(fig, path: Path) -> Path:
    _atomic_write(path, lambda handle: fig.savefig(handle, format="png", dpi=120, bbox_inches="tight"))
    return path
