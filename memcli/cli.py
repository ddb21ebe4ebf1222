"""The `memcli` command line: parse, call, print. The work lives in the modules it calls."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memorise a corpus into a LoRA adapter (MemFT), verify verbatim recall, plan adapter capacity.")
data_app = typer.Typer(no_args_is_help=True, help="Generate benchmark corpora.")
app.add_typer(data_app, name="data")
console = Console(stderr=True)
out_console = Console()


def user_errors(fn):
    """Bad input ends in one clear line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
        except ValueError as e:  # the law module's LawError is a ValueError
            if type(e).__name__ != "LawError":
                raise
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper


def write_jsonl_atomic(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    os.replace(tmp, path)


def parse_ints(text: Optional[str], name: str) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{name} takes comma-separated integers, got '{text}'") from None


# --- models, data ------------------------------------------------------------------------------------------

@app.command("models")
@user_errors
def models_cmd():
    """List the named models and where their weights come from."""
    from rich.table import Table

    from . import models

    table = Table("name", "weights", "description")
    for name, status, description in models.describe():
        table.add_row(name + (" (default)" if name == models.DEFAULT_MODEL else ""), status, description)
    out_console.print(table)
    out_console.print("Also accepted: a local Hugging Face model folder (llama, qwen2, mistral) or a .gguf file.")


@data_app.command("phonebook")
@user_errors
def data_phonebook(entries: int = typer.Option(100, help="Number of entries."),
                   seed: int = typer.Option(0, help="Random seed."),
                   out: Path = typer.Option(..., help="Output JSONL file.")):
    """A PhoneBook corpus: unique "First Last:" keys, unique 10-digit numbers starting with 6-9."""
    from .corpus import generate_phonebook

    write_jsonl_atomic(out, generate_phonebook(entries, seed))
    console.print(f"wrote {entries} entries to {out}")


@data_app.command("random")
@user_errors
def data_random(tokens: int = typer.Option(..., help="Length of the value in tokens."),
                seed: int = typer.Option(0, help="Random seed."),
                model: str = typer.Option(None, help="Model whose vocabulary to draw from (default smollm2-135m)."),
                out: Path = typer.Option(..., help="Output JSONL file.")):
    """One value of N random vocabulary tokens, as text that re-tokenises to the same ids."""
    from . import models
    from .corpus import generate_random_tokens

    tokenizer = models.load_tokenizer(models.resolve(model))
    write_jsonl_atomic(out, [generate_random_tokens(tokens, seed, tokenizer)])
    console.print(f"wrote one value of {tokens} random tokens to {out}")


# --- train -------------------------------------------------------------------------------------------------

def progress_printer(total_steps: int):
    """A Rich progress bar on a terminal, plain lines at check steps otherwise. Returns (callback, close)."""
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
    return update, lambda: None


@app.command()
@user_errors
def train(
    corpus: Path = typer.Argument(..., help="Corpus: JSONL (query/target, question/matching, prompt/completion, "
                                  "key/value) or a .txt file (one value)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    model: Optional[str] = typer.Option(None, help="Model name (see `memcli models`) or path. [default: smollm2-135m]"),
    config: Optional[Path] = typer.Option(None, help="YAML file of settings; command-line options override it."),
    method: Optional[str] = typer.Option(None, help="sft | memft-ot | memft-sw. [default: memft-ot]"),
    no_hard_tokens: Optional[str] = typer.Option(None, help="memft-ot with no token above threshold in a batch: "
                                                 "fallback (plain mean) | skip (no update). [default: fallback]"),
    sw_form: Optional[str] = typer.Option(None, help="memft-sw: spatial (one long value) | temporal (curriculum "
                                          "over many entries) | auto (by corpus shape). [default: auto]"),
    curriculum_epochs: Optional[str] = typer.Option(None, help="memft-sw temporal: epochs where exposure grows "
                                                    "from 20/40/60/80 % to the next. [default: 20,40,60,80]"),
    rank: Optional[int] = typer.Option(None, help="LoRA rank. [default: 8]"),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices. [default: the middle layer]"),
    modules: Optional[str] = typer.Option(None, help="Comma-separated module names, or all-linear. "
                                          "[default: gate_proj,up_proj,down_proj]"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha. [default: rank, i.e. scale 1]"),
    dropout: Optional[float] = typer.Option(None, help="LoRA dropout. [default: 0.1]"),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate, decayed linearly to 0. [default: 1e-2]"),
    weight_decay: Optional[float] = typer.Option(None, help="[default: 0]"),
    clip: Optional[float] = typer.Option(None, help="Gradient-norm clipping. [default: 1.0]"),
    epochs: Optional[int] = typer.Option(None, help="Training budget in epochs. [default: 200]"),
    max_steps: Optional[int] = typer.Option(None, help="Training budget in steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="[default: 16]"),
    seed: Optional[int] = typer.Option(None, help="[default: 0]"),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:i]. [default: auto]"),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 for the base weights "
                                        "(the adapter stays float32). [default: auto]"),
    until_recall: Optional[bool] = typer.Option(None, "--until-recall", help="Stop as soon as every answer token "
                                                "of every entry has p > 0.5 (certified recall)."),
    check_every: Optional[int] = typer.Option(None, help="Steps between clean recall checks. [default: 10]"),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints. [default: 50]"),
    log_every: Optional[int] = typer.Option(None, help="Steps between metrics lines. [default: 1]"),
    answer_tokens: Optional[int] = typer.Option(None, help="Memorise only the first L answer tokens."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template", help="Wrap keys in the model's chat "
                                                 "template (system prompt 'You are a helpful assistant.')."),
    eos: Optional[bool] = typer.Option(None, "--eos", help="Also learn EOS after each value."),
    key: Optional[str] = typer.Option(None, help="The key of a .txt corpus. [default: empty]"),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder from its newest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
):
    """Memorise CORPUS into a LoRA adapter; writes a run folder (see README: Run folder)."""
    from .train import TrainConfig, Trainer

    overrides = dict(corpus=str(corpus), model=model, method=method, no_hard_tokens=no_hard_tokens, sw_form=sw_form,
                     curriculum_epochs=parse_ints(curriculum_epochs, "--curriculum-epochs"), rank=rank,
                     layers=parse_ints(layers, "--layers"),
                     modules=[m.strip() for m in modules.split(",")] if modules else None,
                     alpha=alpha, dropout=dropout, lr=lr, weight_decay=weight_decay, clip=clip, epochs=epochs,
                     max_steps=max_steps, batch_size=batch_size, seed=seed, device=device, dtype=dtype,
                     until_recall=until_recall, check_every=check_every, checkpoint_every=checkpoint_every,
                     log_every=log_every, answer_tokens=answer_tokens, chat_template=chat_template, eos=eos, key=key)
    cfg = TrainConfig.from_sources(config, overrides)
    trainer = Trainer(cfg, out, resume=resume, force=force, log=lambda m: console.print(m, highlight=False))
    update, close = progress_printer(trainer.total_steps)
    try:
        summary = trainer.run(update)
    finally:
        close()
    verdict = "certified recall of every entry" if summary["all_certified"] else "recall NOT certified"
    console.print(
        f"[bold]{verdict}[/]: exact match {summary['exact_match']:.2%}, certified {summary['certified']:.2%}, "
        f"L {summary['l_init']:.4f} -> {summary['l_final']:.4f} (dL {summary['delta_l']:.4f}) in {summary['steps']} "
        f"steps, {summary['wall_seconds']:.1f} s ({summary['stop_reason']}). Run folder: {out}", highlight=False)
