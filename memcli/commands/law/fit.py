"""Fitting the Parametric Memory Law (docs/method.md §5): the fit (variable projection, projection.py) on the
unsaturated runs, its bootstrap intervals, its quality (R^2, MAPE), the held-out extrapolation check, and
law.json (LawFit, save_law, load_law; fit_and_save is `memcli fit` without the printing).
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memcli.commands.law.plots import PLOT_NAMES, plot_fit
from memcli.commands.law.points import (
    BOOT_SEED,
    CAPACITY,
    COEFFICIENTS,
    LAW_FILE,
    LEVEL,
    N_BOOT,
    N_PARAMETERS,
    LawError,
    Point,
    check_capacity,
    check_fittable,
    law_value,
    load_points,
    recall_frontier,
    recall_loss,
    shared_settings,
    split_saturated,
)
from memcli.commands.law.projection import ALPHA_BOUNDS, BETA_BOUNDS, FIXED_STARTS, CoreFit, fit_core
from memcli.core import runs
from memcli.core.errors import UserError

LAW_FORMAT = "memcli.law/1"  # a file format name, kept when the package moved


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
    core = fit_core(train, n_starts=3, extra_starts=FIXED_STARTS)
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
        samples.append(fit_core(resample, n_starts=1, extra_starts=[start], exhaustive=False).coefficients)
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
    # the training settings the fitted runs share (what a plan assumes) and the range every run (saturated
    # ones too) measured: a plan outside it extrapolates
    settings: dict[str, Any] = field(default_factory=dict)
    measured_x_range: list[float] | None = None
    measured_l_range: list[float] | None = None
    recall_l_final: float | None = None  # every run at or under this L_final recalled >= 95 % (points.recall_loss)
    # the same on the law's own scale: every run whose L_final the law predicts at or under this recalled >= 95 %
    # (the target `plan` aims its prediction at: it carries the law's bias near saturation)
    recall_predicted_l_final: float | None = None
    # [length, smallest capacity at which every run of that length (and of every larger capacity) recalled
    # >= 95 %, or None] per measured length: the runs' own recall, which `plan` trains at least
    recall_frontier: list[list[float | None]] | None = None
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
        for key, value in runs.json_safe(asdict(self)).items():
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
            check_capacity(law.capacity)
            law.coefficients = {name: float(law.coefficients[name]) for name in COEFFICIENTS}
        except (TypeError, KeyError, ValueError) as exc:
            raise LawError(f"{source}: malformed law file ({exc})") from None
        return law


def _row_order(point: Point) -> tuple:
    return point.x, point.length, point.source


def _params_per_rank(points: Sequence[Point]) -> float | None:
    """Parameters per unit of rank when every run agrees on it (fixed placement), else None."""
    ratios = [p.params / p.rank for p in points if p.params and p.rank]
    if not ratios or max(ratios) - min(ratios) > 1e-9 * max(ratios):
        return None
    return ratios[0]


def _convergence(core: CoreFit) -> dict[str, Any]:
    """How the optimiser ended: its status, how many starts agree on the best cost, coefficients at a bound."""
    coefficients = core.coefficients
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
    return {
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


def fit_law(points: Sequence[Point], n_boot: int = N_BOOT, seed: int = BOOT_SEED, level: float = LEVEL) -> LawFit:
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

    core = fit_core(kept, n_starts=3, extra_starts=FIXED_STARTS)
    coefficients = core.coefficients
    r2, mape = _quality(coefficients, kept)
    convergence = _convergence(core)

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
    settings, differing = shared_settings(points)
    if differing:
        notes.append(f"the runs differ in {', '.join(differing)}: the law mixes training settings")
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
        settings=settings,
        measured_x_range=[min(p.x for p in points), max(p.x for p in points)],
        measured_l_range=[min(p.length for p in points), max(p.length for p in points)],
        recall_l_final=recall_loss(points),
        recall_predicted_l_final=recall_loss(points, loss=lambda p: _predicted_l_final(p, coefficients)),
        recall_frontier=recall_frontier(points),
    )


def _predicted_l_final(point: Point, coefficients) -> float | None:
    """L_init - delta_l(x, l): the run's final loss as the law predicts it (None without L_init). It may be
    negative: the law's curve does not stop at zero loss."""
    if point.l_init is None:
        return None
    return point.l_init - float(law_value(point.x, point.length, *coefficients))


# ----------------------------------------------------------------------------------------- law.json


def save_law(law: LawFit, path: Path | str) -> Path:
    """Write law.json atomically (runs.write_text: a temporary file in the same folder, then a rename)."""
    return runs.write_text(path, law.to_json(), what="law file")


def load_law(path: Path | str, capacity: str | None = None) -> LawFit:
    """Read law.json; with capacity given, refuse a law fitted on another capacity measure."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise LawError(f"{path}: cannot read the law file ({exc})") from None
    law = LawFit.from_json(text, source=str(path))
    if capacity is not None:
        check_capacity(capacity)
        if law.capacity != capacity:
            raise LawError(f"{path}: this law was fitted with capacity measured in {law.capacity}, "
                           f"not {capacity}; refit with --capacity {capacity} or plan in {law.capacity}")
    return law


def fit_and_save(inputs: Sequence[Path | str], capacity: str = CAPACITY, out: Path | str = Path(LAW_FILE),
                 n_boot: int = N_BOOT, seed: int = BOOT_SEED, plots: bool = True,
                 level: float = LEVEL) -> tuple[LawFit, list[Path]]:
    """`memcli fit`: fit the law to runs or tables, write law.json and the PNGs beside it.

    Returns the law and the plots written. When a file cannot be written, what this call created goes again and
    one LawError names `out` and the reason.
    """
    out = Path(out)
    if out.is_dir():
        raise LawError(f"{out} is a folder; --out names the law file to write (e.g. {out / 'law.json'})")
    points = load_points(inputs, capacity)
    law = fit_law(points, n_boot=n_boot, seed=seed, level=level)
    plot_files = [out.parent / name for name in PLOT_NAMES] if plots else []
    new_files = [path for path in [*plot_files, out] if not path.exists()]
    try:
        written = plot_fit(law, points, out.parent) if plots else []
        save_law(law, out)
    except (OSError, UserError) as exc:
        for path in new_files:  # nothing half-written: what this call created goes again
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        # runs.atomic_write turns the OSError into a UserError (raised from None, so it is still the context)
        cause = exc if isinstance(exc, OSError) else exc.__context__
        reason = (cause.strerror or cause) if isinstance(cause, OSError) else exc
        raise LawError(f"cannot write {out} or its plots: {reason}") from None
    return law, written
