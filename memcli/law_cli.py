"""The work behind `memcli fit` and `memcli plan`: plain functions the Typer app in cli.py calls.

Both raise LawError for input a user can get wrong; cli.py turns that into one line and exit code 2.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Sequence

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .law import (
    COEFFICIENTS,
    PLOT_NAMES,
    LawError,
    LawFit,
    Plan,
    fit_law,
    load_law,
    load_points,
    plan,
    plot_fit,
    save_law,
)


def fit_command(inputs: Sequence[Path], capacity: str = "rank", out: Path = Path("law.json"), n_boot: int = 200,
                seed: int = 0, plots: bool = True, *, level: float = 0.95,
                console: Console | None = None) -> LawFit:
    """Fit the law to runs or tables, write law.json (and the PNGs beside it), print a summary."""
    console = console or Console()
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
    except OSError as exc:
        for path in new_files:  # nothing half-written: what this call created goes again
            with contextlib.suppress(OSError):
                path.unlink(missing_ok=True)
        raise LawError(f"cannot write {out} or its plots: {exc.strerror or exc}") from None
    print_fit(law, console)
    console.print(escape(f"Wrote {out}" + "".join(f", {path}" for path in written)))
    return law


def print_fit(law: LawFit, console: Console) -> None:
    unit = "rank r" if law.capacity == "rank" else "parameters N"
    console.print(f"Parametric Memory Law: delta_l = C · x^alpha · l^-beta + b  (x = {unit}, l = answer tokens)")
    table = Table()
    table.add_column("coefficient")
    table.add_column("value", justify="right")
    table.add_column(f"{law.level:.0%} interval" if law.intervals else "interval", justify="right")
    for name in COEFFICIENTS:
        interval = law.intervals[name] if law.intervals else None
        shown = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "(no bootstrap)"
        table.add_row(name, f"{law.coefficients[name]:.4g}", shown)
    console.print(table)

    console.print(f"Fit on {len(law.used)} runs: R² {_number(law.r2, '.4f')}, MAPE {_number(law.mape, '.2f')} %"
                  f" ({law.capacity} {law.x_range[0]:,.0f}..{law.x_range[1]:,.0f},"
                  f" l {law.l_range[0]:,.0f}..{law.l_range[1]:,.0f}).")
    extrapolation = law.extrapolation
    if extrapolation.get("mape") is not None:
        console.print(f"Extrapolation: fitted without l = {extrapolation['held_out_length']:,.0f}, the law "
                      f"predicts its {extrapolation['n_points']} runs with MAPE {extrapolation['mape']:.2f} %.")
    else:
        console.print(f"Extrapolation: {extrapolation.get('note', 'not computed')}.")

    convergence = law.convergence
    state = "converged" if convergence["success"] else "DID NOT CONVERGE"
    console.print(f"Optimiser {state}: {convergence['message']} "
                  f"({convergence['agreeing_starts']} of {convergence['starts']} starts agree on the best cost).")
    for note in convergence["at_bound"]:
        console.print(f"[yellow]Warning: {note}; the fit may be unreliable.[/yellow]")
    for note in law.notes:
        console.print(f"[yellow]Note: {escape(note)}.[/yellow]")
    if len(law.methods) > 1:
        console.print(f"[yellow]Warning: the runs mix training methods ({', '.join(law.methods)}); "
                      "each method has its own law.[/yellow]")

    if law.dropped:
        dropped = Table(title=f"Dropped {len(law.dropped)} run(s)")
        dropped.add_column("source", overflow="fold")
        dropped.add_column(law.capacity, justify="right")
        dropped.add_column("l", justify="right")
        dropped.add_column("reason")
        for row in law.dropped:
            dropped.add_row(escape(str(row.get("source", ""))), f"{row['x']:,.0f}", f"{row['length']:,.0f}",
                            row["reason"])
        console.print(dropped)
    else:
        console.print("No run was dropped.")


def _number(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def plan_command(law_path: Path, tokens: int | None, l_init: float | None, margin: float = 0.1, *,
                 capacity: str | None = None, max_rank: int = 4096, params_per_rank: float | None = None,
                 l_init_source: str | None = None, console: Console | None = None) -> Plan:
    """Answer "which adapter does this corpus need?" from a law file.

    tokens and l_init come from the command line, or are measured on a corpus by the caller, which then
    says where L_init came from in l_init_source (e.g. "measured on corpus.jsonl with the base model").
    Without an L_init, the median L_init of the runs the law was fitted on is used, and the answer says so.
    """
    console = console or Console()
    law = load_law(law_path, capacity=capacity)
    if tokens is None:
        raise LawError("give the corpus's answer length with --tokens (or pass the corpus itself)")
    if l_init is None:
        if law.l_init_median is None:
            raise LawError(f"{law_path}: the fitted runs carry no L_init; give --l-init (or pass the corpus)")
        l_init = law.l_init_median
        l_init_source = f"the median L_init of the runs in {law_path}, not measured on this corpus"
    result = plan(law, tokens, l_init, margin=margin, max_rank=max_rank, params_per_rank=params_per_rank,
                  l_init_source=l_init_source)
    print_plan(result, console)
    return result


def print_plan(result: Plan, console: Console) -> None:
    console.print(escape(result.sentence))
    if result.interval is not None:
        low, high = result.interval
        unit = "rank" if result.capacity == "rank" else "parameters"
        if low is None:
            console.print(f"The whole {result.level:.0%} bootstrap interval lies beyond the maximum {unit}.")
        else:
            upper = f"{high:,}" if high is not None else "beyond the maximum"
            console.print(f"{result.level:.0%} interval from the bootstrap: {unit} {low:,} to {upper}.")
    if result.l_init_source:
        console.print(escape(f"L_init {result.l_init:.3f} nats: {result.l_init_source}."))
    for note in result.extrapolation:
        console.print(f"[yellow]{escape(note)}[/yellow]")
