"""`memcli bench base`: which base GGUF `memcli verify` should decode a model with. For a model that ships a
quantised GGUF (the default model): the shipped file, or an export of the dequantised weights training used
(F16, verify's default, and F32). For an HF model: its F32 export (verify's base) and an F16 export. One process,
the same generated PhoneBook, the base model alone, each base in turn: entries/s of the teacher-forced pass, and
how far its target log-probabilities and argmaxes are from torch float32 on the weights training saw (the
reference a certificate should agree with).

    memcli bench base --entries 200 [--model smollm2-135m] [--threads 2]
"""

from __future__ import annotations

import time
from pathlib import Path

from memcli.commands.bench.phonebook import phonebook_examples
from memcli.commands.verify.peft_backend import TorchBackend
from memcli.commands.verify.sources import verify_base
from memcli.core import models
from memcli.core.errors import UserError
from memcli.gguf.base import base_gguf, cached_base
from memcli.llama.scorer import LlamaBackend


def _logprobs(backend, examples, batch_tokens):
    import numpy as np

    backend.open(examples, batch_tokens)
    t0 = time.perf_counter()
    parts = [b.stats for b in backend.score(examples, batch_tokens)]
    seconds = time.perf_counter() - t0
    return seconds, np.concatenate([s.logprob for s in parts]), np.concatenate([s.argmax for s in parts])


def candidate_bases(spec) -> dict[str, Path]:
    """The base GGUFs to compare, by name, each exported once into the cache where it is not shipped."""
    if spec.gguf_path is None:  # an HF model: verify decodes its F32 export
        return {"f32 export (verify's)": base_gguf(spec), "f16 export": cached_base(spec, "f16")}
    return {"shipped": base_gguf(spec), "dequantised f16": verify_base(spec, "training")[0],
            "dequantised f32": cached_base(spec, "f32")}


def bench_base(entries: int = 200, model: str | None = None, threads: int | None = None,
               batch_tokens: int = 2048) -> dict:
    import numpy as np

    if entries < 1:
        raise UserError(f"--entries must be at least 1, got {entries}")
    spec = models.resolve(model or models.DEFAULT_MODEL)
    tokenizer = models.load_tokenizer(spec)
    examples = phonebook_examples(entries, tokenizer)
    bases = candidate_bases(spec)
    torch = TorchBackend(spec, None, device="cpu", threads=threads)
    try:
        t_torch, ref, ref_argmax = _logprobs(torch, examples, batch_tokens)
    finally:
        torch.close()
    rows = {"torch float32": {"entries_per_s": len(examples) / t_torch, "max_dlogp": 0.0, "mean_dlogp": 0.0,
                              "argmax_differs": 0}}
    for name, gguf in bases.items():
        backend = LlamaBackend(gguf, None, threads=threads, recheck_margin=0)  # the packed pass alone
        try:
            _logprobs(backend, examples[:20], batch_tokens)  # warm-up
            seconds, lp, am = _logprobs(backend, examples, batch_tokens)
        finally:
            backend.close()
        d = np.abs(lp - ref)
        rows[name] = {"gguf": str(gguf), "entries_per_s": len(examples) / seconds, "max_dlogp": float(d.max()),
                      "mean_dlogp": float(d.mean()), "argmax_differs": int((am != ref_argmax).sum())}
    return {"model": spec.name, "entries": len(examples), "answer_tokens": int(len(ref)), "threads": threads,
            "rows": rows}


def format_base(result: dict) -> str:
    lines = [f"{result['model']}, PhoneBook {result['entries']} entries ({result['answer_tokens']} answer tokens), "
             f"teacher-forced pass, no adapter, threads {result['threads'] or 'all'}",
             f"{'base':<22} {'entries/s':>10} {'mean |dlogp|':>13} {'max |dlogp|':>12} {'argmax != torch':>16}"]
    for name, r in result["rows"].items():
        lines.append(f"{name:<22} {r['entries_per_s']:>10.1f} {r['mean_dlogp']:>13.4f} {r['max_dlogp']:>12.4f} "
                     f"{r['argmax_differs']:>16}")
    return "\n".join(lines)
