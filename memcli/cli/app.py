"""The `memcli` command line: parse, call, print. The work lives in the modules it calls."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from memcli.cli.bench import bench_app
from memcli.cli.terminal import console, out_console, parse_ints, train_progress, user_errors
from memcli.commands.law import points as law_defaults
from memcli.commands.verify.run import VerifyOptions
from memcli.core.errors import UserError
from memcli.core.models import SUPPORTED_TYPES
from memcli.llama.sampler import PRESETS, sampler_from_options

FAMILIES = ", ".join(SUPPORTED_TYPES)  # the model families memcli trains and exports (memcli.core.models)

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Memorise a corpus into a LoRA adapter (MemFT), verify verbatim recall, plan adapter capacity.")
data_app = typer.Typer(no_args_is_help=True, help="Generate benchmark corpora.")
app.add_typer(data_app, name="data")


def _default(name: str) -> str:
    """' [default: X]' from TrainConfig, the one place train's defaults are written (escaped: Rich markup)."""
    from memcli.training.config import TrainConfig

    value = getattr(TrainConfig(), name)
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f" \\[default: {shown}]"


# --- models, data ------------------------------------------------------------------------------------------

@app.command("models")
@user_errors
def models_cmd():
    """List the named models and where their weights come from."""
    from rich.table import Table

    from memcli.core import models

    table = Table("name", "weights", "description")
    for name, status, description in models.describe():
        table.add_row(name + (" (default)" if name == models.DEFAULT_MODEL else ""), status, description)
    out_console.print(table)
    out_console.print(f"Also accepted: a local Hugging Face model folder ({FAMILIES}) or a .gguf file.")


@app.command()
@user_errors
def doctor(probe: bool = typer.Option(False, "--probe", help="On a CPU with AMX, test-load the default model "
                                      "in a child process to see whether llama.cpp's AMX path works here."),
           as_json: bool = typer.Option(False, "--json", help="Print the report as JSON.")):
    """What this installation and machine are: versions, llama.cpp's build and features, CPU features (AVX2,
    AVX-512, AMX), GPU offload, torch's device, the model cache. Paste it into bug reports."""
    import json

    from rich.table import Table

    from memcli.cli.doctor import collect, lines

    report = collect(probe)
    if as_json:
        print(json.dumps(report, indent=2))
        return
    table = Table("", "", show_header=False, box=None)
    for label, value in lines(report):
        table.add_row(label, value)
    out_console.print(table, highlight=False)


@data_app.command("phonebook")
@user_errors
def data_phonebook(entries: int = typer.Option(100, help="Number of entries."),
                   seed: int = typer.Option(0, help="Random seed."),
                   out: Path = typer.Option(..., help="Output JSONL file.")):
    """A PhoneBook corpus: unique "First Last:" keys, unique 10-digit numbers starting with 6-9."""
    from memcli.core.datagen import generate_phonebook, write_jsonl

    write_jsonl(out, generate_phonebook(entries, seed))
    console.print(f"wrote {entries} entries to {out}")


@data_app.command("random")
@user_errors
def data_random(tokens: int = typer.Option(..., help="Length of the value in tokens."),
                seed: int = typer.Option(0, help="Random seed."),
                model: str = typer.Option(None, help="Model whose vocabulary to draw from (default smollm2-135m)."),
                out: Path = typer.Option(..., help="Output JSONL file.")):
    """One value of N random vocabulary tokens, as text that re-tokenises to the same ids."""
    from memcli.core import models
    from memcli.core.datagen import generate_random_tokens, write_jsonl

    tokenizer = models.load_tokenizer(models.resolve(model))
    write_jsonl(out, [generate_random_tokens(tokens, seed, tokenizer)])
    console.print(f"wrote one value of {tokens} random tokens to {out}")


# --- train -------------------------------------------------------------------------------------------------

def train_config(params: dict):
    """A TrainConfig from `train`'s parsed options: defaults < --config YAML < the command line."""
    from memcli.training.config import TrainConfig

    overrides = {k: v for k, v in params.items() if k not in ("out", "config", "resume", "force")}
    overrides.update(corpus=str(params["corpus"]),
                     preserve_text=str(params["preserve_text"]) if params.get("preserve_text") else None,
                     curriculum_epochs=parse_ints(params["curriculum_epochs"], "--curriculum-epochs"),
                     layers=parse_ints(params["layers"], "--layers"),
                     modules=[m.strip() for m in params["modules"].split(",")] if params["modules"] else None)
    return TrainConfig.from_sources(params["config"], overrides)


@app.command()
@user_errors
def train(
    corpus: Path = typer.Argument(..., help="Corpus: JSONL (query/target, question/matching, prompt/completion, "
                                  "key/value) or a .txt file (one value)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write."),
    model: Optional[str] = typer.Option(None, help="Model name (see `memcli models`) or path." + _default("model")),
    config: Optional[Path] = typer.Option(None, help="YAML file of settings; command-line options override it."),
    method: Optional[str] = typer.Option(None, help="sft | memft-ot | memft-sw. Measured on the default model: "
                                         "memft-ot recalls the most of a PhoneBook at a short rank, sft certifies "
                                         "a small corpus at a generous rank soonest, memft-sw holds the longest "
                                         "prefix of one long value at a low rank (docs/measurements.md: MemFT "
                                         "against SFT)."
                                         + _default("method")),
    no_hard_tokens: Optional[str] = typer.Option(None, help="memft-ot with no token above threshold in a batch: "
                                                 "fallback (plain mean) | skip (no update)."
                                                 + _default("no_hard_tokens")),
    train_threshold: Optional[float] = typer.Option(None, help="memft-ot: train a token while its p is at or below "
                                                    "this (certification stays p > 0.5)."
                                                    + _default("train_threshold")),
    floor: Optional[float] = typer.Option(None, help="memft-ot: weight kept by a token above --train-threshold."
                                          + _default("floor")),
    sw_form: Optional[str] = typer.Option(None, help="memft-sw: spatial (one long value) | temporal (curriculum "
                                          "over many entries) | auto (by corpus shape)." + _default("sw_form")),
    curriculum_epochs: Optional[str] = typer.Option(None, help="memft-sw temporal: epochs where exposure grows "
                                                    "from 20/40/60/80 % to the next." + _default("curriculum_epochs")),
    rank: Optional[int] = typer.Option(None, help="LoRA rank." + _default("rank")),
    layers: Optional[str] = typer.Option(None, help="Comma-separated layer indices. \\[default: the middle layer]"),
    modules: Optional[str] = typer.Option(None, help="Comma-separated module names, or all-linear. Llama, Mistral, "
                                          "Qwen, Gemma 3: q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj; "
                                          "Phi-3: qkv_proj,o_proj,gate_up_proj,down_proj (fused, adapted whole). "
                                          "\\[default: the middle layer's MLP: gate_proj,up_proj,down_proj; Phi-3: "
                                          "gate_up_proj,down_proj]"),
    alpha: Optional[float] = typer.Option(None, help="LoRA alpha. \\[default: rank, i.e. scale 1]"),
    dropout: Optional[float] = typer.Option(None, help="LoRA dropout." + _default("dropout")),
    preserve: Optional[bool] = typer.Option(None, "--preserve/--no-preserve", help="Add weight x KL(base || "
                                            "tuned) on a small replay batch of unrelated text to every step, so the "
                                            "model still predicts what it did before (docs/locality.md)."
                                            + _default("preserve")),
    preserve_weight: Optional[float] = typer.Option(None, help="The preserve term's weight."
                                                    + _default("preserve_weight")),
    preserve_text: Optional[Path] = typer.Option(None, help="The replay text of --preserve (a UTF-8 file). "
                                                 "\\[default: the base model's own continuations of short prompts]"),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate, decayed linearly to 0." + _default("lr")),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay." + _default("weight_decay")),
    clip: Optional[float] = typer.Option(None, help="Gradient-norm clipping." + _default("clip")),
    epochs: Optional[int] = typer.Option(None, help="Training budget in epochs." + _default("epochs")),
    max_steps: Optional[int] = typer.Option(None, help="Training budget in steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Entries per step." + _default("batch_size")),
    seed: Optional[int] = typer.Option(None, help="Seed of the adapter, the order and dropout." + _default("seed")),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:i]." + _default("device")),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 for the base weights "
                                        "(the adapter stays float32)." + _default("dtype")),
    until_recall: Optional[bool] = typer.Option(None, "--until-recall", help="Stop as soon as every answer token "
                                                "of every entry has p > 0.5 (certified recall)."),
    check_every: Optional[int] = typer.Option(None, help="Steps between clean recall checks."
                                              + _default("check_every")),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints."
                                                   + _default("checkpoint_every")),
    log_every: Optional[int] = typer.Option(None, help="Steps between metrics lines." + _default("log_every")),
    answer_tokens: Optional[int] = typer.Option(None, help="Memorise only the first L answer tokens."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template", help="Wrap keys in the model's chat "
                                                 "template as servers render a chat request (the key as the user's "
                                                 "message, the template's own default system prompt unless "
                                                 "--system-prompt, the generation prompt); the value ends with the "
                                                 "template's end-of-turn token (--no-eos: not)."),
    system_prompt: Optional[str] = typer.Option(None, help="With --chat-template: the system message your clients "
                                                "send. \\[default: none, the template's default applies]"),
    eos: Optional[bool] = typer.Option(None, "--eos/--no-eos", help="Also learn the end token after each value: "
                                       "EOS, or with --chat-template the end of turn. \\[default: on with "
                                       "--chat-template, else off]"),
    key: Optional[str] = typer.Option(None, help="The key of a .txt corpus. \\[default: empty]"),
    allow_conflicting_keys: Optional[bool] = typer.Option(None, "--allow-conflicting-keys", help="Train on a corpus "
                                                          "that gives one key two different values (refused "
                                                          "otherwise: such an entry can never be recalled)."),
    deploy: Optional[str] = typer.Option(None, help="A llama.cpp file type (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...): "
                                         "train so that recall holds in the files users ship, the adapter over "
                                         "the base quantised to it and the adapter merged and quantised (base "
                                         "weights as quantised, the merged layer quantised in the loop); "
                                         "--until-recall stops when llama.cpp certifies both. The certified "
                                         "merged file is kept in RUN/deploy/."),
    margin: Optional[float] = typer.Option(None, help="Certify a token only when its logit leads the runner-up's by "
                                           "at least this (memft-ot trains it until it does): a safety margin "
                                           "against rounding in other runtimes." + _default("margin")),
    sampler: Optional[str] = typer.Option(None, help="Also train for a runner's default decoding at temperature 0 "
                                          f"({' | '.join(PRESETS)}): the objective sees its penalised logits, and "
                                          "--until-recall stops when recall is certified under it and under plain "
                                          "greedy (docs/deploy.md)." + _default("sampler")),
    repeat_penalty: Optional[float] = typer.Option(None, help="With --sampler: its repeat penalty (1 = off). "
                                                   "\\[default: the preset's]"),
    repeat_last_n: Optional[int] = typer.Option(None, help="With --sampler: tokens the penalties look back over "
                                                "(0 = off). \\[default: the preset's]"),
    frequency_penalty: Optional[float] = typer.Option(None, help="With --sampler. \\[default: the preset's]"),
    presence_penalty: Optional[float] = typer.Option(None, help="With --sampler. \\[default: the preset's]"),
    gguf: Optional[str] = typer.Option(None, help="adapter.gguf for llama.cpp: auto (written when the model can be "
                                       "exported; otherwise said before step 1 and left out) | require (refuse "
                                       "before training when it cannot) | off." + _default("gguf")),
    resume: bool = typer.Option(False, "--resume", help="Continue the run folder from its newest checkpoint."),
    force: bool = typer.Option(False, "--force", help="Replace an existing run folder."),
):
    """Memorise CORPUS into a LoRA adapter; writes a run folder (docs/commands.md: Files)."""
    cfg = train_config(locals())  # first: locals() is exactly the parsed options here
    from memcli.training.trainer import Trainer

    trainer = Trainer(cfg, out, resume=resume, force=force,
                      log=lambda m: console.print(m, highlight=False, markup=False))
    update, close = train_progress(trainer.total_steps)
    try:
        summary = trainer.run(update)
    finally:
        close()
    verdict = "certified recall of every entry" if summary["all_certified"] else "recall NOT certified"
    console.print(
        f"[bold]{verdict}[/]: exact match {summary['exact_match']:.2%}, certified {summary['certified']:.2%}, "
        f"L {summary['l_init']:.4f} -> {summary['l_final']:.4f} (dL {summary['delta_l']:.4f}) in {summary['steps']} "
        f"steps, {summary['wall_seconds']:.1f} s ({summary['stop_reason']}). Run folder: {out}", highlight=False)


# --- export ------------------------------------------------------------------------------------------------

@app.command()
@user_errors
def export(src: Path = typer.Argument(..., help="A run folder or a PEFT adapter folder."),
           out: Path = typer.Option(..., "--out", help="The GGUF to write: the adapter, or with --merge the model."),
           outtype: str = typer.Option("f32", help="f32 | f16 | q8_0 for the LoRA tensors of an adapter."),
           merge: bool = typer.Option(False, "--merge", help="Write one self-contained model instead: the base with "
                                      "the adapter merged in (float32), tokenizer included."),
           quant: Optional[str] = typer.Option(None, help="With --merge: the file type, by llama.cpp's names (f16, "
                                               "bf16, q8_0, q6_k, q5_k_m, q5_0, q4_k_m, q4_0, q3_k_m, ...), made by "
                                               "llama.cpp's quantiser. \\[default: f16]"),
           modelfile: bool = typer.Option(False, "--modelfile", help="Also write an ollama Modelfile beside --out "
                                          "(FROM the base + ADAPTER, or FROM the merged model)."),
           model: Optional[str] = typer.Option(None, help="The base model, when the folder does not say.")):
    """Write a LoRA adapter as a llama.cpp adapter GGUF (q/k permuted, PEFT's scale reproduced exactly), or with
    --merge as one deployable model GGUF (merged, then quantised by llama.cpp)."""
    from memcli.core import models

    base = models.resolve(model) if model else None
    if quant is not None and not merge:
        raise UserError("--quant applies to --merge (an adapter's own tensors take --outtype)")
    if merge:
        from memcli.core.quants import check_quant
        from memcli.gguf.merge import export_merged

        info = export_merged(src, out, check_quant(quant or "f16", "--quant"), base=base)
        console.print(f"wrote {out}: {info['model']} with {info['merged']} adapted tensors merged, {info['type']}, "
                      f"{info['bytes'] / 2**20:.1f} MiB, {info['seconds']:.1f} s", highlight=False)
        _print_quantised(info)
    else:
        from memcli.gguf.adapter import export_adapter

        info = export_adapter(src, out, outtype, base=base)
        console.print(f"wrote {out}: {info['tensors']} tensors, {info['bytes'] / 1024:.1f} KiB, base "
                      f"{info['model']}, {info['seconds']:.2f} s", highlight=False)
    if modelfile:
        from memcli.deploy.forms import write_modelfile

        path = write_modelfile(out, merged=merge, model=info["model"])
        console.print(f"wrote {path}: ollama create NAME -f {path}", highlight=False)


def _print_quantised(info: dict) -> None:
    """What llama.cpp's quantiser chose: its tensor types, and the tensors it had to fall back for."""
    from memcli.llama.quantize import describe_fallbacks

    if info.get("tensor_types"):
        console.print("tensor types: " + ", ".join(f"{t} {n}" for t, n in info["tensor_types"].items()),
                      highlight=False)
    fallback = describe_fallbacks(info.get("fallbacks", []))
    if fallback:
        console.print(f"llama.cpp's quantiser fell back: {fallback}", highlight=False)


@app.command("export-base")
@user_errors
def export_base_cmd(hf_dir: str = typer.Argument(..., help=f"An HF model folder ({FAMILIES}) or a memcli "
                                                 "model name."),
                    out: Path = typer.Option(..., "--out", help="The base GGUF to write."),
                    outtype: str = typer.Option("f32", help="f32 | f16 | q8_0, written by memcli."),
                    quant: Optional[str] = typer.Option(None, help="Instead of --outtype: any of llama.cpp's file "
                                                        "types (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...), made by "
                                                        "llama.cpp's quantiser: the base to deploy an adapter "
                                                        "over.")):
    """Write an HF model as a llama.cpp base GGUF, tokenizer included."""
    if quant is not None:
        from memcli.core.quants import check_quant
        from memcli.gguf.merge import export_quantised

        info = export_quantised(hf_dir, out, check_quant(quant, "--quant"))
        console.print(f"wrote {out}: {info['model']}, {info['type']}, {info['bytes'] / 2**20:.1f} MiB, "
                      f"{info['seconds']:.1f} s", highlight=False)
        _print_quantised(info)
        return
    from memcli.gguf.base import export_base

    info = export_base(hf_dir, out, outtype)
    console.print(f"wrote {out}: {info['arch']} {info['name']}, {info['tensors']} tensors, "
                  f"{info['bytes'] / 2**20:.1f} MiB, {info['seconds']:.1f} s", highlight=False)


@app.command()
@user_errors
def ask(target: Path = typer.Argument(..., help="A run folder, a model .gguf (e.g. a merged file) or an adapter "
                                      ".gguf."),
        prompt: str = typer.Argument(..., help="The prompt, e.g. a key: \"Ada Okafor:\"."),
        model: Optional[str] = typer.Option(None, help="The base for a run or an adapter .gguf (a .gguf, e.g. a "
                                            "quantised base, or a model name). \\[default: the run's model as "
                                            "deployed: the shipped GGUF of a model shipped quantised]"),
        max_tokens: int = typer.Option(48, help="Most tokens to generate."),
        chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap the "
                                                     "prompt in the chat template. \\[default: the run's setting]"),
        stop_newline: bool = typer.Option(True, "--stop-newline/--no-stop-newline", help="Stop at a newline."),
        n_gpu_layers: Optional[int] = typer.Option(None, help="Layers to offload. \\[default: all with GPU "
                                                   "support]")):
    """The greedy completion of PROMPT in llama.cpp (llama-cpp-python's own generation, not memcli's scorer)."""
    from memcli.commands.ask import ask as run_ask

    result = run_ask(target, prompt, model=model, max_tokens=max_tokens, chat_template=chat_template,
                     stop_newline=stop_newline, n_gpu_layers=n_gpu_layers)
    print(prompt + result["completion"])
    console.print(f"({result['tokens']} tokens, stopped at {result['stopped']}; {result['model']}"
                  f"{' + ' + result['adapter'] if result['adapter'] else ''})", highlight=False)


@app.command("serve-check")
@user_errors
def serve_check_cmd(corpus: Path = typer.Argument(..., help="The corpus whose keys are asked."),
                    url: str = typer.Option(..., help="The server's base URL, e.g. http://127.0.0.1:8000 (an "
                                            "OpenAI-compatible API: llama-cpp-python's server, llama-server, "
                                            "ollama, LM Studio)."),
                    chat: bool = typer.Option(False, "--chat", help="Ask through /v1/chat/completions (the key as "
                                              "the user's message, no system message) instead of /v1/completions."),
                    model: Optional[str] = typer.Option(None, help="The model name the server expects, if any."),
                    key: str = typer.Option("", help="The key of a .txt corpus."),
                    max_tokens: int = typer.Option(64, help="Most tokens per answer."),
                    report: Optional[Path] = typer.Option(None, help="A `memcli verify` report folder of the same "
                                                          "corpus: compare the served answers with its verdicts."),
                    out: Optional[Path] = typer.Option(None, "--out", help="Write every answer to this JSONL file.")):
    """Ask a running server every key at temperature 0 and its other defaults, as a user's client does: how many
    values it serves verbatim, and (with --report) whether they are the entries memcli certified (exit 0: every
    value served; 1: not)."""
    from memcli.cli.terminal import print_serve_check, verify_progress
    from memcli.commands.serve_check import serve_check

    update, close = verify_progress()
    try:
        result = serve_check(corpus, url, chat=chat, model=model, key=key, max_tokens=max_tokens, report=report,
                             out=out, progress=update)
    finally:
        close()
    print_serve_check(result)
    raise typer.Exit(0 if result["served"] == result["entries"] else 1)


# --- the memory law ----------------------------------------------------------------------------------------

@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
@user_errors
def sweep(
    ctx: typer.Context,
    corpus: Path = typer.Argument(..., help="Corpus to memorise prefixes of."),
    ranks: str = typer.Option(..., help="Comma-separated LoRA ranks, e.g. 1,2,4,8."),
    answer_tokens: str = typer.Option(..., help="Comma-separated answer lengths l, e.g. 100,200,400,800."),
    out: Path = typer.Option(..., "--out", help="Sweep folder: one run folder per cell, rank<r>-l<l>."),
    jobs: int = typer.Option(1, help="Cells trained at once, in worker processes (one per GPU with GPUs); with "
                             "--executor ray, as many as the Ray cluster has CPUs (GPUs) for."),
    executor: str = typer.Option("local", help="local | ray (one Ray task per cell, on the cluster at RAY_ADDRESS; "
                                 "pip install 'memcli\\[ray]')."),
    force: bool = typer.Option(False, "--force", help="Retrain the existing cells whose training settings differ "
                               "from this command's (without it such a rerun is refused)."),
):
    """Train one run per (rank, l) cell; any other `memcli train` option passes through (e.g. --method sft
    --max-steps 300). Finished cells are skipped and started ones resume, so rerunning continues a sweep; a rerun
    with other training settings is refused unless --force."""
    from memcli.training.sweep import run_sweep

    train_cmd = typer.main.get_command(app).get_command(ctx, "train")
    sub = train_cmd.make_context("train", [str(corpus), "--out", str(out), *ctx.args], parent=ctx)
    base = train_config(sub.params)
    rank_list, lengths = parse_ints(ranks, "--ranks"), parse_ints(answer_tokens, "--answer-tokens")

    def done(name, summary, n, total):
        console.print(f"[{n}/{total}] {name}: exact match {summary['exact_match']:.2%}, L_final "
                      f"{summary['l_final']:.4f}, dL {summary['delta_l']:.4f}, {summary['steps']} steps, "
                      f"{summary['wall_seconds']:.0f} s", highlight=False)
    summaries = run_sweep(base, rank_list, lengths, out, jobs, executor, done, force=force,
                          log=lambda m: console.print(m, highlight=False, markup=False))
    console.print(f"{len(summaries)} cells in {out}; fit them with: memcli fit {out} --out {out}/law.json")


@app.command()
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


@app.command()
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


# --- verify ------------------------------------------------------------------------------------------------

@app.command("verify")
@user_errors
def verify_cmd(
    corpus: Path = typer.Argument(..., help="Corpus to verify (the formats `train` reads)."),
    lora: Optional[Path] = typer.Option(None, "--lora", help="Run folder, PEFT adapter folder or adapter .gguf. "
                                        "Without it the base model alone is verified."),
    model: Optional[str] = typer.Option(None, help="Base model name or path (.gguf for llama.cpp, e.g. a "
                                        "quantised base). \\[default: the run's model, else smollm2-135m]"),
    out: Path = typer.Option(..., "--out", help="Report folder: report.json, entries.jsonl, a PNG."),
    backend: str = typer.Option(VerifyOptions.backend, help="llama (llama.cpp, as deployed) | torch (HF + PEFT)."),
    n_gpu_layers: Optional[int] = typer.Option(None, help="llama: layers to offload. \\[default: all when "
                                               "llama.cpp was built with GPU support, else 0]"),
    threads: Optional[int] = typer.Option(None, help="CPU threads. \\[default: the CPUs this process may use]"),
    batch_tokens: int = typer.Option(VerifyOptions.batch_tokens,
                                     help="Tokens per forward pass (many entries packed into one)."),
    generate: int = typer.Option(VerifyOptions.generate, help="Also run real greedy generation for K entries "
                                 "(spread over the corpus) and compare with the teacher-forced verdicts."),
    min_exact: float = typer.Option(VerifyOptions.min_exact,
                                    help="Exit 0 when the exact-match rate is at least this, else 1."),
    answer_tokens: Optional[int] = typer.Option(None, help="Verify only the first L answer tokens (as in "
                                                "train). \\[default: the run's setting]"),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="As in "
                                                 "train. \\[default: the run's setting, else off]"),
    system_prompt: Optional[str] = typer.Option(None, help="With --chat-template: the system message. "
                                                "\\[default: the run's setting, else none]"),
    eos: Optional[bool] = typer.Option(None, "--eos/--no-eos", help="As in train. \\[default: the run's "
                                       "setting, else off]"),
    key: Optional[str] = typer.Option(None, help="The key of a .txt corpus. \\[default: the run's setting]"),
    risk_margin: float = typer.Option(VerifyOptions.risk_margin, help="An exact entry whose smallest logit margin "
                                      "is below this (or with some p <= 0.5) is reported at risk."),
    kv_type: str = typer.Option(VerifyOptions.kv_type,
                                help="llama: KV cache type, f16 (llama.cpp's default) or f32."),
    base: str = typer.Option(VerifyOptions.base, help="llama: auto (a `train --deploy TYPE` run: its base quantised "
                             "to TYPE, both TYPE forms in the table; else training) | training (the float weights "
                             "training used) | shipped (a model shipped quantised: the GGUF as deployed)."),
    device: str = typer.Option(VerifyOptions.device, help="torch: auto | cpu | cuda[:i]."),
    locality: Optional[str] = typer.Option(None, "--locality", metavar="[TEXT]",
                                           help="Also compare the tuned model with its base, teacher-forced over "
                                           "TEXT (a UTF-8 file; without it, the base model's own continuations "
                                           "of short prompts, generated once and cached; also written "
                                           "--locality=): greedy next-token agreement, KL(base || tuned), CE of "
                                           "each (docs/locality.md)."),
    locality_base: Optional[str] = typer.Option(None, "--locality-base", help="With --locality and a merged "
                                                "model as --model (no --lora): the base GGUF it is compared with."),
    deploy: Optional[str] = typer.Option(None, help="Also certify the files users ship, for each of these "
                                         "llama.cpp file types (e.g. q8_0,q4_k_m): the adapter merged and "
                                         "quantised, and the adapter over the quantised base; one table, the exit "
                                         "code follows the worst row."),
    allow_conflicting_keys: Optional[bool] = typer.Option(None, "--allow-conflicting-keys", help="Verify a "
                                                          "corpus that gives one key two different values "
                                                          "(refused otherwise: one of them can never be "
                                                          "recalled). \\[default: the run's setting, else off]"),
    sampler: Optional[str] = typer.Option(None, help="Certify under a runner's default decoding at temperature 0: "
                                          f"{' | '.join(PRESETS)} (its repeat penalty and window; docs/deploy.md). "
                                          "\\[default: the run's `train --sampler`, else greedy]"),
    repeat_penalty: Optional[float] = typer.Option(None, help="The repeat penalty (1 = off). \\[default: "
                                                   "--sampler's]"),
    repeat_last_n: Optional[int] = typer.Option(None, help="Tokens the penalties look back over (0 = off). "
                                                "\\[default: --sampler's]"),
    frequency_penalty: Optional[float] = typer.Option(None, help="\\[default: --sampler's]"),
    presence_penalty: Optional[float] = typer.Option(None, help="\\[default: --sampler's]"),
):
    """Check that greedy decoding recalls every value verbatim, from one teacher-forced pass (exit 0: the
    exact-match rate reaches --min-exact; 1: below; 2: bad input)."""
    from rich.markup import escape

    from memcli.cli.terminal import print_verify_report, verify_progress
    from memcli.commands.verify.run import verify
    from memcli.core.quants import parse_quants

    penalties = (repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty)
    options = VerifyOptions(backend=backend, n_gpu_layers=n_gpu_layers, threads=threads, batch_tokens=batch_tokens,
                            generate=generate, min_exact=min_exact, answer_tokens=answer_tokens,
                            chat_template=chat_template, eos=eos, key=key, risk_margin=risk_margin, kv_type=kv_type,
                            system_prompt=system_prompt,
                            device=device, allow_conflicting_keys=allow_conflicting_keys, base=base,
                            locality=locality, locality_base=locality_base,
                            deploy=tuple(parse_quants(deploy)) if deploy is not None else (),
                            sampler=None if sampler is None and penalties == (None,) * 4 else
                            sampler_from_options(sampler, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                                 frequency_penalty=frequency_penalty,
                                                 presence_penalty=presence_penalty))
    update, close = verify_progress()
    try:
        report = verify(corpus, out, lora=lora, model=model, options=options, progress=update,
                        log=lambda m: console.print(escape(m), highlight=False, soft_wrap=True))
    finally:
        close()
    print_verify_report(report, corpus, out)
    raise typer.Exit(0 if report["passed"] else 1)


# --- benchmarks: memcli bench (cli_bench.py) -------------------------------------------------------------

app.add_typer(bench_app, name="bench")



def main() -> None:
    """The console script. `--locality` takes an optional TEXT, which typer cannot express: given last, or
    followed by another option, it is rewritten to `--locality=` (the default reference) before parsing."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--locality" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args[i] = "--locality="
    app(args=args, prog_name="memcli")
