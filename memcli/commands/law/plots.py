"""The figures of a fitted law (docs/method.md §5), PNGs written atomically beside law.json by `memcli fit`:
pred_vs_obs.png (predicted against observed delta_l) and delta_l_vs_l.png (delta_l against l per capacity, with
the fitted curves). Saturated runs, which the fit drops, are drawn hollow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np

from memcli.commands.law.points import Point, law_value, split_saturated
from memcli.core import runs

PLOT_NAMES = ("pred_vs_obs.png", "delta_l_vs_l.png")  # what plot_fit writes


def plot_fit(law: Any, points: Sequence[Point], out_dir: Path | str) -> list[Path]:
    """Write pred_vs_obs.png and delta_l_vs_l.png into out_dir for `law` (a memcli.commands.law.fit.LawFit, which
    imports this module, hence no annotation) fitted on `points`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    kept, dropped = split_saturated(points)
    dropped_points = [d.point for d in dropped]
    label = "rank" if law.capacity == "rank" else "params"
    coefficients = law.coefficient_tuple()
    written = []

    def predict(x, length):
        return law_value(np.asarray(x, dtype=float), np.asarray(length, dtype=float), *coefficients)

    def arrays(pts):
        return (np.array([p.x for p in pts], dtype=float), np.array([p.length for p in pts], dtype=float),
                np.array([p.delta_l for p in pts], dtype=float))

    # Predicted against observed.
    fig, ax = plt.subplots(figsize=(5.5, 5))
    x, length, y = arrays(kept)
    predicted = predict(x, length)
    sc = ax.scatter(y, predicted, c=np.log2(x), cmap="viridis", s=28, label="fitted runs")
    if dropped_points:
        dx, dl, dy = arrays(dropped_points)
        ax.scatter(dy, predict(dx, dl), facecolors="none", edgecolors="grey", s=28,
                   label="saturated (not fitted)")
    values = np.concatenate([y, predicted] + ([dy, predict(dx, dl)] if dropped_points else []))
    low, high = float(values.min()), float(values.max())
    pad = 0.05 * (high - low or 1.0)
    ax.plot([low - pad, high + pad], [low - pad, high + pad], "k--", lw=1, label="y = x")
    ax.set_xlabel("observed delta_l (nats)")
    ax.set_ylabel("predicted delta_l (nats)")
    ax.set_title(f"R² = {law.r2:.3f}, MAPE = {law.mape:.2f} %")
    fig.colorbar(sc, ax=ax, label=f"log2 {label}")
    ax.legend(loc="upper left", fontsize=8)
    written.append(save_figure(fig, out_dir / "pred_vs_obs.png"))
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
        curve = predict(cap, l_grid)
        positive = curve > 0
        ax.plot(l_grid[positive], curve[positive], color=colour, lw=1.2, label=f"{label} {cap:g}")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("answer tokens l")
    ax.set_ylabel("delta_l (nats)")
    c, a, bt, b = coefficients
    ax.set_title(f"delta_l = {c:.3g}·x^{a:.3f}·l^{-bt:.3f} {'-' if b < 0 else '+'} {abs(b):.3g}", fontsize=10)
    ax.legend(fontsize=7, ncol=2 if len(capacities) > 8 else 1)
    written.append(save_figure(fig, out_dir / "delta_l_vs_l.png"))
    plt.close(fig)
    return written


def save_figure(fig, path: Path) -> Path:
    """The figure as a PNG at path, whole or absent (runs.atomic_write)."""
    return runs.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight"),
                             what="plot")
