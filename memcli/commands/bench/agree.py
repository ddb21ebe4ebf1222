"""`memcli bench agree RUN [--corpus C] [--limit N]`: do torch + PEFT and llama.cpp reach the same exact-match
verdict on every entry of a finished run (docs/method.md §2)?

torch + PEFT runs on the dequantised base, llama.cpp on the base GGUF (e.g. the shipped Q4_1) with the exported
adapter. Both backends' logits go through the same scoring (memcli.core.scoring.score_logits) and the same verdict
function (memcli.core.verdicts.verdicts) that training's clean pass and `memcli verify` use. Also here:
`llama_logits`, llama.cpp's logits at every position, the reference runner of the export tests.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from memcli.core import corpus as corpus_mod
from memcli.core import models, runs
from memcli.core.errors import UserError
from memcli.core.scoring import TokenStats, score_logits
from memcli.core.verdicts import verdicts
from memcli.gguf.adapter import check_pair, export_adapter
from memcli.gguf.base import base_gguf
from memcli.llama import library


def llama_logits(base: str | os.PathLike, sequences: list[list[int]], adapter: str | os.PathLike | None = None,
                 scale: float = 1.0, n_threads: int = 2, n_ctx: int | None = None) -> list[np.ndarray]:
    """Logits [len(seq), n_vocab] at every position of each token sequence, from llama.cpp (llama-cpp-python)
    with an F32 KV cache, so the only differences from torch are the weights' own quantisation."""
    from llama_cpp import Llama

    longest = max(len(s) for s in sequences)
    n_ctx = n_ctx or max(64, longest)
    kwargs = dict(model_path=str(base), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                  n_threads_batch=n_threads, logits_all=True, type_k=0, type_v=0, verbose=False, n_gpu_layers=0)
    if adapter is not None:
        kwargs.update(lora_path=str(adapter), lora_scale=float(scale))
    try:
        with library.safe_defaults(base):  # off llama.cpp's extra buffer types where they crash (AMX)
            llm = Llama(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp could not load {base}{' with ' + str(adapter) if adapter else ''} ({e})") from None
    try:
        result = []
        for seq in sequences:
            llm.reset()
            llm.eval(list(seq))
            result.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
        return result
    finally:
        llm.close()


def entry_verdicts(logits, examples) -> list:
    """memcli.core.verdicts.verdicts of each example from the logits at every position of its input ids
    (`logits`: one [len(input_ids), n_vocab] array per example, a list or a generator)."""
    parts, targets, lengths = [], [], []
    for rows, ex in zip(logits, examples):
        p, n = len(ex.prompt_ids), len(ex.target_ids)
        parts.append(score_logits(rows[p - 1: p - 1 + n], list(ex.target_ids)))
        targets += ex.target_ids
        lengths.append(n)
    return verdicts(TokenStats.concat(parts), targets, lengths)


def agreement(run: str | os.PathLike, corpus_path: str | os.PathLike | None = None, limit: int | None = None,
              n_threads: int | None = None, adapter_gguf: str | os.PathLike | None = None) -> dict:
    """Per-entry exact-match verdicts from torch + PEFT and from llama.cpp over a run's corpus (or `corpus_path`).
    Returns the agreement rate and every disagreement with both smallest logit margins (target logit minus the
    best other logit, at the entry's worst position)."""
    import tempfile

    import torch
    from peft import PeftModel

    run = Path(run)
    settings = runs.read_settings(run)
    if not runs.has_adapter(run):
        raise UserError(f"run folder {run} has no finished adapter (adapter/adapter_config.json is missing)")
    spec = models.resolve(settings["model"])
    model, tokenizer = models.load_model(spec)
    examples = corpus_mod.load_examples(corpus_path or settings["corpus"], tokenizer, key=settings.get("key", ""),
                                        chat_template=settings.get("chat_template", False),
                                        eos=settings.get("eos", False), answer_tokens=settings.get("answer_tokens"),
                                        system_prompt=corpus_mod.system_prompt_of(settings))
    if limit:
        examples = examples[:limit]
    peft_model = PeftModel.from_pretrained(model, runs.adapter_dir(run)).eval()
    with tempfile.TemporaryDirectory() as tmp:
        if adapter_gguf is None:
            adapter_gguf = runs.gguf_path(run)
            if not adapter_gguf.exists():
                adapter_gguf = Path(tmp) / "adapter.gguf"
                export_adapter(run, adapter_gguf)
        base = base_gguf(spec)
        check_pair(adapter_gguf, base)
        seqs = [ex.input_ids for ex in examples]
        llama = llama_logits(base, seqs, adapter_gguf, n_threads=n_threads or max(1, os.cpu_count() // 2),
                             n_ctx=max(len(s) for s in seqs))
    with torch.no_grad():  # one entry's logits at a time
        by_torch = entry_verdicts((peft_model(torch.tensor([ex.input_ids])).logits[0].float().numpy()
                                   for ex in examples), examples)
    by_llama = entry_verdicts(llama, examples)

    disagreements, agree = [], 0
    for ex, t, ll in zip(examples, by_torch, by_llama):
        if t.exact == ll.exact:
            agree += 1
        else:
            disagreements.append({"line": ex.line, "torch_exact": t.exact, "llama_exact": ll.exact,
                                  "torch_margin": round(t.min_margin, 4), "llama_margin": round(ll.min_margin, 4)})
    return {"entries": len(examples), "agree": agree, "rate": agree / len(examples),
            "llama_exact": sum(v.exact for v in by_llama),
            "min_llama_margin": round(min(v.min_margin for v in by_llama), 4),
            "max_margin_gap": round(max(abs(t.min_margin - ll.min_margin) for t, ll in zip(by_torch, by_llama)), 4),
            "base": str(base), "adapter": str(adapter_gguf), "disagreements": disagreements}


def format_agreement(result: dict) -> str:
    """What `memcli bench agree` prints."""
    lines = [f"{result['agree']}/{result['entries']} verdicts agree ({100 * result['rate']:.2f} %); llama.cpp: "
             f"{result['llama_exact']} exact, smallest margin {result['min_llama_margin']}; largest torch/llama.cpp "
             f"margin difference {result['max_margin_gap']}; base {result['base']}, adapter {result['adapter']}"]
    for d in result["disagreements"]:
        lines.append(f"  line {d['line']}: torch {'exact' if d['torch_exact'] else 'miss'} (margin "
                     f"{d['torch_margin']}), llama.cpp {'exact' if d['llama_exact'] else 'miss'} (margin "
                     f"{d['llama_margin']})")
    return "\n".join(lines)
