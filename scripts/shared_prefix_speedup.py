"""The chat-template speed-up of decoding a shared prompt prefix once (`memcli verify`'s llama backend,
share_prefix) against decoding it in every sequence: the same examples, one process, the two paths alternating,
verdicts compared.

    python scripts/shared_prefix_speedup.py --entries 300 [--model smollm2-135m] [--lora RUN/adapter.gguf] [--threads 2]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from memcli import corpus, models
from memcli.bench.verify import write_phonebook
from memcli.gguf.base import base_gguf
from memcli.verify.llama import LlamaBackend
from memcli.verify.verdicts import verdicts


def one_pass(backend, examples, batch_tokens):
    backend.timings.update(decode_s=0.0, decodes=0, shared_prefix_tokens=0)
    t0 = time.perf_counter()
    out = {}
    for b in backend.score(examples, batch_tokens):
        offset = 0
        for v in verdicts(b.stats, b.targets, b.lengths, b.indices):
            out[v.index] = (v.exact, v.first_failure, b.stats.prob[offset: offset + v.answer_tokens].copy())
            offset += v.answer_tokens
    return time.perf_counter() - t0, backend.timings["decode_s"], backend.timings["shared_prefix_tokens"], out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=300)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--lora")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    spec = models.resolve(a.model)
    tokenizer = models.load_tokenizer(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pb.jsonl"
        write_phonebook(path, a.entries)
        examples = corpus.load_examples(path, tokenizer, chat_template=True)
    base = spec.gguf_path if spec.gguf_path is not None else base_gguf(spec)
    tokens = sum(len(ex) for ex in examples)
    backend = LlamaBackend(base, a.lora, threads=a.threads)
    backend.open(examples, a.batch_tokens)
    results = {False: [], True: []}
    try:
        for _ in range(a.rounds):
            for share in (False, True):
                backend.share_prefix = share
                results[share].append(one_pass(backend, examples, a.batch_tokens))
    finally:
        backend.close()
    best = {s: min(r, key=lambda x: x[0]) for s, r in results.items()}
    (t0, d0, _, v0), (t1, d1, shared, v1) = best[False], best[True]
    same = sum(v0[i][:2] == v1[i][:2] for i in v0)
    dp = max(float(np.abs(v0[i][2] - v1[i][2]).max()) for i in v0)
    row = {"model": spec.name, "base": str(base), "entries": len(examples), "tokens": tokens,
           "shared_prefix_tokens_saved": shared, "unshared_pass_s": t0, "shared_pass_s": t1,
           "unshared_decode_s": d0, "shared_decode_s": d1, "speedup_pass": t0 / t1, "speedup_decode": d0 / d1,
           "verdicts_identical": f"{same}/{len(v0)}", "max_abs_dp": dp}
    print(f"{spec.name}, chat template, {len(examples)} entries, {tokens:,} tokens; shared prefix saves "
          f"{shared:,} tokens ({shared / tokens:.0%}); best of {a.rounds}:")
    print(f"  unshared: pass {t0:.2f} s (decode {d0:.2f} s) = {len(examples) / t0:.1f} entries/s")
    print(f"  shared:   pass {t1:.2f} s (decode {d1:.2f} s) = {len(examples) / t1:.1f} entries/s")
    print(f"  speed-up {t0 / t1:.2f}x (decode {d0 / d1:.2f}x); verdicts identical {same}/{len(v0)}; "
          f"max |dp| {dp:.2e}")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
