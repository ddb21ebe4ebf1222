"""`memcli train` and `memcli sweep`: their options (defaults from TrainConfig), parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.cli.terminal import console, parse_ints, train_progress, user_errors
from memcli.llama.sampler import PRESETS


def _default(name: str) -> str:
    """' [default: X]' from TrainConfig, the one place train's defaults are written (escaped: Rich markup)."""
    from memcli.training.config import TrainConfig

    value = getattr(TrainConfig(), name)
    shown = ",".join(map(str, value)) if isinstance(value, list) else value
    return f" \\[default: {shown}]"




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
    tail_threshold: Optional[float] = typer.Option(None, help="memft-ot in a run's tail (see --tail-from): train "
                                                   "a token while its p is at or below this (0.5: the paper's "
                                                   "throughout)." + _default("tail_threshold")),
    tail_from: Optional[float] = typer.Option(None, help="memft-ot: a run's tail starts once a clean check finds "
                                              "this share of the answer tokens at p > 0.5 (0: from the first "
                                              "check)." + _default("tail_from")),
    tail_lr: Optional[float] = typer.Option(None, help="The learning rate is multiplied by this while a run is in "
                                            "its tail (see --tail-from; 1: the schedule alone)."
                                            + _default("tail_lr")),
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
    rslora: Optional[bool] = typer.Option(None, "--rslora/--no-rslora", help="Scale the adapter by alpha / "
                                          "sqrt(rank) instead of alpha / rank (rsLoRA)."),
    init: Optional[str] = typer.Option(None, help="A's initialisation: default (Kaiming-uniform) | gaussian; B "
                                       "starts at zero." + _default("init")),
    preserve: Optional[bool] = typer.Option(None, "--preserve/--no-preserve", help="Add weight x KL(base || "
                                            "tuned) on a small replay batch of unrelated text to every step, so the "
                                            "model still predicts what it did before (docs/locality.md)."
                                            + _default("preserve")),
    preserve_weight: Optional[float] = typer.Option(None, help="The preserve term's weight."
                                                    + _default("preserve_weight")),
    preserve_text: Optional[Path] = typer.Option(None, help="The replay text of --preserve (a UTF-8 file). "
                                                 "\\[default: the base model's own continuations of short prompts]"),
    lr: Optional[float] = typer.Option(None, help="AdamW learning rate (see --schedule)." + _default("lr")),
    schedule: Optional[str] = typer.Option(None, help="Learning rate after the warm-up: linear (decays to 0 at the "
                                           "budget) | constant | cosine (to 0 at the budget)." + _default("schedule")),
    warmup_steps: Optional[int] = typer.Option(None, help="Steps of linear warm-up." + _default("warmup_steps")),
    lora_plus: Optional[float] = typer.Option(None, help="LoRA+: B's learning rate is --lr times this (1: off)."
                                              + _default("lora_plus")),
    adam_beta1: Optional[float] = typer.Option(None, help="AdamW beta1." + _default("adam_beta1")),
    adam_beta2: Optional[float] = typer.Option(None, help="AdamW beta2." + _default("adam_beta2")),
    adam_eps: Optional[float] = typer.Option(None, help="AdamW epsilon." + _default("adam_eps")),
    weight_decay: Optional[float] = typer.Option(None, help="AdamW weight decay." + _default("weight_decay")),
    clip: Optional[float] = typer.Option(None, help="Gradient-norm clipping." + _default("clip")),
    epochs: Optional[int] = typer.Option(None, help="Training budget in epochs." + _default("epochs")),
    max_steps: Optional[int] = typer.Option(None, help="Training budget in steps (overrides --epochs)."),
    batch_size: Optional[int] = typer.Option(None, help="Entries per step." + _default("batch_size")),
    seed: Optional[int] = typer.Option(None, help="Seed of the adapter, the order and dropout." + _default("seed")),
    device: Optional[str] = typer.Option(None, help="auto | cpu | cuda[:i]." + _default("device")),
    dtype: Optional[str] = typer.Option(None, help="auto | float32 | bfloat16 | float16 for the base weights "
                                        "(the adapter stays float32)." + _default("dtype")),
    until_recall: Optional[bool] = typer.Option(None, "--until-recall/--no-until-recall", help="Stop as soon as "
                                                "every answer token of every entry has p > 0.5 (certified recall)."),
    check_every: Optional[int] = typer.Option(None, help="Steps between clean recall checks."
                                              + _default("check_every")),
    gate_checks: Optional[bool] = typer.Option(None, "--gate-checks/--no-gate-checks", help="Without dropout: "
                                               "skip a clean check while the share of answer tokens past p = 0.5 in "
                                               "their latest training pass is 0.2 or more short of --tail-from (no "
                                               "clean pass could certify yet); --no-gate-checks checks every "
                                               "--check-every steps."
                                               + _default("gate_checks")),
    checkpoint_every: Optional[int] = typer.Option(None, help="Steps between checkpoints."
                                                   + _default("checkpoint_every")),
    log_every: Optional[int] = typer.Option(None, help="Steps between metrics lines." + _default("log_every")),
    answer_tokens: Optional[int] = typer.Option(None, help="Memorise only the first L answer tokens."),
    chat_template: Optional[bool] = typer.Option(None, "--chat-template/--no-chat-template", help="Wrap keys in "
                                                 "the model's chat template as servers render a chat request (the key "
                                                 "as the user's message, the template's own default system prompt "
                                                 "unless --system-prompt, the generation prompt); the value ends with "
                                                 "the template's end-of-turn token (--no-eos: not)."),
    system_prompt: Optional[str] = typer.Option(None, help="With --chat-template: the system message your clients "
                                                "send. \\[default: none, the template's default applies]"),
    eos: Optional[bool] = typer.Option(None, "--eos/--no-eos", help="Also learn the end token after each value: "
                                       "EOS, or with --chat-template the end of turn. \\[default: on with "
                                       "--chat-template, else off]"),
    key: Optional[str] = typer.Option(None, help="The key of a .txt corpus. \\[default: empty]"),
    allow_conflicting_keys: Optional[bool] = typer.Option(None, "--allow-conflicting-keys/--no-allow-conflicting-keys",
                                                          help="Train on a corpus that gives one key two different "
                                                          "values (refused otherwise: such an entry can never be "
                                                          "recalled)."),
    deploy: Optional[str] = typer.Option(None, help="Comma-separated llama.cpp file types (f16, q8_0, q6_k, "
                                         "q5_k_m, q4_k_m, q4_0, ...), e.g. f16,q8_0,q4_k_m: train so that recall "
                                         "holds in the files users ship, for each type the adapter over the base "
                                         "quantised to it and the adapter merged and quantised (base weights as "
                                         "quantised, the merged layer quantised in the loop; 16-bit types train on "
                                         "the float weights); --until-recall stops when llama.cpp certifies every "
                                         "file. The certified merged files are kept in RUN/deploy/."),
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
    frequency_penalty: Optional[float] = typer.Option(None, help="With --sampler: subtracted per occurrence in the "
                                                      "window. \\[default: the preset's]"),
    presence_penalty: Optional[float] = typer.Option(None, help="With --sampler: subtracted once for a token in "
                                                     "the window. \\[default: the preset's]"),
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
    loc = summary.get("locality")
    if loc and loc.get("tokens"):
        console.print(f"What it cost elsewhere: on {loc['tokens']:,} tokens of the base's own text the next token "
                      f"is still the base's at {loc['argmax_agreement']:.1%} of positions; KL(base || tuned) "
                      f"{loc['kl']:.3f} nats/token; the text's CE {loc['ce_base']:.3f} -> {loc['ce_tuned']:.3f} "
                      "(docs/locality.md).", highlight=False)


# --- the memory law ----------------------------------------------------------------------------------------

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
    skip_above_certified: bool = typer.Option(False, "--skip-above-certified", help="With --jobs 1: do not train a "
                                              "cell when a lower rank certified every entry at its length (with "
                                              "--until-recall: it would too, and fit drops saturated runs)."),
):
    """Train one run per (rank, l) cell; any other `memcli train` option passes through (e.g. --method sft
    --max-steps 300). Finished cells are skipped and started ones resume, so rerunning continues a sweep; a rerun
    with other training settings is refused unless --force."""
    from memcli.training.sweep import run_sweep

    train_cmd = ctx.find_root().command.get_command(ctx, "train")  # the train command of this app
    sub = train_cmd.make_context("train", [str(corpus), "--out", str(out), *ctx.args], parent=ctx)
    base = train_config(sub.params)
    rank_list, lengths = parse_ints(ranks, "--ranks"), parse_ints(answer_tokens, "--answer-tokens")

    def done(name, summary, n, total):
        console.print(f"[{n}/{total}] {name}: exact match {summary['exact_match']:.2%}, L_final "
                      f"{summary['l_final']:.4f}, dL {summary['delta_l']:.4f}, {summary['steps']} steps, "
                      f"{summary['wall_seconds']:.0f} s", highlight=False)
    summaries = run_sweep(base, rank_list, lengths, out, jobs, executor, done, force=force,
                          log=lambda m: console.print(m, highlight=False, markup=False),
                          skip_above_certified=skip_above_certified)
    console.print(f"{len(summaries)} cells in {out}; fit them with: memcli fit {out} --out {out}/law.json")
