"""`memcli bench prefix`: the chat-template speed-up of decoding a shared prompt prefix once (`memcli verify`'s
llama backend, share_prefix) against decoding it in every sequence: the same chat-template PhoneBook, one
process, the two paths alternating (best of --rounds), verdicts and probabilities compared.

    memcli bench prefix --entries 300 [--model smollm2-135m] [--lora RUN/adapter.gguf] [--threads 2]
"""

from __future__ import annotations

import time

from memcli.commands.bench.phonebook import phonebook_examples
from memcli.core import models
from memcli.core.errors import UserError
from memcli.core.verdicts import verdicts
from memcli.gguf.base import base_gguf
from memcli.llama.scorer import LlamaBackend


def _one_pass(backend, examples, batch_tokens):
    backend.timings.update(decode_s=0.0, decodes=0, shared_prefix_tokens=0)
    t0 = time.perf_counter()
    out = {}
    for b in backend.score(examples, batch_tokens):
        offset = 0
        for v in verdicts(b.stats, b.targets, b.lengths, b.indices):
            out[v.index] = (v.exact, v.first_failure, b.stats.prob[offset: offset + v.answer_tokens].copy())
            offset += v.answer_tokens
    return time.perf_counter() - t0, backend.timings["decode_s"], backend.timings["shared_prefix_tokens"], out


def bench_prefix(entries: int = 300, model: str | None = None, lora=None, threads: int | None = None,
                 batch_tokens: int = 2048, rounds: int = 2) -> dict:
    """The base is the model's own GGUF (for the default model the shipped Q4_1, as in docs/measurements.md);
    `lora` is an adapter GGUF."""
    import numpy as np

    if entries < 2:
        raise UserError(f"--entries must be at least 2 (a prefix is shared between entries), got {entries}")
    if rounds < 1:
        raise UserError(f"--rounds must be at least 1, got {rounds}")
    spec = models.resolve(model or models.DEFAULT_MODEL)
    tokenizer = models.load_tokenizer(spec)
    examples = phonebook_examples(entries, tokenizer, chat_template=True)
    base = base_gguf(spec)
    tokens = sum(len(ex) for ex in examples)
    backend = LlamaBackend(base, lora, threads=threads, recheck_margin=0)  # the packed pass alone
    backend.open(examples, batch_tokens)
    results = {False: [], True: []}
    try:
        for _ in range(rounds):
            for share in (False, True):
                backend.share_prefix = share
                results[share].append(_one_pass(backend, examples, batch_tokens))
    finally:
        backend.close()
    best = {s: min(r, key=lambda x: x[0]) for s, r in results.items()}
    (t0, d0, _, v0), (t1, d1, shared, v1) = best[False], best[True]
    same = sum(v0[i][:2] == v1[i][:2] for i in v0)
    dp = max(float(np.abs(v0[i][2] - v1[i][2]).max()) for i in v0)
    return {"model": spec.name, "base": str(base), "lora": str(lora) if lora else None, "entries": len(examples),
            "tokens": tokens, "rounds": rounds, "shared_prefix_tokens_saved": shared, "unshared_pass_s": t0,
            "shared_pass_s": t1, "unshared_decode_s": d0, "shared_decode_s": d1, "speedup_pass": t0 / t1,
            "speedup_decode": d0 / d1 if d1 else float("nan"), "verdicts_identical": same, "max_abs_dp": dp}


def format_prefix(r: dict) -> str:
    n, tokens, shared = r["entries"], r["tokens"], r["shared_prefix_tokens_saved"]
    return "\n".join([
        f"{r['model']}, chat template, {n} entries, {tokens:,} tokens; shared prefix saves {shared:,} tokens "
        f"({shared / tokens:.0%}); best of {r['rounds']}:",
        f"  unshared: pass {r['unshared_pass_s']:.2f} s (decode {r['unshared_decode_s']:.2f} s) = "
        f"{n / r['unshared_pass_s']:.1f} entries/s",
        f"  shared:   pass {r['shared_pass_s']:.2f} s (decode {r['shared_decode_s']:.2f} s) = "
        f"{n / r['shared_pass_s']:.1f} entries/s",
        f"  speed-up {r['speedup_pass']:.2f}x (decode {r['speedup_decode']:.2f}x); verdicts identical "
        f"{r['verdicts_identical']}/{n}; max |dp| {r['max_abs_dp']:.2e}"])
