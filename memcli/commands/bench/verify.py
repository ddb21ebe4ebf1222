"""`memcli bench verify`: memcli verify against the ways recall is usually checked, on one corpus, one machine.

(a) memcli verify, llama backend: one teacher-forced pass, packed batches, logits only at answer positions.
(b) the reference method: transformers `generate`, greedy, one entry at a time, decoded strings compared.
(c) llama-cpp-python's high-level `Llama.create_completion` (temperature 0: greedy), one entry at a time,
    strings compared.
(d) memcli verify, torch backend (padded batches of the HF weights with the PEFT adapter).

Each method's speed is its steady-state throughput (model loading is reported apart). The slow baselines (b, c)
run on the first --baseline-entries entries (and at most --baseline-tokens generated tokens per entry); their
time for the whole corpus is extrapolated linearly from that subset, and the output says so (for one long
value, generating a prefix and scaling linearly *under*-states the baseline's time: later tokens attend to a
longer cache). Also: decode time alone against the whole verify pass, the kernel against numpy on a
512 x 49152 block, and peak memory of verify for two corpus sizes (child processes).

    memcli bench verify CORPUS --lora RUN [--baseline-entries 50] ...
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

from memcli.commands.bench.kernel import bench_kernel
from memcli.commands.bench.memory import measure_memory
from memcli.commands.verify.run import VerifyOptions, verify
from memcli.commands.verify.sources import resolve_adapter, verify_base
from memcli.core import corpus as corpus_mod
from memcli.core import models
from memcli.core.errors import UserError
from memcli.core.scoring import default_threads
from memcli.gguf.adapter import export_adapter
from memcli.llama import library

TARGETS = {"phonebook_vs_b": 10.0, "long_value_vs_b": 50.0, "overhead": 0.10, "kernel": 10.0}


def _load_rows(out_dir: Path) -> dict[int, dict]:
    with open(out_dir / "entries.jsonl", encoding="utf-8") as f:
        return {r["line"]: r for r in map(json.loads, f)}


def _memcli_verify(corpus, out_dir, lora, model, backend, threads, batch_tokens) -> tuple[dict, dict[int, dict]]:
    opts = VerifyOptions(backend=backend, threads=threads, batch_tokens=batch_tokens, min_exact=0.0, plot=False)
    report = verify(corpus, out_dir, lora=lora, model=model, options=opts, log=lambda m: None)
    return report, _load_rows(out_dir)


def _context(corpus, lora, model):
    """What the baselines need, resolved the way verify resolves it: examples, entries, the model spec, the PEFT
    folder, the base and adapter GGUFs (exported to a temp folder when the run has none)."""
    src = resolve_adapter(lora)
    s = src.settings
    spec = models.resolve(model or s.get("model") or models.DEFAULT_MODEL)
    tokenizer = models.load_tokenizer(spec)
    entries = corpus_mod.read_corpus(corpus, s.get("key", "") or "",
                                     allow_conflicting_keys=bool(s.get("allow_conflicting_keys", False)))
    examples = corpus_mod.prepare(entries, tokenizer, chat_template=bool(s.get("chat_template", False)),
                                  eos=bool(s.get("eos", False)), answer_tokens=s.get("answer_tokens"), path=corpus,
                                  system_prompt=corpus_mod.system_prompt_of(s))
    return src, spec, tokenizer, examples


def _gguf_pair(src, spec, tmp: Path):
    base, _ = verify_base(spec)  # the base (a) verifies on
    adapter = src.gguf
    if src.given is not None and adapter is None:
        adapter = tmp / "adapter.gguf"
        export_adapter(src.run_dir or src.peft_dir, adapter)
    return base, adapter


def baseline_transformers(spec, peft_dir, tokenizer, examples, n_entries, max_tokens, threads, device: str = "cpu",
                          dtype: str = "float32"):
    """(b): transformers generate, greedy, one entry at a time; exact iff the decoded strings are equal. The CPU
    in float32 unless told (.ci/gpu_check.sh runs it on the GPU in bfloat16)."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, _ = models.load_model(spec, dtype, device)
    if peft_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, peft_dir).to(device)
    model.eval()
    load = time.perf_counter() - t0
    verdicts, tokens = {}, 0
    t0 = time.perf_counter()
    for ex in examples[:n_entries]:
        n = len(ex.target_ids) if max_tokens is None else min(max_tokens, len(ex.target_ids))
        prompt = torch.tensor([ex.prompt_ids], device=device)
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                 do_sample=False, num_beams=1, pad_token_id=tokenizer.eos_token_id)
        text = tokenizer.decode(out[0, len(ex.prompt_ids):])
        verdicts[ex.line] = text == tokenizer.decode(list(ex.target_ids[:n]))
        tokens += n
    return {"seconds": time.perf_counter() - t0, "load_s": load, "entries": len(verdicts), "tokens": tokens,
            "verdicts": verdicts}


def baseline_llama_cpp(base, adapter, tokenizer, examples, n_entries, max_tokens, threads):
    """(c): llama-cpp-python's high-level completion, temperature 0 (greedy), one entry at a time; exact iff
    the completion text equals the value text."""
    from llama_cpp import Llama

    threads = threads or default_threads()
    longest = max(len(ex) for ex in examples[:n_entries])
    t0 = time.perf_counter()
    kwargs = dict(model_path=str(base), n_ctx=max(512, longest + 8), n_threads=threads, n_threads_batch=threads,
                  verbose=False, n_gpu_layers=0)
    if adapter is not None:
        kwargs.update(lora_path=str(adapter), lora_scale=1.0)
    with library.safe_defaults(base):  # off llama.cpp's extra buffer types where they crash (AMX)
        llm = Llama(**kwargs)
    load = time.perf_counter() - t0
    verdicts, tokens = {}, 0
    t0 = time.perf_counter()
    try:
        for ex in examples[:n_entries]:
            n = len(ex.target_ids) if max_tokens is None else min(max_tokens, len(ex.target_ids))
            llm.reset()
            result = llm.create_completion(list(ex.prompt_ids), max_tokens=n, temperature=0.0, top_k=1,
                                           top_p=1.0, min_p=0.0, repeat_penalty=1.0)
            verdicts[ex.line] = result["choices"][0]["text"] == tokenizer.decode(list(ex.target_ids[:n]))
            tokens += n
    finally:
        llm.close()
    return {"seconds": time.perf_counter() - t0, "load_s": load, "entries": len(verdicts), "tokens": tokens,
            "verdicts": verdicts}


def _agreement(verdicts: dict[int, bool], rows: dict[int, dict], max_tokens: int | None) -> tuple[int, int]:
    """(agreeing, compared) between a generation baseline's verdicts and memcli's rows; with a token cap,
    memcli's verdict on the capped prefix (first failure at or beyond the cap counts as right)."""
    agree = 0
    for line, ok in verdicts.items():
        r = rows[line]
        ours = r["exact"] if max_tokens is None or r["answer_tokens"] <= max_tokens else \
            (r["first_failure"] is None or r["first_failure"] >= max_tokens)
        agree += ours == ok
    return agree, len(verdicts)


def _rate(seconds: float, count: int) -> float | None:
    return count / seconds if seconds > 0 else None


def run_bench(corpus, *, lora=None, model=None, baseline_entries: int = 50, baseline_tokens: int | None = None,
              torch_entries: int | None = None, threads: int | None = None, batch_tokens: int = 2048,
              memory_entries: str = "250,1000", skip: set[str] = frozenset(), out=None, console=None) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    if not console.is_terminal:
        console.width = max(console.width, 120)
    say = Console(stderr=True)
    if baseline_entries < 1:
        raise UserError(f"--baseline-entries must be at least 1, got {baseline_entries}")
    if baseline_tokens is not None and baseline_tokens < 1:
        raise UserError(f"--baseline-tokens must be at least 1, got {baseline_tokens}")
    try:
        sizes = [int(x) for x in memory_entries.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--memory-entries takes comma-separated integers, got '{memory_entries}'") from None
    results: dict = {"corpus": str(corpus), "lora": str(lora) if lora else None, "threads": threads}
    with tempfile.TemporaryDirectory(prefix="memcli-bench-") as tmp_name:
        tmp = Path(tmp_name)
        src, spec, tokenizer, examples = _context(corpus, lora, model)
        n_all, tok_all = len(examples), sum(len(ex.target_ids) for ex in examples)
        results.update(entries=n_all, answer_tokens=tok_all, model=spec.name)

        say.print(f"(a) memcli verify, llama backend, {n_all} entries ...")
        report, rows = _memcli_verify(corpus, tmp / "a", lora, model, "llama", threads, batch_tokens)
        tm = report["timings"]
        a = {"seconds": tm["pass_s"], "setup_s": tm["setup_s"], "total_s": tm["total_s"], "entries": n_all,
             "tokens": tok_all, "exact": report["totals"]["exact"], "timings": tm}
        results["a"] = a

        n_sub = min(baseline_entries, n_all)
        capped = baseline_tokens is not None and any(len(ex.target_ids) > baseline_tokens
                                                     for ex in examples[:n_sub])
        gguf_base, gguf_adapter = _gguf_pair(src, spec, tmp)
        if "b" not in skip:
            say.print(f"(b) transformers generate, {n_sub} entries ...")
            results["b"] = baseline_transformers(spec, src.peft_dir, tokenizer, examples, n_sub, baseline_tokens,
                                                 threads)
        if "c" not in skip:
            say.print(f"(c) llama-cpp-python high-level generation, {n_sub} entries ...")
            results["c"] = baseline_llama_cpp(gguf_base, gguf_adapter, tokenizer, examples, n_sub, baseline_tokens,
                                              threads)
        if "d" not in skip:
            d_corpus = corpus
            if torch_entries is not None and torch_entries < n_all:
                if len(examples) == 1:
                    raise UserError("--torch-entries needs a corpus of many entries")
                lines = set(ex.line for ex in examples[:torch_entries])
                text = Path(corpus).read_text(encoding="utf-8-sig").splitlines()
                d_corpus = tmp / ("d" + Path(corpus).suffix)
                d_corpus.write_text("".join(t + "\n" for n, t in enumerate(text, 1) if n in lines))
            say.print("(d) memcli verify, torch backend ...")
            d_report, d_rows = _memcli_verify(d_corpus, tmp / "d", lora, model, "torch", threads, batch_tokens)
            results["d"] = {"seconds": d_report["timings"]["pass_s"], "setup_s": d_report["timings"]["setup_s"],
                            "entries": d_report["totals"]["entries"], "tokens": d_report["totals"]["answer_tokens"],
                            # the k-th verified entry of the subset file is examples[k]
                            "verdicts": {examples[k].line: d_rows[line]["exact"]
                                         for k, line in enumerate(sorted(d_rows))}}
        if "kernel" not in skip:
            say.print("kernel vs numpy on 512 x 49152 ...")
            results["kernel"] = bench_kernel(512, 49152, repeats=3, threads=threads or 0)
        if "memory" not in skip and sizes:
            say.print(f"peak memory of verify for {', '.join(map(str, sizes))} entries (child processes) ...")
            results["memory"] = measure_memory(sizes, lora, model, threads, batch_tokens, tmp)

    # --- the table ---------------------------------------------------------------------------------------
    a_rate = _rate(a["seconds"], n_all)
    table = Table(title=f"memcli bench verify: {Path(corpus).name}, {n_all:,} entries, {tok_all:,} answer tokens, "
                        f"{spec.name}{' + adapter' if lora else ''}, threads {threads or 'all'}")
    for col in ("method", "entries", "entries/s", "tokens/s", "corpus s", "(a) is", "agree", "load s"):
        table.add_column(col, justify="left" if col == "method" else "right")
    table.add_row("(a) memcli verify llama", f"{n_all:,}", f"{a_rate:,.2f}",
                  f"{tok_all / a['seconds']:,.1f}", f"{a['seconds']:,.1f}", "1.0x", "-", f"{a['setup_s']:.1f}")
    names = {"b": "(b) HF generate", "c": "(c) llama-cpp-python gen.", "d": "(d) memcli verify torch"}
    for k in ("b", "c", "d"):
        r = results.get(k)
        if r is None:
            continue
        # A capped baseline generated r["tokens"] of its entries' answer tokens: scale its time per entry up.
        full = sum(len(ex.target_ids) for ex in examples[: r["entries"]])
        scale = full / max(r["tokens"], 1) if k != "d" else 1.0
        rate = _rate(r["seconds"] * scale, r["entries"])
        whole = n_all / rate if rate else float("nan")
        scaled = r["entries"] < n_all or scale > 1.0
        speedup = whole / a["seconds"]
        r.update(whole_corpus_s=whole, speedup=speedup, scaled=scaled)
        agree, compared = _agreement(r["verdicts"], rows, baseline_tokens if k != "d" else None)
        r.update(agree=agree, compared=compared)
        table.add_row(names[k], f"{r['entries']:,}" + (" (subset)" if r["entries"] < n_all else ""),
                      f"{rate:,.2f}", f"{r['tokens'] / r['seconds']:,.1f}",
                      f"{whole:,.1f}" + (" (scaled)" if scaled else ""), f"{speedup:,.1f}x faster",
                      f"{agree}/{compared}", f"{r.get('load_s', r.get('setup_s', 0)):.1f}")
    console.print(table)
    console.print("tokens/s: answer tokens; corpus s: seconds for the whole corpus (model loading excluded, "
                  "shown as load s); agree: entries whose exact-match verdict equals (a)'s.", highlight=False)
    if any(results.get(k, {}).get("scaled") for k in ("b", "c", "d")):
        console.print(f"(scaled): measured on the first {n_sub} entries"
                      + (f", at most {baseline_tokens} generated tokens each" if capped else "")
                      + f"; time for all {n_all:,} entries extrapolated linearly"
                      + (" (an under-estimate for long values: attention cost grows with position)" if capped else "")
                      + ".", highlight=False)
    t = a["timings"]
    overhead = (t["pack_s"] + t["score_s"]) / t["decode_s"] if t["decode_s"] else float("nan")
    whole_overhead = (t["pass_s"] - t["decode_s"]) / t["decode_s"] if t["decode_s"] else float("nan")
    results["a"].update(pack_score_vs_decode=overhead, pass_overhead_vs_decode=whole_overhead)
    console.print(f"(a) decode alone {t['decode_s']:.2f} s in {t['decodes']} llama_decode calls; packing "
                  f"{t['pack_s'] * 1e3:.1f} ms + scoring {t['score_s'] * 1e3:.1f} ms = {overhead:.2%} of decode "
                  f"(target <= {TARGETS['overhead']:.0%}); the whole pass (with verdicts and entries.jsonl) "
                  f"{t['pass_s']:.2f} s = decode + {whole_overhead:.2%}; setup (model, adapter, tokenisation) "
                  f"{t['setup_s']:.1f} s", highlight=False)
    if "b" in results:
        target = TARGETS["long_value_vs_b"] if n_all == 1 else TARGETS["phonebook_vs_b"]
        console.print(f"(a) vs (b): {results['b']['speedup']:.1f}x (target >= {target:g}x for "
                      f"{'one long value' if n_all == 1 else 'a PhoneBook'})", highlight=False)
    k = results.get("kernel")
    if k:
        if k.get("speedup"):
            console.print(f"kernel vs numpy, 512 x 49152: native {k['native_s'] * 1e3:.1f} ms, numpy "
                          f"{k['numpy_s'] * 1e3:.1f} ms: {k['speedup']:.1f}x (target >= {TARGETS['kernel']:g}x; "
                          f"{k['threads']} threads, {k['isa']})", highlight=False)
        else:
            console.print("kernel vs numpy: the native kernel is not built", highlight=False)
    for m in results.get("memory", []):
        heap = f", Python heap {m['python_heap_peak_mb']:.1f} MB" if m.get("python_heap_peak_mb") else ""
        growth = (f", {m['bytes_per_entry_since']:+.0f} bytes per added entry (target < 200)"
                  if "bytes_per_entry_since" in m else "")
        console.print(f"peak memory, {m['entries']:,} entries: RSS {m['peak_rss_mb']:.0f} MB{heap}{growth} "
                      f"({m['seconds']:.1f} s)", highlight=False)
    if out is not None:
        for r in (results.get(k) for k in ("b", "c", "d")):
            if r is not None:
                r["verdicts"] = {str(line): v for line, v in r["verdicts"].items()}
        Path(out).write_text(json.dumps(results, indent=2, default=str) + "\n")
    return results
