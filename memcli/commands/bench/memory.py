"""`memcli bench memory`: peak RSS of `memcli verify` against corpus size. One fresh process per generated
PhoneBook size (peak RSS from os.wait4), and the growth in bytes per added entry (target: < 200). With
decode=False a stub backend replaces llama.cpp's decode: it plans and packs the streamed batches as the llama
backend does and scores 8-wide zero logits, so what verify itself holds per entry is measured apart from
llama.cpp (whose memory is the context, sized by --batch-tokens) and a million entries take minutes.

    memcli bench memory --entries 10000,100000,1000000 [--no-decode] [--model tiny] [--lora RUN] [--threads 2]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from memcli.commands.bench.phonebook import write_phonebook
from memcli.commands.verify import run
from memcli.commands.verify.run import VerifyOptions, verify
from memcli.core.batching import iter_groups
from memcli.core.errors import UserError
from memcli.core.scoring import score_logits
from memcli.core.verdicts import ScoredBatch

GROWTH_TARGET = 200.0  # bytes per added entry


def memory_probe(argv: list[str]) -> None:
    """Child process: one verify on CORPUS, then print the Python heap peak (tracemalloc, with --heap: it slows
    Python down) and the verify's own figures as JSON."""
    import argparse
    import tracemalloc

    p = argparse.ArgumentParser()
    p.add_argument("corpus")
    p.add_argument("--lora")
    p.add_argument("--model")
    p.add_argument("--threads", type=int)
    p.add_argument("--batch-tokens", type=int, default=2048)
    p.add_argument("--heap", action="store_true")
    p.add_argument("--no-decode", action="store_true")
    a = p.parse_args(argv)

    if a.no_decode:
        _stub_decoding()

    if a.heap:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        report = verify(a.corpus, Path(tmp) / "out", lora=a.lora, model=a.model, log=lambda m: None,
                        options=VerifyOptions(threads=a.threads, batch_tokens=a.batch_tokens, min_exact=0.0))
        seconds = time.perf_counter() - t0
    peak = tracemalloc.get_traced_memory()[1] / 2**20 if a.heap else None
    print(json.dumps({"entries": report["totals"]["entries"], "python_heap_peak_mb": peak, "seconds": seconds,
                      "entries_per_s": report["timings"]["entries_per_s"],
                      "backend": report["backend"].get("name")}))


class _NoDecode:
    """A backend that plans and packs the streamed batches as the llama backend does, but replaces llama.cpp's
    decode by 8-wide zero logits: what verify holds per entry, measured apart from llama.cpp (whose memory is
    sized by --batch-tokens) and at a speed where a million entries take minutes."""

    name = "stub"
    n_ctx_train = 1 << 20

    def __init__(self):
        self.timings = {"load_s": 0.0, "pack_s": 0.0, "decode_s": 0.0, "score_s": 0.0, "decodes": 0}
        self.plan = []

    def open(self, examples, batch_tokens):
        pass

    def score(self, examples, batch_tokens=2048):
        import numpy as np

        for start, group in iter_groups(examples, len, batch_tokens, max_seqs=256):
            self.plan.append((start, start + len(group)))
            answer = np.array([len(ex.target_ids) for ex in group], np.int64)
            targets = np.fromiter((t for ex in group for t in ex.target_ids), np.int64, int(answer.sum()))
            stats = score_logits(np.zeros((len(targets), 8), np.float32), targets % 8)
            yield ScoredBatch(np.arange(start, start + len(group)), answer, targets, stats)

    def describe(self):
        return {"name": "no decode (memory probe)", "batches": len(self.plan)}

    def close(self):
        pass


def _stub_decoding() -> None:
    run._open_llama = lambda inp, opts, stack, log: (_NoDecode(), {})


def measure_memory(sizes: list[int], lora, model, threads, batch_tokens, tmp: Path, heap: bool = True,
                   decode: bool = True) -> list[dict]:
    """Peak RSS (os.wait4) of verify in a fresh process per PhoneBook size (and its Python heap peak, with
    heap), and the growth in bytes per entry between consecutive sizes."""
    results = []
    for n in sizes:
        path = tmp / f"pb{n}.jsonl"
        write_phonebook(path, n)
        cmd = [sys.executable, "-c", "import sys; from memcli.commands.bench.memory import memory_probe; "
               "memory_probe(sys.argv[1:])", str(path), "--batch-tokens", str(batch_tokens)]
        if heap:
            cmd.append("--heap")
        if not decode:
            cmd.append("--no-decode")
        for flag, value in (("--lora", lora), ("--model", model), ("--threads", threads)):
            if value is not None:
                cmd += [flag, str(value)]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            out.seek(0)
            err.seek(0)
            if proc.returncode != 0:
                raise RuntimeError(f"memory probe failed: {err.read()[-2000:]}")
            child = json.loads(out.read().strip().splitlines()[-1])
        path.unlink()
        row = {"entries": n, "peak_rss_mb": usage.ru_maxrss / 1024, **child}
        if results:
            prev = results[-1]
            row["bytes_per_entry_since"] = (row["peak_rss_mb"] - prev["peak_rss_mb"]) * 2**20 / (n - prev["entries"])
        results.append(row)
    return results


def bench_memory(sizes: list[int], *, lora=None, model: str | None = "tiny", threads: int | None = None,
                 batch_tokens: int = 2048, decode: bool = True) -> dict:
    """measure_memory in a temporary folder (no heap tracing: it slows Python down), with the growth from the
    first size to the last."""
    if not sizes or any(n < 1 for n in sizes):
        raise UserError(f"--entries takes positive corpus sizes, got {sizes}")
    if sorted(set(sizes)) != sizes:
        raise UserError(f"--entries takes increasing sizes, got {','.join(map(str, sizes))}")
    with tempfile.TemporaryDirectory(prefix="memcli-mem-") as tmp:
        rows = measure_memory(sizes, lora, model, threads, batch_tokens, Path(tmp), heap=False, decode=decode)
    result = {"model": model, "lora": str(lora) if lora else None, "decode": decode, "threads": threads,
              "batch_tokens": batch_tokens, "rows": rows}
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        result["bytes_per_entry"] = ((last["peak_rss_mb"] - first["peak_rss_mb"]) * 2**20
                                     / (last["entries"] - first["entries"]))
    return result


def format_memory(result: dict) -> str:
    lines = [f"peak RSS of memcli verify, {result['model'] or 'the default model'}"
             f"{' + adapter' if result['lora'] else ''}, "
             f"{'real pass' if result['decode'] else 'llama_decode stubbed (--no-decode)'}, "
             f"threads {result['threads'] or 'all'}",
             f"{'entries':>10} {'peak RSS MB':>12} {'bytes/entry since previous':>27} {'entries/s':>10} {'s':>8}"]
    for r in result["rows"]:
        growth = f"{r['bytes_per_entry_since']:+.1f}" if "bytes_per_entry_since" in r else "-"
        lines.append(f"{r['entries']:>10,} {r['peak_rss_mb']:>12.1f} {growth:>27} {r['entries_per_s']:>10,.0f} "
                     f"{r['seconds']:>8.1f}")
    if "bytes_per_entry" in result:
        first, last, per = result["rows"][0], result["rows"][-1], result["bytes_per_entry"]
        lines.append(f"growth from {first['entries']:,} to {last['entries']:,} entries: {per:+.1f} bytes per entry "
                     f"(target < {GROWTH_TARGET:g}): {'met' if per < GROWTH_TARGET else 'MISSED'}")
    return "\n".join(lines)
