"""`memcli bench`: parse, call, print. The benchmarks live in memcli/bench/, one module each."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.cli.terminal import console, out_console, parse_ints, user_errors
from memcli.core.errors import UserError

bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks that print side-by-side ratios.")


@bench_app.command("verify")
@user_errors
def bench_verify_cmd(
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
    from memcli.commands.bench.verify import run_bench

    run_bench(corpus, lora=lora, model=model, baseline_entries=baseline_entries,
              baseline_tokens=baseline_tokens, torch_entries=torch_entries, threads=threads,
              batch_tokens=batch_tokens, memory_entries=memory_entries,
              skip={s.strip() for s in skip.split(",") if s.strip()}, out=out, console=out_console)


@bench_app.command("kernel")
def bench_kernel_cmd(rows: int = 512, vocab: int = 49152, repeats: int = 5,
                     threads: int = typer.Option(0, help="Native worker threads; 0: one per CPU.")):
    """The native logits kernel against its numpy reference on one random block."""
    from memcli.commands.bench.kernel import bench_kernel, format_table

    out_console.print(format_table(bench_kernel(rows, vocab, repeats, threads)), highlight=False)


@bench_app.command("train")
@user_errors
def bench_train_cmd(entries: int = typer.Option(32, help="PhoneBook entries."),
                    model: Optional[str] = typer.Option(None, help="\\[default: smollm2-135m]"),
                    rank: int = 8, seed: int = 0,
                    max_epochs: int = typer.Option(400, help="Budget per method if recall never certifies."),
                    check_every: int = 5,
                    throughput_steps: int = typer.Option(30, help="Timed steps per loop."),
                    recall: bool = typer.Option(True, help="Run part (1), steps to recall per method.")):
    """Steps to certified recall for SFT / MemFT-OT / MemFT-SW, and memcli's loop against a bare PEFT loop."""
    from memcli.commands.bench.train import bench_train
    from memcli.core import models

    bench_train(entries, model or models.DEFAULT_MODEL, rank, seed, max_epochs, check_every, throughput_steps, recall)


@bench_app.command("deploy")
@user_errors
def bench_deploy_cmd(out: Path = typer.Option(..., "--out", help="Study folder: results.jsonl (resumable), runs/."),
                     entries: int = typer.Option(20, help="PhoneBook entries (generated, seed 2026)."),
                     model: Optional[str] = typer.Option(None, help="\\[default: smollm2-135m]"),
                     methods: str = typer.Option("sft,memft-ot,memft-sw", help="Comma-separated methods."),
                     variant: list[str] = typer.Option(["plain", "deploy"], help="plain | deploy (--deploy "
                                                       "--quant) | margin=M (--margin M); repeatable."),
                     seeds: str = typer.Option("0", help="Comma-separated seeds."),
                     quant: str = typer.Option("q4_k_m", help="The type `deploy` trains for."),
                     types: str = typer.Option("f16,q8_0,q6_k,q5_k_m,q4_k_m,q4_0", help="Types whose deployed "
                                               "forms are scored after each run."),
                     check_every: int = 10, max_steps: int = typer.Option(600, help="Budget per run.")):
    """Recall in the deployed files (merged and adapter, per type) after plain, --deploy and --margin training,
    with each variant's steps and time against the plain run of the same method and seed."""
    from memcli.commands.bench.deploy_study import format_summary, format_table, run_study, variant_settings
    from memcli.core import models
    from memcli.core.datagen import generate_phonebook, write_jsonl
    from memcli.core.quants import check_quant, parse_quants

    corpus = out / f"pb{entries}.jsonl"
    for v in variant:  # every input checked before any work
        variant_settings(v, check_quant(quant, "--quant"))
    parse_quants(types, "--types")
    if not corpus.exists():
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(corpus, generate_phonebook(entries, 2026))
    rows = run_study(out, corpus, model or models.DEFAULT_MODEL, [m.strip() for m in methods.split(",")], variant,
                     parse_ints(seeds, "--seeds"), quant, parse_quants(types, "--types"), check_every, max_steps,
                     log=lambda m: console.print(m, highlight=False, markup=False))
    out_console.print(format_table(rows) + "\n\n" + format_summary(rows), highlight=False)


@bench_app.command("agree")
@user_errors
def bench_agree_cmd(run: Path = typer.Argument(..., help="A finished run folder."),
                    corpus: Optional[Path] = typer.Option(None, help="The corpus to check \\[default: the run's]."),
                    limit: Optional[int] = typer.Option(None, help="Only the first N entries.")):
    """torch + PEFT vs llama.cpp (base GGUF + exported adapter): the exact-match verdict of every entry of a
    run's corpus. Exit code 1 when fewer than 99 % agree."""
    from memcli.commands.bench.agree import agreement, format_agreement

    result = agreement(run, corpus, limit)
    out_console.print(format_agreement(result), highlight=False, markup=False, soft_wrap=True)
    if result["rate"] < 0.99:
        raise typer.Exit(1)


@bench_app.command("export")
@user_errors
def bench_export_cmd(ranks: str = typer.Option("1,2,4,8,16,32,64", help="Comma-separated ranks."),
                     outtype: str = "f32", model: Optional[str] = None, repeats: int = 3):
    """Export time and adapter size per rank on the default placement."""
    from memcli.commands.bench.export import bench_export, format_table

    out_console.print(format_table(bench_export(tuple(parse_ints(ranks, "--ranks")), outtype, model, repeats)))



_OUT = typer.Option(None, "--out", help="Also write the results as JSON here.")


def _bench_result(text: str, result: dict, out: Optional[Path]) -> None:
    import json

    out_console.print(text, highlight=False, markup=False, soft_wrap=True)
    if out is not None:
        out.write_text(json.dumps(result, indent=2) + "\n")


@bench_app.command("memory")
@user_errors
def bench_memory_cmd(entries: str = typer.Option("10000,100000,1000000", help="Increasing PhoneBook sizes; one "
                                                 "fresh verify process each."),
                     model: str = typer.Option("tiny", help="Base model."),
                     lora: Optional[Path] = typer.Option(None, "--lora", help="Run folder or adapter to verify."),
                     threads: Optional[int] = None, batch_tokens: int = 2048,
                     no_decode: bool = typer.Option(False, "--no-decode", help="Stub llama.cpp's decode: the corpus "
                                                    "stream, batches, kernel, verdicts and report alone."),
                     out: Optional[Path] = _OUT):
    """Peak RSS of memcli verify against corpus size, and its growth in bytes per added entry (target < 200)."""
    from memcli.commands.bench.memory import bench_memory, format_memory

    result = bench_memory(parse_ints(entries, "--entries"), lora=lora, model=model, threads=threads,
                          batch_tokens=batch_tokens, decode=not no_decode)
    _bench_result(format_memory(result), result, out)


@bench_app.command("base")
@user_errors
def bench_base_cmd(entries: int = 200, model: Optional[str] = typer.Option(None, help="\\[default: smollm2-135m]"),
                   threads: Optional[int] = None, batch_tokens: int = 2048, out: Optional[Path] = _OUT):
    """Which base GGUF verify should decode: each candidate's speed and distance from torch float32."""
    from memcli.commands.bench.base import bench_base, format_base

    result = bench_base(entries, model, threads, batch_tokens)
    _bench_result(format_base(result), result, out)


@bench_app.command("prefix")
@user_errors
def bench_prefix_cmd(entries: int = 300, model: Optional[str] = typer.Option(None, help="\\[default: smollm2-135m]"),
                     lora: Optional[Path] = typer.Option(None, "--lora", help="An adapter GGUF."),
                     threads: Optional[int] = None, batch_tokens: int = 2048,
                     rounds: int = typer.Option(2, help="Alternating rounds; the best of each path counts."),
                     out: Optional[Path] = _OUT):
    """Chat-template PhoneBook: the shared prompt prefix decoded once against in every sequence."""
    from memcli.commands.bench.prefix import bench_prefix, format_prefix

    result = bench_prefix(entries, model, lora, threads, batch_tokens, rounds)
    _bench_result(format_prefix(result), result, out)


@bench_app.command("methods")
@user_errors
def bench_methods_cmd(
    out: Path = typer.Option(..., "--out", help="Study folder: results.jsonl (one row per run, appended as runs "
                             "finish; a rerun skips them), methods.png, runs/."),
    variant: list[str] = typer.Option(["sft", "memft-ot", "memft-sw"], "--variant", help="A method and optional "
                                      "train settings, e.g. 'memft-ot train_threshold=0.9 dropout=0'; repeat the "
                                      "option. The first is the baseline."),
    regimes: str = typer.Option("easy,starved,long", help="Comma-separated: easy, starved, long."),
    seeds: str = typer.Option("0,1,2", help="Comma-separated seeds (each seed: its own corpus and init)."),
    model: Optional[str] = typer.Option(None, help="\\[default: smollm2-135m]"),
    easy_entries: int = typer.Option(20, help="easy: PhoneBook entries (rank --easy-rank, until certified)."),
    easy_rank: int = 8,
    easy_max_epochs: int = typer.Option(300, help="easy: cap if recall never certifies."),
    check_every: int = typer.Option(5, help="easy: steps between certification checks."),
    starved_entries: int = typer.Option(32, help="starved: PhoneBook entries."),
    starved_ranks: str = typer.Option("1", help="starved: comma-separated ranks."),
    starved_epochs: int = typer.Option(60, help="starved: budget in epochs (at the defaults SFT ends between 10 "
                                       "and 60 % exact)."),
    long_tokens: int = typer.Option(256, help="long: tokens of the random value."),
    long_ranks: str = typer.Option("1,2,4,8", help="long: comma-separated ranks."),
    long_steps: int = typer.Option(200, help="long: budget in steps (batch 1)."),
):
    """Training objectives compared at the same rank, seed, batches and budget: steps to certified recall (easy),
    exact match, token accuracy, L_final and bits per parameter (starved PhoneBook, one long random value)."""
    from memcli.commands.bench.methods import Regime, plot, run_study, table_rows

    chosen = [r.strip() for r in regimes.split(",") if r.strip()]
    known = {
        "easy": Regime("easy", entries=easy_entries, ranks=(easy_rank,), epochs=easy_max_epochs,
                       check_every=check_every),
        "starved": Regime("starved", entries=starved_entries, ranks=tuple(parse_ints(starved_ranks, "--starved-ranks")),
                          epochs=starved_epochs),
        "long": Regime("long", tokens=long_tokens, ranks=tuple(parse_ints(long_ranks, "--long-ranks")),
                       steps=long_steps),
    }
    unknown = [r for r in chosen if r not in known]
    if unknown or not chosen:
        raise UserError(f"--regimes: choose from easy, starved, long (got {regimes!r})")

    def said(row):
        out_console.print(f"{row['regime']} rank {row['rank']} seed {row['seed']} {row['variant']}: exact "
                          f"{row['exact_match']:.1%}, token acc {row['token_accuracy']:.1%}, L_final "
                          f"{row['l_final']:.3f}, steps {row['steps']}, {row['wall_s']:.0f} s, locality "
                          f"{row['agreement'] if row['agreement'] is None else format(row['agreement'], '.1%')}",
                          highlight=False,
                          markup=False)

    rows = run_study([known[r] for r in chosen], variant, parse_ints(seeds, "--seeds"), out, model, said)
    from rich.table import Table

    table = Table("regime", "rank", "variant", "seeds", "exact", "token acc", "L_final", "1st exact",
                  "steps to cert.", "wall s", "bits/param", ">= baseline", "locality", "KL")
    for r in table_rows(rows):
        first, steps = ("-" if v is None else f"{v:g}" for v in (r["first_exact_step"], r["steps_to_certified"]))
        table.add_row(r["regime"], str(r["rank"]), r["variant"], str(r["seeds"]), f"{r['exact_match']:.1%}",
                      f"{r['token_accuracy']:.1%}", f"{r['l_final']:.3f}", first, steps, f"{r['wall_s']:.0f}",
                      f"{r['bits_per_param']:.3f}", r["matches_baseline"],
                      "-" if r["agreement"] is None else f"{r['agreement']:.1%}",
                      "-" if r["kl"] is None else f"{r['kl']:.3f}")
    from rich.console import Console

    # piped output defaults to 80 columns, too narrow for fourteen: print the table wider there
    (out_console if out_console.is_terminal else Console(width=170)).print(table)
    out_console.print(f"medians over seeds; rows in {out / 'results.jsonl'}; plot {plot(rows, out / 'methods.png')}")


@bench_app.command("settings")
@user_errors
def bench_settings_cmd(
    out: Path = typer.Option(..., "--out", help="Study folder: results.jsonl (one row per run, appended as runs "
                             "finish; a rerun skips them), settings.png, runs/ (with --keep-runs)."),
    corpus: list[str] = typer.Option(..., "--corpus", help="NAME=FILE, a corpus to train on; repeat the option."),
    variant: list[str] = typer.Option(["default"], "--variant", help="'NAME: setting=value ...', train's defaults "
                                      "changed by these settings, e.g. 'fast: lr=0.02 dropout=0'; repeat the "
                                      "option. The first is the baseline."),
    seeds: str = typer.Option("0", help="Comma-separated training seeds."),
    model: Optional[str] = typer.Option(None, help="\\[default: smollm2-135m]"),
    keep_runs: bool = typer.Option(False, "--keep-runs", help="Keep every run folder in OUT/runs/."),
):
    """Entries trained on and time until recall is certified (`train --until-recall`, within train's budget) for
    variants of train's settings, against the first variant on the same corpus and seed."""
    from memcli.commands.bench.settings_study import Variant, format_summary, plot_curves, run_study
    from memcli.core import models

    corpora = {}
    for item in corpus:
        name, eq, path = item.partition("=")
        if not eq or not name or not Path(path).is_file():
            raise UserError(f"--corpus '{item}': give NAME=FILE with an existing file")
        if name in corpora:
            raise UserError(f"--corpus: two corpora are named '{name}'")
        corpora[name] = Path(path)
    variants = [Variant.parse(v) for v in variant]
    if len({v.name for v in variants}) != len(variants):
        raise UserError("--variant: two variants have the same name")
    rows = run_study(out, corpora, variants, parse_ints(seeds, "--seeds"), model or models.DEFAULT_MODEL,
                     keep_runs, log=lambda m: console.print(m, highlight=False, markup=False))
    plot = plot_curves(rows, [v.name for v in variants], out / "settings.png")
    out_console.print(format_summary(rows, variants[0].name) + f"\n\nrows in {out / 'results.jsonl'}; plot {plot}",
                      highlight=False, markup=False)
