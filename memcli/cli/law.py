"""`memcli fit` and `memcli plan`: the memory law; parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.cli.terminal import out_console, user_errors
from memcli.commands.law import points as law_defaults
from memcli.core.errors import UserError


@user_errors
def fit(
    inputs: list[Path] = typer.Argument(..., help="Sweep folders, run folders, or CSV/JSONL tables with rank (or "
                                        "params), length, delta_l and optionally l_final."),
    capacity: str = typer.Option(law_defaults.CAPACITY, help="Capacity variable x: rank | params."),
    out: Path = typer.Option(Path(law_defaults.LAW_FILE), "--out",
                             help="Law file to write; PNG plots go beside it."),
    n_boot: int = typer.Option(law_defaults.N_BOOT, help="Bootstrap resamples for the intervals."),
    level: float = typer.Option(law_defaults.LEVEL, help="Interval level."),
    seed: int = typer.Option(law_defaults.BOOT_SEED, help="Bootstrap seed."),
    plots: bool = typer.Option(True, help="Write pred_vs_obs.png and delta_l_vs_l.png."),
):
    """Fit dL = C x^alpha l^-beta + b to training runs (saturated runs, L_final <= ln 2, are dropped)."""
    from memcli.cli.terminal import print_fit, print_written
    from memcli.commands.law.fit import fit_and_save

    law, written = fit_and_save(inputs, capacity, out, n_boot, seed, plots, level=level)
    print_fit(law, out_console)
    print_written([out, *written], out_console)


@user_errors
def plan(
    corpus: Optional[Path] = typer.Argument(None, help="Corpus to plan for: L_init is measured on it with the "
                                            "base model, l is its answer tokens."),
    law: Optional[str] = typer.Option(None, "--law", help="law.json from `memcli fit`, or a law shipped for the "
                                      "model: phonebook | random. \\[default: the model's shipped law for the "
                                      "corpus's shape: random for one value, phonebook for several entries]"),
    tokens: Optional[int] = typer.Option(None, help="Plan for l answer tokens instead of a corpus."),
    l_init: Optional[float] = typer.Option(None, help="L_init in nats (default: measured on CORPUS, else the "
                                           "median of the fitted runs)."),
    margin: float = typer.Option(law_defaults.MARGIN,
                                 help="Safety margin: predicted L_final must be <= ln 2 - margin."),
    goal: str = typer.Option(law_defaults.GOAL, help="recall: aim at the predicted L_final under which every run "
                             "of the law recalled >= 95 % of its entries, and train at least the rank its runs "
                             "recalled at the next measured length (when the law knows them) | loss: ln 2 - "
                             "margin only (the paper's)."),
    extrapolate: bool = typer.Option(False, "--extrapolate", help="Answer for a length outside the lengths the "
                                     "law was measured on, or with a rank above the ranks it measured (refused "
                                     "without it)."),
    model: Optional[str] = typer.Option(None, help="Base model for measuring L_init and for its shipped laws. "
                                        "\\[default: smollm2-135m]"),
    chat_template: bool = typer.Option(False, "--chat-template", help="As in train."),
    eos: bool = typer.Option(False, "--eos", help="As in train."),
    key: str = typer.Option("", help="As in train."),
    allow_conflicting_keys: bool = typer.Option(False, "--allow-conflicting-keys", help="As in train."),
    probe: bool = typer.Option(False, "--probe", help="Fit the law on CORPUS itself instead of a shipped one: "
                               "train a small sweep on nested prefixes of it (--probe-ranks x --probe-shares, "
                               "train's defaults, until certified), fit it and extrapolate to the whole corpus; "
                               "for any model memcli trains. Says what the probe cost."),
    probe_out: Optional[Path] = typer.Option(None, "--probe-out", help="The probe's sweep folder (a rerun "
                                             "continues it). \\[default: probe-<corpus name>]"),
    probe_ranks: str = typer.Option(",".join(map(str, law_defaults.PROBE_RANKS)), help="The probe's LoRA ranks."),
    probe_shares: str = typer.Option(",".join(map(str, law_defaults.PROBE_SHARES)), help="The probe's prefixes: "
                                     "shares of the corpus's answer tokens."),
    force: bool = typer.Option(False, "--force", help="With --probe: retrain the probe's runs that were trained "
                               "with other settings (a probe folder made before a change of train's defaults; "
                               "without it such a folder is refused)."),
):
    """The smallest LoRA rank whose predicted L_final is under ln 2 (with a margin), with its interval, the
    training settings it assumes and the `memcli train` command that realises it."""
    from memcli.cli.terminal import parse_floats, parse_ints, print_plan
    from memcli.commands.law.plan import choose_law, plan_from_file

    if (corpus is None) == (tokens is None):
        raise UserError("plan needs either a CORPUS or --tokens L (not both)")
    if probe and (corpus is None or law is not None):
        raise UserError("--probe fits the law on a CORPUS: give one, and no --law or --tokens")
    if force and not probe:
        raise UserError("--force retrains a probe's stale runs: it goes with --probe")
    ranks, shares = parse_ints(probe_ranks, "--probe-ranks"), parse_floats(probe_shares, "--probe-shares")
    corpus_options = dict(key=key, chat_template=chat_template, eos=eos, allow_conflicting_keys=allow_conflicting_keys)
    source, measured, probed = None, None, None
    if corpus is not None:
        from memcli.training.forward import base_loss

        measured = base_loss(corpus, model, **corpus_options)
        tokens = measured.tokens
        if l_init is None:
            l_init, source = measured.l_init, f"measured on {corpus} with {measured.model}"
    if probe:
        probed = _probe(corpus, measured, model, corpus_options, probe_out or Path(f"probe-{corpus.stem}"), ranks,
                        shares, force)
        if probed.whole_rank is not None:
            from memcli.cli.terminal import print_measured_rank

            print_measured_rank(probed, str(corpus), measured.tokens, measured.entries, out_console)
            return
        law_path, law_source = probed.law, f"fitted by the probe on prefixes of {corpus} ({probed.law})"
    else:
        law_path, law_source = choose_law(law, model, measured.entries if measured else None)
    result = plan_from_file(law_path, tokens, l_init, margin, l_init_source=source,
                            extrapolate=extrapolate or probe, goal=goal)
    print_plan(result, out_console, law_source or str(law_path), str(corpus) if corpus else "CORPUS")
    if probed is not None:
        out_console.print(probed.cost_sentence(measured.tokens, result.settings or {}, measured.entries),
                          highlight=False)


def _probe(corpus: Path, measured, model: str | None, corpus_options: dict, out: Path, ranks: list[int],
           shares: list[float], force: bool):
    """plan --probe: train the probe's sweep in train's protocol and fit its law (a Probe)."""
    from memcli.cli.terminal import console
    from memcli.commands.law.probe import run_probe
    from memcli.training.config import TrainConfig

    base = TrainConfig.from_sources(None, dict(corpus=str(corpus), model=model or TrainConfig.model,
                                               **corpus_options))

    def done(name, summary, n, total):
        console.print(f"probe [{n}/{total}] {name}: exact match {summary['exact_match']:.2%}, L_final "
                      f"{summary['l_final']:.4f}, {summary['steps']} steps, {summary['wall_seconds']:.0f} s",
                      highlight=False)
    return run_probe(base, measured.tokens, measured.first_tokens, out, ranks, shares,
                     log=lambda m: console.print(m, markup=False), on_done=done, force=force)
