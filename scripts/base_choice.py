"""Which base GGUF `memcli verify` should decode the default model with: the shipped quantised GGUF, or an export
of the dequantised weights training used (F16, F32). One process, the same PhoneBook, each base in turn: entries/s
of the teacher-forced pass, and how far its target log-probabilities are from torch float32 on the weights
training saw (the reference a certificate should agree with).

    python scripts/base_choice.py --entries 200 [--model smollm2-135m] [--threads 2]
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from memcli import corpus, models
from memcli.bench.verify import write_phonebook
from memcli.gguf.base import base_gguf, export_base
from memcli.verify.llama import LlamaBackend
from memcli.verify.sources import verify_base
from memcli.verify.torch import TorchBackend


def logprobs(backend, examples, batch_tokens):
    backend.open(examples, batch_tokens)
    t0 = time.perf_counter()
    parts = [b.stats for b in backend.score(examples, batch_tokens)]
    seconds = time.perf_counter() - t0
    return seconds, np.concatenate([s.logprob for s in parts]), np.concatenate([s.argmax for s in parts])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--entries", type=int, default=200)
    p.add_argument("--model", default=models.DEFAULT_MODEL)
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-tokens", type=int, default=2048)
    a = p.parse_args()
    spec = models.resolve(a.model)
    tokenizer = models.load_tokenizer(spec)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pb.jsonl"
        write_phonebook(path, a.entries)
        examples = corpus.load_examples(path, tokenizer)
    cache = models.cache_dir() / "gguf"
    bases = {"shipped": base_gguf(spec)}
    bases["dequantised f16"] = verify_base(spec, "training")[0]  # what verify uses by default
    out = cache / f"{models.hf_dir(spec).name}-dequantised.f32.gguf"
    if not out.exists():
        export_base(models.hf_dir(spec), out, "f32", name=spec.name)
    bases["dequantised f32"] = out
    torch = TorchBackend(spec, None, device="cpu", threads=a.threads)
    t_torch, ref, ref_argmax = logprobs(torch, examples, a.batch_tokens)
    torch.close()
    rows = {"torch float32": {"entries_per_s": len(examples) / t_torch, "max_dlogp": 0.0, "mean_dlogp": 0.0,
                              "argmax_differs": 0}}
    for name, gguf in bases.items():
        backend = LlamaBackend(gguf, None, threads=a.threads)
        try:
            logprobs(backend, examples[:20], a.batch_tokens)  # warm-up
            seconds, lp, am = logprobs(backend, examples, a.batch_tokens)
        finally:
            backend.close()
        d = np.abs(lp - ref)
        rows[name] = {"gguf": str(gguf), "entries_per_s": len(examples) / seconds, "max_dlogp": float(d.max()),
                      "mean_dlogp": float(d.mean()), "argmax_differs": int((am != ref_argmax).sum())}
    print(f"{spec.name}, PhoneBook {len(examples)} entries ({sum(len(e.target_ids) for e in examples)} answer "
          f"tokens), teacher-forced pass, no adapter, threads {a.threads or 'all'}")
    print(f"{'base':<18} {'entries/s':>10} {'mean |dlogp|':>13} {'max |dlogp|':>12} {'argmax != torch':>16}")
    for name, r in rows.items():
        print(f"{name:<18} {r['entries_per_s']:>10.1f} {r['mean_dlogp']:>13.4f} {r['max_dlogp']:>12.4f} "
              f"{r['argmax_differs']:>16}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
