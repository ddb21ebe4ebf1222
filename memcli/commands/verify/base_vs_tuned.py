"""`memcli verify --locality [TEXT]`: base against tuned, teacher-forced over a text (memcli.training.locality).

Two sides, compared position by position over the same windows:
- tuned: what verify verifies, a base GGUF + the adapter GGUF, or a merged GGUF given as --model;
- base: the same base GGUF with the adapter switched off (the same loaded weights, no second copy), or, for a
  merged model, the base GGUF given with --locality-base.
On the llama backend each group of windows is decoded twice, once per side, in llama.cpp; the base's logits are
copied, the tuned side's reduced against them by the native kernel. On the torch backend the PEFT model runs
once with its adapter disabled and once with it (`memcli.training.locality.torch_locality`).

The text is TEXT (checked: missing, empty, binary or shorter than one window is refused before any model loads),
or, without one, the measure half of the default reference of the base model.
"""

from __future__ import annotations

from pathlib import Path

from memcli.core import models
from memcli.core.errors import UserError
from memcli.llama.scorer import LlamaBackend
from memcli.training.locality import LocalityTotals, as_examples, reference_windows, text_windows, torch_locality

WINDOWS_PER_GROUP = 4  # windows decoded together: two [508, V] float32 blocks in memory at a time


def check_options(inp, opts) -> None:
    """What --locality can compare, given --lora, --model, --locality-base and --backend (UserError otherwise)."""
    if opts.locality is None:
        if opts.locality_base is not None:
            raise UserError("--locality-base is the base a merged --model is compared with; add --locality")
        return
    if inp.src.given is None and opts.locality_base is None:
        raise UserError("--locality compares a tuned model with its base: give --lora RUN, or a merged model as "
                        "--model with its base as --locality-base BASE.gguf")
    if inp.src.given is not None and opts.locality_base is not None:
        raise UserError("--locality-base is for a merged --model without --lora; with --lora the base is the same "
                        "model with the adapter switched off")
    if opts.locality_base is not None:
        if opts.backend != "llama":
            raise UserError("--locality-base needs --backend llama (the merged model is a GGUF)")
        base = Path(opts.locality_base)
        if base.suffix != ".gguf" or not base.is_file():
            raise UserError(f"--locality-base {base}: expected an existing base .gguf file")


def windows(inp, opts, log) -> tuple[list[list[int]], str] | None:
    """(windows, what the text is), or None without --locality. A bad TEXT is refused here, before any model
    loads; the default reference is generated here on first use."""
    check_options(inp, opts)
    if opts.locality is None:
        return None
    if opts.locality:
        return text_windows(opts.locality, inp.tokenizer), str(opts.locality)

    spec = models.resolve(opts.locality_base) if opts.locality_base else inp.base.token_spec
    return (reference_windows(spec, "measure", log),
            f"reference: {spec.name}'s own continuations (memcli.training.locality)")


def measure(backend, chosen: tuple[list[list[int]], str], opts, log) -> dict:
    """report.json's `locality`: base against tuned over the windows, on verify's backend."""
    wins, text = chosen
    if backend.name == "torch":
        return torch_locality(backend.model, wins, backend.device, text, threads=opts.threads or 0)
    return llama_locality(backend, wins, text, opts.locality_base, opts, log)


def llama_locality(tuned, wins: list[list[int]], text: str, base_gguf, opts, log) -> dict:
    base = tuned
    if base_gguf is not None:
        base = LlamaBackend(base_gguf, n_gpu_layers=opts.n_gpu_layers, threads=opts.threads, kv_type=opts.kv_type,
                            share_prefix=False, log=log)
        if base.n_vocab != tuned.n_vocab:
            base.close()
            raise UserError(f"--locality-base {base_gguf} has a vocabulary of {base.n_vocab} tokens, the model "
                            f"verified {tuned.n_vocab}: not its base")
        base.open(None, opts.batch_tokens)
    examples = as_examples(wins)
    totals = LocalityTotals()
    try:
        for start in range(0, len(examples), WINDOWS_PER_GROUP):
            group = examples[start: start + WINDOWS_PER_GROUP]
            targets = [t for ex in group for t in ex.target_ids]
            if base is tuned:
                tuned.use_adapter(False)
            before = base.answer_logits(group)
            if base is tuned:
                tuned.use_adapter(True)
            after = tuned.answer_logits(group)
            totals.add(before, after, targets, threads=tuned.threads)
    finally:
        tuned.use_adapter(True)
        if base is not tuned:
            base.close()
    return totals.result(text)
