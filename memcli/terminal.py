"""What every command prints through: the two consoles and the one way bad input ends."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from .errors import UserError

console = Console(stderr=True)  # progress, notes and errors
out_console = Console()  # results a user may pipe


def user_errors(fn):
    """Bad input ends in one clear line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


# --- fit and plan: the Parametric Memory Law (memcli.law) --------------------------------------------------

from typing import TYPE_CHECKING  # noqa: E402

if TYPE_CHECKING:  # annotations only: importing the law would load numpy and scipy for every command
    from .law.fit import LawFit
    from .law.plan import Plan


def print_fit(law: LawFit, console: Console) -> None:
    """`memcli fit`'s summary: the coefficients with their intervals, quality, extrapolation, optimiser, notes and
    the dropped runs."""
    from rich.table import Table

    unit = "rank r" if law.capacity == "rank" else "parameters N"
    console.print(f"Parametric Memory Law: delta_l = C · x^alpha · l^-beta + b  (x = {unit}, l = answer tokens)")
    table = Table()
    table.add_column("coefficient")
    table.add_column("value", justify="right")
    table.add_column(f"{law.level:.0%} interval" if law.intervals else "interval", justify="right")
    for name, value in law.coefficients.items():
        interval = law.intervals[name] if law.intervals else None
        shown = f"[{interval[0]:.4g}, {interval[1]:.4g}]" if interval else "(no bootstrap)"
        table.add_row(name, f"{value:.4g}", shown)
    console.print(table)

    console.print(f"Fit on {len(law.used)} runs: R² {_or_na(law.r2, '.4f')}, MAPE {_or_na(law.mape, '.2f')} %"
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


def print_written(paths, console: Console) -> None:
    """"Wrote a, b, c": the files a command wrote, the main one first."""
    console.print(escape("Wrote " + ", ".join(str(path) for path in paths)))


def _or_na(value: float | None, spec: str) -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def print_plan(result: Plan, console: Console) -> None:
    """`memcli plan`'s answer: the sentence, the bootstrap interval, where L_init came from, extrapolation notes."""
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
