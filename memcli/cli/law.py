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
):
    """The smallest LoRA rank whose predicted L_final is under ln 2 (with a margin), with its interval, the
    training settings it assumes and the `memcli train` command that realises it."""
    from memcli.cli.terminal import print_plan
    from memcli.commands.law.plan import choose_law, plan_from_file

    if (corpus is None) == (tokens is None):
        raise UserError("plan needs either a CORPUS or --tokens L (not both)")
    source, entries = None, None
    if corpus is not None:
        from memcli.training.forward import base_loss

        tokens, measured, name, entries = base_loss(corpus, model, key=key, chat_template=chat_template, eos=eos,
                                                    allow_conflicting_keys=allow_conflicting_keys)
        if l_init is None:
            l_init, source = measured, f"measured on {corpus} with {name}"
    law_path, law_source = choose_law(law, model, entries)
    result = plan_from_file(law_path, tokens, l_init, margin, l_init_source=source, extrapolate=extrapolate,
                            goal=goal)
    print_plan(result, out_console, law_source or str(law_path), str(corpus) if corpus else "CORPUS")
