"""`memcli verify`: its options (defaults from VerifyOptions), parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.cli.terminal import console, user_errors
from memcli.commands.verify.run import VerifyOptions
from memcli.llama.sampler import PRESETS, sampler_from_options

# --- verify ------------------------------------------------------------------------------------------------

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
    base: str = typer.Option(VerifyOptions.base, help="llama: auto (a `train --deploy TYPES` run: its base "
                             "quantised to the first type, both forms of each type in the table; else training) | "
                             "training (the float weights training used) | shipped (a model shipped quantised: the "
                             "GGUF as deployed)."),
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
    frequency_penalty: Optional[float] = typer.Option(None, help="Subtracted from a token's logit per occurrence in "
                                                      "the window. \\[default: --sampler's]"),
    presence_penalty: Optional[float] = typer.Option(None, help="Subtracted once from the logit of a token in the "
                                                     "window. \\[default: --sampler's]"),
    flash_attn: Optional[str] = typer.Option(None, help="llama: the attention kernel the runner uses, auto "
                                             "(llama.cpp's default: on where supported) | on | off; the two round "
                                             "differently. "
                                             "\\[default: --sampler's: off for llama-cpp-python, ollama, lm-studio]"),
    recheck_margin: Optional[float] = typer.Option(None, help="llama: an entry whose smallest margin in the packed "
                                                   "pass lies within +- this of 0 is scored again as a runner decodes "
                                                   "one request (its prompt, then one token per decode), and that "
                                                   "verdict stands; 0: never. \\[default: 4 on quantised weights, "
                                                   "0.5 on F32, F16 or BF16]"),
):
    """Check that greedy decoding recalls every value verbatim, from one teacher-forced pass (exit 0: the
    exact-match rate reaches --min-exact; 1: below; 2: bad input)."""
    from rich.markup import escape

    from memcli.cli.terminal import print_verify_report, verify_progress
    from memcli.commands.verify.run import verify
    from memcli.core.quants import parse_quants

    penalties = (repeat_penalty, repeat_last_n, frequency_penalty, presence_penalty, flash_attn)
    options = VerifyOptions(backend=backend, n_gpu_layers=n_gpu_layers, threads=threads, batch_tokens=batch_tokens,
                            generate=generate, min_exact=min_exact, answer_tokens=answer_tokens,
                            chat_template=chat_template, eos=eos, key=key, risk_margin=risk_margin, kv_type=kv_type,
                            system_prompt=system_prompt,
                            device=device, allow_conflicting_keys=allow_conflicting_keys, base=base,
                            locality=locality, locality_base=locality_base,
                            deploy=tuple(parse_quants(deploy)) if deploy is not None else (),
                            recheck_margin=recheck_margin,
                            sampler=None if sampler is None and penalties == (None,) * 5 else
                            sampler_from_options(sampler, repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n,
                                                 frequency_penalty=frequency_penalty,
                                                 presence_penalty=presence_penalty, flash_attn=flash_attn))
    update, close = verify_progress()
    try:
        report = verify(corpus, out, lora=lora, model=model, options=options, progress=update,
                        log=lambda m: console.print(escape(m), highlight=False, soft_wrap=True))
    finally:
        close()
    print_verify_report(report, corpus, out)
    raise typer.Exit(0 if report["passed"] else 1)
