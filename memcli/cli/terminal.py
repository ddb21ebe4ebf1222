"""What every command prints through: the two consoles, progress bars, result tables and the one way bad input
ends."""

from __future__ import annotations

import functools
import signal
import sys
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.markup import escape

from memcli.core.errors import UserError
from memcli.core.signals import Terminated, handle_sigterm

if TYPE_CHECKING:  # annotations only: importing the law would load numpy and scipy for every command
    from memcli.commands.law.fit import LawFit
    from memcli.commands.law.plan import Plan

console = Console(stderr=True)  # progress, notes and errors
out_console = Console()  # results a user may pipe


def _parse_list(text: str | None, name: str, convert, what: str) -> list | None:
    """A comma-separated list from the command line; bad input is the exit-2 path."""
    if text is None:
        return None
    try:
        return [convert(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name} takes comma-separated {what}, got '{text}'") from None


def parse_ints(text: str | None, name: str) -> list[int] | None:
    return _parse_list(text, name, int, "integers")


def parse_floats(text: str | None, name: str) -> list[float] | None:
    return _parse_list(text, name, float, "numbers")


def user_errors(fn):
    """Bad input ends in one clear line on stderr and exit code 2. Ctrl-C and SIGTERM unwind the command (its
    temporary files and folders are removed) and end in one line and the shell's codes: 130 (SIGINT), 143
    (SIGTERM)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        previous = handle_sigterm()
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except KeyboardInterrupt as e:
            name, code = ("SIGTERM", 143) if isinstance(e, Terminated) else ("SIGINT (Ctrl-C)", 130)
            console.print(f"[bold red]interrupted[/] by {name}", highlight=False)
            raise typer.Exit(code)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)
    return wrapper


# --- train ----------------------------------------------------------------------------------------------------

def train_progress(total_steps: int):
    """A Rich progress bar on a terminal, otherwise a plain line at every check step (also where the gate left the
    clean check out, so a log never falls silent for long). Returns (callback, close)."""
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       TextColumn("{task.fields[info]}"), console=console)
        task = bar.add_task("train", total=total_steps, info="")
        bar.start()
        info = {}

        def update(step, total, row):
            for key in ("objective", "above", "exact_match"):
                if row.get(key) is not None:
                    info[key] = row[key]
            text = "  ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            bar.update(task, completed=step, info=text)
        return update, bar.stop

    def update(step, total, row):
        if "exact_match" in row:
            print(f"step {step}/{total}  objective {row.get('objective')}  above {row.get('above')}  "
                  f"exact_match {row['exact_match']:.4f}  certified {row['certified']:.4f}", file=sys.stderr,
                  flush=True)
        elif "latest_above" in row:
            print(f"step {step}/{total}  objective {row.get('objective')}  above {row.get('above')}  latest passes "
                  f"{row['latest_above']:.4f} past p 0.5: no clean check yet", file=sys.stderr, flush=True)
    return update, lambda: None


# --- fit and plan: the Parametric Memory Law (memcli.commands.law) --------------------------------------------------



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


def print_plan(result: Plan, console: Console, law: str = "", corpus: str = "CORPUS") -> None:
    """`memcli plan`'s answer: the law used, the sentence, the bootstrap intervals, where L_init came from,
    extrapolation notes, the training settings the answer assumes and the command that trains it."""
    from memcli.commands.law.plan import assumed_settings, train_command  # lazy: scipy only for `plan`

    if law:
        console.print(escape(f"Law: {law}."))
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
    if result.l_final_interval is not None:
        low, high = result.l_final_interval
        below = (" (on the law's scale: its curve does not stop at zero loss, so near full recall it goes below 0; "
                 f"the target is {result.target_l_final:.3f})") if low < 0 else ""
        console.print(f"Predicted L_final at that rank, {result.level:.0%} bootstrap interval: {low:.3f} "
                      f"to {high:.3f} nats{below}.")
    for note in result.extrapolation:
        console.print(f"[yellow]{escape(note)}[/yellow]")
    held = result.held_out or {}
    if held.get("mape") is not None:
        console.print(f"The law's own check: fitted without its longest length (l = {held['held_out_length']:,.0f}), "
                      f"it predicts those {held['n_points']} runs with MAPE {held['mape']:.2f} %.", highlight=False)
    if result.settings:
        console.print(escape(f"The law assumes these training settings: {assumed_settings(result.settings)}."))
    if result.train_rank is not None and result.settings:
        why = f" (rank {result.train_rank}, {result.train_reason})" if result.train_reason else ""
        console.print(f"Train it with{why}:")
        console.print(escape(train_command(result.settings, result.train_rank, corpus)), soft_wrap=True)


def print_measured_rank(probed, corpus: str, tokens: int, entries: int, console: Console) -> None:
    """`memcli plan --probe` when the probe reached the whole corpus: the smallest rank that certified it, its
    command and the probe's cost."""
    from memcli.commands.law.plan import train_command  # lazy: scipy only for `plan`

    console.print(f"The probe went on to the whole corpus, where rank {probed.whole_rank} was the smallest that "
                  f"certified it ({probed.folder}): measured, no law needed. Train it with:", highlight=False)
    console.print(escape(train_command(probed.settings, probed.whole_rank, corpus)), soft_wrap=True)
    console.print(probed.cost_sentence(tokens, probed.settings, entries), highlight=False)


# --- verify --------------------------------------------------------------------------------------------------

def verify_progress():
    """(callback(done, total), close) for `memcli verify`: a Rich bar on a terminal, a plain line per ~10 %
    otherwise."""
    if console.is_terminal:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(TextColumn("[bold]verify"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                       console=console, transient=True)
        task = None

        def update(done, total):
            nonlocal task
            if task is None:
                bar.start()
                task = bar.add_task("verify", total=total)
            bar.update(task, completed=done)
        return update, bar.stop
    import sys

    state = {"next": 0.0}

    def update(done, total):
        if done / total >= state["next"] or done == total:
            print(f"verify: {done}/{total} entries", file=sys.stderr, flush=True)
            state["next"] = done / total + 0.1
    return update, lambda: None


def verify_table(report: dict):
    """The summary table of a verify report."""
    from rich.table import Table

    t = report["totals"]
    n = t["entries"]
    table = Table(title=f"memcli verify ({report['settings']['backend']})", show_header=True)
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("entries / answer tokens", f"{n:,} / {t['answer_tokens']:,}")
    table.add_row("exact match (greedy recall)", f"{t['exact']:,}  ({t['exact_match_rate']:.2%})")
    table.add_row("certified (every p > 0.5)", f"{t['certified']:,}  ({t['certified_rate']:.2%})")
    table.add_row("token accuracy (greedy)", f"{t['token_accuracy']:.2%}")
    table.add_row("answer tokens with p > 0.5", f"{t['above_threshold']:.2%}")
    table.add_row("mean answer CE (nats)", "-" if t["mean_ce"] is None else f"{t['mean_ce']:.4f}")
    if t.get("non_finite_entries"):
        table.add_row("entries with NaN/inf statistics", f"{t['non_finite_entries']:,}")
    risk = report["settings"]["risk_margin"]
    table.add_row(f"at risk (exact, margin < {risk:g} or p <= 0.5)", f"{t['at_risk']:,}")
    table.add_row("smallest target p", "-" if t["min_p"] is None else f"{t['min_p']:.4f}")
    tm = report["timings"]
    if tm.get("entries_per_s"):
        table.add_row("speed", f"{tm['entries_per_s']:,.1f} entries/s, {tm['answer_tokens_per_s']:,.0f} tokens/s")
    if tm.get("rechecked"):
        table.add_row(f"scored again as served (|margin| < {report['backend']['recheck_margin']:g})",
                      f"{tm['rechecked']:,} entries, {tm['recheck_changed']:,} verdicts changed")
    if tm.get("overhead_vs_decode") is not None:
        table.add_row("packing + scoring + report / decode", f"{tm['overhead_vs_decode']:.1%}")
    gen = report.get("generation")
    if gen:
        extra = f" ({gen['ties']} ties, {gen['near_ties']} near ties)" if gen["disagreements"] else ""
        table.add_row("greedy generation agrees", f"{gen['agree']}/{gen['entries']}{extra}")
    loc = report.get("locality")
    if loc:
        table.add_row(f"locality: next token as the base's ({loc['tokens']:,} tokens)",
                      "-" if loc["argmax_agreement"] is None else f"{loc['argmax_agreement']:.2%}")
        table.add_row("locality: KL(base || tuned), nats/token", "-" if loc["kl"] is None else f"{loc['kl']:.4f}")
        table.add_row("locality: CE of the text, base -> tuned", "-" if loc["ce_base"] is None else
                      f"{loc['ce_base']:.4f} -> {loc['ce_tuned']:.4f}")
    check = report.get("tokenizer_check")
    if check and check["mismatches"]:
        table.add_row("llama.cpp tokenises differently", f"{check['mismatches']:,} entries")
    return table


def deploy_table(rows: list[dict], totals: dict):
    """verify --deploy's survival table: one row per deployment form and type, the verified weights first."""
    from rich.table import Table

    table = Table("form", "type", "size", "exact", "certified", "at risk", "smallest margin", title="recall where "
                  "it ships (llama.cpp)")

    def margin(x):
        return "-" if x is None else f"{x:.2f}"

    n = totals["entries"]
    table.add_row("verified", "(above)", "", f"{totals['exact']}/{n}", f"{totals['certified']}/{n}",
                  str(totals["at_risk"]), margin(totals.get("min_margin")))
    for r in rows:
        table.add_row(r["form"], r["type"], f"{r['bytes'] / 2**20:.1f} MiB", f"{r['exact']}/{r['entries']}",
                      f"{r['certified']}/{r['entries']}", str(r["at_risk"]), margin(r["min_margin"]))
    return table


def print_verify_report(report: dict, corpus, out) -> None:
    """The table, the entries not recalled or at risk, generation's disagreements and PASS/FAIL, on stdout."""
    out_console.print(verify_table(report))
    s = report["settings"].get("sampler") or {}
    if s.get("name", "greedy") != "greedy":
        window = "prompt and answer" if s["prompt_in_window"] else "the answer so far"
        out_console.print(f"verdicts under the sampler {s['name']}: repeat penalty {s['repeat_penalty']}, frequency "
                          f"{s['frequency_penalty']}, presence {s['presence_penalty']} over the last "
                          f"{s['repeat_last_n']} tokens of {window}; flash attention {s.get('flash_attn', 'auto')}",
                          highlight=False)
    t = report["totals"]
    if t["failing_lines"]:
        more = " ..." if t["entries"] - t["exact"] > len(t["failing_lines"]) else ""
        out_console.print(f"not recalled: {corpus} lines {', '.join(map(str, t['failing_lines']))}{more}",
                          highlight=False)
    if t["at_risk_lines"]:
        more = " ..." if t["at_risk"] > len(t["at_risk_lines"]) else ""
        out_console.print(f"at risk: lines {', '.join(map(str, t['at_risk_lines']))}{more}", highlight=False)
    for d in (report.get("generation") or {}).get("disagreements", []):
        kind = "exact logit tie" if d["tie"] else "near tie" if d["near_tie"] else "NOT a tie"
        out_console.print(f"generation disagrees at line {d['line']}: teacher-forced first failure "
                          f"{d['teacher_forced_first_failure']}, generation {d['generated_first_divergence']}; at "
                          f"position {d['position']} the margins are {d['teacher_forced_margin']} (teacher-forced) "
                          f"and {d['generated_margin']} (generation): {kind}", highlight=False)
    if report.get("deploy"):
        out_console.print(deploy_table(report["deploy"], t))
    verdict = "PASS" if report["passed"] else "FAIL"
    min_exact = report["settings"]["min_exact"]
    if report.get("deploy"):
        worst = min([t["exact_match_rate"]] + [r["exact_match_rate"] for r in report["deploy"]])
        out_console.print(f"[bold]{verdict}[/]: worst exact match over every form {worst:.2%} (required "
                          f"{min_exact:.2%}). Report: {out}/report.json, {out}/entries.jsonl, {out}/deploy/",
                          highlight=False)
        return
    out_console.print(f"[bold]{verdict}[/]: exact match {t['exact_match_rate']:.2%} (required {min_exact:.2%}). "
                      f"Report: {out}/report.json, {out}/entries.jsonl", highlight=False)


def print_serve_check(result: dict) -> None:
    """`memcli serve-check`'s answer: served values, and against a verify report, entry by entry."""
    how = "chat completions" if result["chat"] else "completions"
    out_console.print(f"{result['url']} ({how}): served {result['served']}/{result['entries']} values verbatim",
                      highlight=False)
    a = result.get("agreement")
    if a is None:
        return
    out_console.print(f"against memcli's verdicts: {a['both']} certified and served, {a['neither']} neither; "
                      f"certified but not served: lines {a['certified_not_served'] or 'none'}; served but not "
                      f"certified: lines {a['served_not_certified'] or 'none'}", highlight=False)
    if a["not_in_report"]:
        out_console.print(f"[yellow]not in the report: lines {a['not_in_report']}[/yellow]", highlight=False)
