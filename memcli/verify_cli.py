"""The `memcli verify` and `memcli bench verify` commands: parse, call `memcli.verify` / `memcli.bench_verify`,
print. `register(app, bench_app)` adds them to memcli's Typer app; `python -m memcli.verify_cli ...` runs them
on an app of their own."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .terminal import console, out_console, user_errors

def _progress():
    """(callback(done, total), close): a Rich bar on a terminal, a plain line per ~10 % otherwise."""
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
    state = {"next": 0.0}

    def update(done, total):
        if done / total >= state["next"] or done == total:
            print(f"verify: {done}/{total} entries", file=sys.stderr, flush=True)
            state["next"] = done / total + 0.1
    return update, lambda: None


def summary_table(report: dict):
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
    if tm.get("overhead_vs_decode") is not None:
        table.add_row("packing + scoring + report / decode", f"{tm['overhead_vs_decode']:.1%}")
    gen = report.get("generation")
    if gen:
        extra = f" ({gen['ties']} ties, {gen['near_ties']} near ties)" if gen["disagreements"] else ""
        table.add_row("greedy generation agrees", f"{gen['agree']}/{gen['entries']}{extra}")
    check = report.get("tokenizer_check")
    if check and check["mismatches"]:
        table.add_row("llama.cpp tokenises differently", f"{check['mismatches']:,} entries")
    return table


def verify_command(corpus: Path, lora: Optional[Path], model: Optional[str], out: Path, backend: str,
                   n_gpu_layers: Optional[int], threads: Optional[int], batch_tokens: int, generate: int,
                   min_exact: float, answer_tokens: Optional[int], chat_template: Optional[bool], eos: Optional[bool],
                   key: Optional[str], risk_margin: float, kv_type: str, device: str,
                   allow_conflicting_keys: Optional[bool] = None) -> int:
    from .verify import VerifyOptions, verify

    options = VerifyOptions(backend=backend, n_gpu_layers=n_gpu_layers, threads=threads, batch_tokens=batch_tokens,
                            generate=generate, min_exact=min_exact, answer_tokens=answer_tokens,
                            chat_template=chat_template, eos=eos, key=key, risk_margin=risk_margin, kv_type=kv_type,
                            device=device, allow_conflicting_keys=allow_conflicting_keys)
    update, close = _progress()
    try:
        report = verify(corpus, out, lora=lora, model=model, options=options, progress=update,
                        log=lambda m: console.print(escape(m), highlight=False, soft_wrap=True))
    finally:
        close()
    out_console.print(summary_table(report))
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
    verdict = "PASS" if report["passed"] else "FAIL"
    out_console.print(f"[bold]{verdict}[/]: exact match {t['exact_match_rate']:.2%} (required {min_exact:.2%}). "
                      f"Report: {out}/report.json, {out}/entries.jsonl", highlight=False)
    return 0 if report["passed"] else 1


def register(app: typer.Typer, bench_app: typer.Typer | None = None) -> None:
    """Add `verify` to app and, when given, `verify` to the `bench` group."""

    @app.command()
    @user_errors
    def verify(
        corpus: Path = typer.Argument(..., help="Corpus to verify (the formats `train` reads)."),
        lora: Optional[Path] = typer.Option(None, "--lora", help="Run folder, PEFT adapter folder or adapter .gguf. "
                                            "Without it the base model alone is verified."),
        model: Optional[str] = typer.Option(None, help="Base model name or path (.gguf for llama.cpp, e.g. a "
                                            "quantised base). \\[default: the run's model, else smollm2-135m]"),
        out: Path = typer.Option(..., "--out", help="Report folder: report.json, entries.jsonl, a PNG."),
        backend: str = typer.Option("llama", help="llama (llama.cpp, as deployed) | torch (HF + PEFT)."),
        n_gpu_layers: Optional[int] = typer.Option(None, help="llama: layers to offload. \\[default: all when "
                                                   "llama.cpp was built with GPU support, else 0]"),
        threads: Optional[int] = typer.Option(None, help="CPU threads. \\[default: the CPUs this process may use]"),
        batch_tokens: int = typer.Option(2048, help="Tokens per forward pass (many entries packed into one)."),
        generate: int = typer.Option(0, help="Also run real greedy generation for K entries (spread over the "
                                     "corpus) and compare with the teacher-forced verdicts."),
        min_exact: float = typer.Option(1.0, help="Exit 0 when the exact-match rate is at least this, else 1."),
        answer_tokens: Optional[int] = typer.Option(None, help="Verify only the first L answer tokens (as in "
                                                    "train). \\[default: the run's setting]"),
        chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="As in "
                                                     "train. \\[default: the run's setting, else off]"),
        eos: Optional[bool] = typer.Option(None, "--eos/--no-eos", help="As in train. \\[default: the run's "
                                           "setting, else off]"),
        key: Optional[str] = typer.Option(None, help="The key of a .txt corpus. \\[default: the run's setting]"),
        risk_margin: float = typer.Option(1.0, help="An exact entry whose smallest logit margin is below this "
                                          "(or with some p <= 0.5) is reported at risk."),
        kv_type: str = typer.Option("f16", help="llama: KV cache type, f16 (llama.cpp's default) or f32."),
        device: str = typer.Option("auto", help="torch: auto | cpu | cuda[:i]."),
        allow_conflicting_keys: Optional[bool] = typer.Option(None, "--allow-conflicting-keys", help="Verify a "
                                                              "corpus that gives one key two different values "
                                                              "(refused otherwise: one of them can never be "
                                                              "recalled). \\[default: the run's setting, else off]"),
    ):
        """Check that greedy decoding recalls every value verbatim, from one teacher-forced pass (exit 0: the
        exact-match rate reaches --min-exact; 1: below; 2: bad input)."""
        code = verify_command(corpus, lora, model, out, backend, n_gpu_layers, threads, batch_tokens, generate,
                              min_exact, answer_tokens, chat_template, eos, key, risk_margin, kv_type, device,
                              allow_conflicting_keys)
        raise typer.Exit(code)

    if bench_app is not None:
        @bench_app.command("verify")
        @user_errors
        def bench_verify(
            corpus: Path = typer.Argument(..., help="Corpus to verify."),
            lora: Optional[Path] = typer.Option(None, "--lora", help="Run folder (or PEFT folder / .gguf) to "
                                                "verify; without it, the base model alone."),
            model: Optional[str] = typer.Option(None, help="Base model. \\[default: the run's, else smollm2-135m]"),
            baseline_entries: int = typer.Option(50, help="Entries the slow baselines (b, c) run on; their "
                                                 "speed is scaled to the whole corpus, and the output says so."),
            baseline_tokens: Optional[int] = typer.Option(None, help="Cap on tokens generated per entry by the "
                                                          "slow baselines (for one long value; scaled the same way)."),
            torch_entries: Optional[int] = typer.Option(None, help="Entries for (d), the torch backend. "
                                                        "\\[default: all]"),
            threads: Optional[int] = typer.Option(None, help="CPU threads for every method."),
            batch_tokens: int = typer.Option(2048, help="--batch-tokens of (a) and (d)."),
            memory_entries: str = typer.Option("250,1000", help="Two PhoneBook sizes whose peak memory is "
                                               "measured in child processes; empty to skip."),
            skip: str = typer.Option("", help="Comma-separated methods to leave out: b, c, d, kernel, memory."),
            out: Optional[Path] = typer.Option(None, "--out", help="Also write the results as JSON here."),
        ):
            """(a) memcli verify on llama.cpp against (b) transformers generate, (c) llama-cpp-python's
            high-level generation and (d) memcli's torch backend, on the same corpus: entries/s, tokens/s,
            speed-ups, verdict agreement, decode share, kernel vs numpy, peak memory."""
            from .bench_verify import run_bench

            run_bench(corpus, lora=lora, model=model, baseline_entries=baseline_entries,
                      baseline_tokens=baseline_tokens, torch_entries=torch_entries, threads=threads,
                      batch_tokens=batch_tokens, memory_entries=memory_entries,
                      skip={s.strip() for s in skip.split(",") if s.strip()}, out=out, console=out_console)


def main() -> None:
    app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False)
    bench_app = typer.Typer(no_args_is_help=True)
    app.add_typer(bench_app, name="bench")
    register(app, bench_app)
    app()


if __name__ == "__main__":
    main()
