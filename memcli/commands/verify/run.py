"""`memcli verify`: certify greedy verbatim recall from one teacher-forced pass (docs/method.md §2).

Greedy decoding reproduces a value exactly if and only if, fed the correct prefix, the model's argmax is the
target at every answer position, so one batched forward pass over key+value decides recall and the first
failure.

`verify` runs four steps: resolve the inputs (options, what --lora names and its base: sources.py; the corpus in
the tokenisation training used), open a backend (llama.cpp on the adapter GGUF: llama.py; torch on the PEFT
adapter: peft_backend.py), stream the teacher-forced pass into verdicts (memcli/core/verdicts.py) and the report folder
(report.py), and write the report (with real greedy generation on a sample when asked: generation.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from memcli.commands.verify import base_vs_tuned
from memcli.commands.verify.generation import compare_generation, generation_sample
from memcli.commands.verify.report import ProbabilityPlot, ReportWriter, check_out_dir, entry_row
from memcli.commands.verify.sources import (
    BASE_CHOICES,
    AdapterSource,
    Base,
    gguf_is_stale,
    recorded_base,
    resolve_adapter,
    resolve_base,
    verify_base,
)
from memcli.core import corpus, models
from memcli.core.errors import UserError
from memcli.core.runs import json_safe
from memcli.core.verdicts import DEFAULT_RISK_MARGIN, KEEP_LINES, EntryVerdict, RecallTotals, passes, score_stream
from memcli.deploy.certify import certify
from memcli.gguf.adapter import check_pair, export_adapter
from memcli.gguf.fingerprint import check_base
from memcli.llama.checks import tokenization_mismatches
from memcli.llama.sampler import Sampler, sampler_of
from memcli.llama.scorer import LlamaBackend

BACKENDS = ("llama", "torch")


@dataclass
class VerifyOptions:
    backend: str = "llama"
    n_gpu_layers: int | None = None  # llama: None = all when llama.cpp has GPU offload, else 0
    threads: int | None = None
    batch_tokens: int = 2048
    generate: int = 0
    min_exact: float = 1.0
    answer_tokens: int | None = None
    chat_template: bool | None = None  # None: the run's setting, else False
    eos: bool | None = None
    system_prompt: str | None = None  # with chat_template: None: the run's setting (else none)
    key: str | None = None
    risk_margin: float = DEFAULT_RISK_MARGIN
    kv_type: str = "f16"  # llama.cpp KV cache type: f16 (llama.cpp's default) or f32
    device: str = "auto"  # torch backend
    plot: bool = True
    allow_conflicting_keys: bool | None = None  # None: the run's setting, else False
    share_prefix: bool = True  # llama: decode a prompt prefix a batch's entries share once (docs/method.md §2)
    chunk: int = 4096  # entries read and tokenised at a time
    base: str = "auto"  # llama, a model shipped quantised: auto/training (F16 of training's weights) or shipped
    locality: str | None = None  # None: off; "": the default reference; else a text file (verify/locality.py)
    locality_base: str | None = None  # the base GGUF a merged --model is compared with
    sampler: Sampler | None = None  # the runner's decoding (llama/sampler.py); None: the run's, else greedy
    recheck_margin: float | None = None  # llama: near ties scored again as served; None: by the weights (scorer)
    deploy: tuple = ()  # llama.cpp file types: also certify both deployment forms of each (memcli.deploy.certify)

    def validate(self) -> None:
        checks = [
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'"),
            (self.batch_tokens >= 1, f"--batch-tokens must be at least 1, got {self.batch_tokens}"),
            (self.generate >= 0, f"--generate must be at least 0, got {self.generate}"),
            (0.0 <= self.min_exact <= 1.0, f"--min-exact must be between 0 and 1, got {self.min_exact}"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.risk_margin >= 0, f"--risk-margin must be >= 0, got {self.risk_margin}"),
            (self.recheck_margin is None or self.recheck_margin >= 0,
             f"--recheck-margin must be >= 0, got {self.recheck_margin}"),
            (self.base in BASE_CHOICES, f"--base must be one of {', '.join(BASE_CHOICES)}, got '{self.base}'"),
            (self.kv_type in ("f16", "f32"), f"--kv-type must be f16 or f32, got '{self.kv_type}'"),
            (not self.deploy or self.backend == "llama", "--deploy verifies in llama.cpp: use --backend llama"),
            (not (self.generate and self.sampler is not None and self.sampler.active and self.backend == "torch"),
             "--generate with --sampler runs in llama.cpp: use --backend llama"),
            (self.answer_tokens is None or self.answer_tokens >= 1,
             f"--answer-tokens must be at least 1, got {self.answer_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


# --- 1. the inputs -------------------------------------------------------------------------------------------

@dataclass
class Inputs:
    """What is verified: the corpus (scanned, then streamed in the tokenisation training used), the adapter and
    its base."""

    corpus_path: str | os.PathLike
    lora: str | os.PathLike | None
    model: str | None  # --model as given
    src: AdapterSource
    base: Base
    chat_template: bool
    eos: bool
    key: str
    answer_tokens: int | None
    scan: object  # corpus.CorpusScan: the whole file parsed and checked, its entry count
    entries: int  # how many entries are verified (fewer than scanned with --answer-tokens on many entries)
    tokenizer: object
    chunk: int = 4096
    system_prompt: str | None = None  # with chat_template: the system message the keys are rendered with

    @property
    def trained_for(self) -> list[str]:
        """The types a `train --deploy TYPES` run was trained for, when verify decodes the run's own model."""
        deploy = self.src.settings.get("deploy") if self.model is None else None
        return deploy.split(",") if deploy else []

    def chunks(self, n_ctx: int | None = None):
        """(entries, examples) in chunks, read and tokenised as they are pulled (memory stays flat)."""
        return corpus.iter_prepared(self.scan, self.tokenizer, chat_template=self.chat_template, eos=self.eos,
                                    answer_tokens=self.answer_tokens, n_ctx=n_ctx, chunk=self.chunk,
                                    system_prompt=self.system_prompt)


def resolve_inputs(corpus_path, lora, model: str | None, opts: VerifyOptions) -> Inputs:
    """The corpus options (the option, else the run's setting), the corpus scanned (format errors and
    conflicting keys first, before any model loads), the base and its tokenizer."""
    src = resolve_adapter(lora)
    s = src.settings
    chat_template = opts.chat_template if opts.chat_template is not None else bool(s.get("chat_template", False))
    eos = opts.eos if opts.eos is not None else bool(s.get("eos", False))
    key = opts.key if opts.key is not None else s.get("key", "") or ""
    answer_tokens = opts.answer_tokens if opts.answer_tokens is not None else s.get("answer_tokens")
    allow_conflicts = (opts.allow_conflicting_keys if opts.allow_conflicting_keys is not None
                       else bool(s.get("allow_conflicting_keys", False)))
    scan = corpus.scan_corpus(corpus_path, key, allow_conflicting_keys=allow_conflicts)
    base = resolve_base(src, model)
    tokenizer = models.load_tokenizer(base.token_spec)
    if opts.system_prompt is not None and not chat_template:
        raise UserError("--system-prompt is the system message of --chat-template; add --chat-template (or verify "
                        "a run trained with it)")
    system_prompt = opts.system_prompt if opts.system_prompt is not None else corpus.system_prompt_of(s)
    inp = Inputs(corpus_path, lora, model, src, base, chat_template, eos, key, answer_tokens, scan, scan.entries,
                 tokenizer, opts.chunk, system_prompt)
    if answer_tokens is not None and scan.entries > 1:  # the first l answer tokens: count the entries they hold
        inp.entries = sum(len(examples) for _, examples in inp.chunks())
    return inp


# --- 2. the backend ------------------------------------------------------------------------------------------

def _open_llama(inp: Inputs, opts: VerifyOptions, stack: ExitStack, log) -> tuple[object, dict]:
    src, spec = inp.src, inp.base.spec
    if src.given is not None and src.gguf is None and src.run_dir is None:
        # a bare PEFT folder is exported onto this base, so check_pair below cannot tell: check here
        check_base(recorded_base(src, inp.base.peft_base, spec), spec, src.given)
    base, base_info = verify_base(spec, opts.base, inp.trained_for[0] if inp.trained_for else None)
    if base_info["kind"] not in ("given", "hf-f32"):
        log(f"base: {base.name} ({base_info['why']})")
    adapter = src.gguf
    if src.given is not None and (adapter is None or gguf_is_stale(src)):
        temp_dir = tempfile.mkdtemp(prefix="memcli-verify-")
        stack.callback(shutil.rmtree, temp_dir, ignore_errors=True)
        adapter = Path(temp_dir) / "adapter.gguf"
        why = "is older than its adapter/" if src.gguf is not None else "has none"
        log(f"exporting the adapter to GGUF for llama.cpp ({src.run_dir or src.peft_dir} {why})")
        export_adapter(src.run_dir or src.peft_dir, adapter,
                       base=None if (src.run_dir or inp.model is None) else spec)
    if adapter is not None:
        check_pair(adapter, base)
    backend = LlamaBackend(base, adapter, n_gpu_layers=opts.n_gpu_layers, threads=opts.threads,
                           kv_type=opts.kv_type, share_prefix=opts.share_prefix, sampler=opts.sampler,
                           recheck_margin=opts.recheck_margin, log=log)
    stack.callback(backend.close)
    return backend, {"base_gguf": str(base), "base": base_info,
                     "adapter_gguf": str(src.gguf or adapter) if adapter else None}


def _open_torch(inp: Inputs, opts: VerifyOptions, stack: ExitStack) -> tuple[object, dict]:
    from memcli.commands.verify.peft_backend import TorchBackend  # lazy: keeps torch off the llama.cpp path

    src = inp.src
    if src.given is not None and src.peft_dir is None:
        raise UserError(f"--backend torch needs the PEFT adapter: {src.given} is a GGUF with no memcli run "
                        "folder beside it; give the run folder or the PEFT adapter folder as --lora")
    expect = recorded_base(src, inp.base.peft_base, inp.base.spec) if src.given is not None else None
    backend = TorchBackend(inp.base.spec, src.peft_dir, device=opts.device, threads=opts.threads, expect_base=expect,
                           sampler=opts.sampler)
    stack.callback(backend.close)
    return backend, {"peft_adapter": str(src.peft_dir) if src.peft_dir else None}


def open_backend(inp: Inputs, opts: VerifyOptions, stack: ExitStack, log) -> tuple[object, dict]:
    """The backend, loaded with the adapter and opened for a streamed corpus (closed by `stack`), and the
    settings it adds to the report."""
    if opts.backend == "llama":
        backend, settings = _open_llama(inp, opts, stack, log)
    else:
        backend, settings = _open_torch(inp, opts, stack)
    backend.open(None, opts.batch_tokens)
    return backend, settings


class TokenizerCheck:
    """llama.cpp only: entries its own tokenizer splits differently from the ids verified (a warning), counted
    chunk by chunk."""

    def __init__(self, backend, inp: Inputs):
        self.backend, self.inp = backend, inp
        self.count, self.lines = 0, []

    def add(self, entries, examples) -> None:
        inp = self.inp
        bad = tokenization_mismatches(self.backend.tokenize, examples, entries, inp.tokenizer, inp.chat_template,
                                      inp.eos, prefix_only=inp.answer_tokens is not None and inp.scan.entries == 1,
                                      system_prompt=inp.system_prompt)
        self.count += len(bad)
        self.lines.extend(examples[i].line for i in bad[: KEEP_LINES - len(self.lines)])

    def result(self, log) -> dict | None:
        if self.backend.name != "llama":
            return None
        if self.count:
            log(f"warning: llama.cpp's own tokenizer splits {self.count} of {self.inp.entries} entries differently "
                f"from the ids verified (first: {self.inp.corpus_path}:{self.lines[0]}); the verdicts hold for "
                "the ids training used")
        return {"mismatches": self.count, "lines": self.lines}


# --- 3. the teacher-forced pass ------------------------------------------------------------------------------

@dataclass
class Pass:
    totals: RecallTotals
    plot: ProbabilityPlot | None
    kept: dict[int, tuple[EntryVerdict, np.ndarray, object, int]]  # --generate's: verdict, margins, example, line
    seconds: float
    verdict_seconds: float
    timings: dict  # the backend's, for the pass alone (generation adds its own decodes)
    tokenizer_check: dict | None = None


def stream_pass(backend, inp: Inputs, opts: VerifyOptions, writer: ReportWriter, progress, log=print) -> Pass:
    """Corpus chunks -> backend batches -> verdicts -> entries.jsonl, totals and the plot, one batch at a time
    (memcli.core.verdicts.score_stream): an entry is held from its chunk's tokenisation until its verdict is
    written, so memory does not grow with the corpus."""
    plot = ProbabilityPlot() if opts.plot else None
    wanted = set(generation_sample(inp.entries, opts.generate))
    kept: dict[int, tuple[EntryVerdict, np.ndarray, object, int]] = {}
    check = TokenizerCheck(backend, inp) if backend.name == "llama" else None
    t_verdict, done = 0.0, 0

    def pairs():
        for entries, examples in inp.chunks(backend.n_ctx_train):
            if check is not None:
                check.add(entries, examples)
            yield from zip(entries, examples)

    def on_entry(v, entry, ex, stats, offset):
        nonlocal t_verdict, done
        t0 = time.perf_counter()
        writer.entry(entry_row(v, ex.line, entry.key, inp.tokenizer, ex.target_ids))
        if plot is not None:
            plot.add(stats.prob[offset: offset + v.answer_tokens])
        if v.index in wanted:
            kept[v.index] = (v, stats.margin[offset: offset + v.answer_tokens].copy(), ex, ex.line)
        done += 1
        t_verdict += time.perf_counter() - t0
        if progress is not None:
            progress(done, inp.entries)

    t_pass = time.perf_counter()
    totals = score_stream(backend, pairs(), opts.batch_tokens, opts.risk_margin, on_entry)
    seconds = time.perf_counter() - t_pass
    return Pass(totals, plot, kept, seconds, t_verdict, dict(backend.timings),
                check.result(log) if check is not None else None)


def run_generation(backend, inp: Inputs, opts: VerifyOptions, kept: dict, log) -> dict | None:
    """--generate K: real greedy generation of the sampled entries against their teacher-forced verdicts."""
    if not kept:
        return None
    t0 = time.perf_counter()
    generated = backend.generate({i: k[2] for i, k in kept.items()}, sorted(kept))
    generation = compare_generation(generated, {i: k[:2] for i, k in kept.items()},
                                    {i: k[3] for i, k in kept.items()}, near=opts.risk_margin)
    generation["seconds"] = round(time.perf_counter() - t0, 3)
    if generation["disagreements"]:
        log(f"warning: greedy generation disagrees with the teacher-forced first failure on "
            f"{len(generation['disagreements'])} of {len(generated)} entries: {generation['ties']} at an "
            f"exact logit tie, {generation['near_ties']} at a near tie (|margin| < {opts.risk_margin} "
            f"in both), {generation['unexplained']} otherwise")
    return generation


# --- 4. the report -------------------------------------------------------------------------------------------

def certify_deploy(inp: Inputs, opts: VerifyOptions, report_dir: Path, stack: ExitStack, log) -> list[dict]:
    """--deploy TYPES: both deployment forms of every type, made from the run's adapter as it is now and certified
    by memcli.deploy.certify over the corpus in the run's tokenisation; entries to `deploy/<form>-<type>.jsonl`."""
    (report_dir / "deploy").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".memcli-deploy-", dir=report_dir.parent))
    stack.callback(shutil.rmtree, work, ignore_errors=True)

    def pairs(n_ctx):
        for entries, examples in inp.chunks(n_ctx):
            yield from zip(entries, examples)

    def row(v, entry, ex):
        return entry_row(v, ex.line, entry.key, inp.tokenizer, ex.target_ids)

    return certify(inp.src.run_dir or inp.src.peft_dir, inp.base.token_spec, opts.deploy, pairs, work,
                   batch_tokens=opts.batch_tokens, risk_margin=opts.risk_margin, entries_dir=report_dir / "deploy",
                   entry_row=row, log=log, n_gpu_layers=opts.n_gpu_layers, threads=opts.threads, kv_type=opts.kv_type,
                   share_prefix=opts.share_prefix, samplers=(opts.sampler,), recheck_margin=opts.recheck_margin)


def build_report(inp: Inputs, opts: VerifyOptions, backend, backend_settings: dict, done: Pass,
                 generation: dict | None, setup_s: float, total_s: float, locality: dict | None = None) -> dict:
    """report.json's content."""
    summary = done.totals.summary()
    timing, t_pass = dict(done.timings), done.seconds
    decode = timing.get("decode_s", 0.0)
    timing.update(setup_s=round(setup_s, 3), pass_s=round(t_pass, 3), verdict_s=round(done.verdict_seconds, 3),
                  total_s=round(total_s, 3),
                  entries_per_s=round(inp.entries / t_pass, 2) if t_pass else None,
                  answer_tokens_per_s=round(done.totals.answer_tokens / t_pass, 1) if t_pass else None,
                  overhead_vs_decode=round((t_pass - decode) / decode, 4) if decode else None)
    return {
        "passed": passes(summary["exact_match_rate"], opts.min_exact),
        "totals": summary,
        "settings": {"corpus": str(inp.corpus_path), "lora": str(inp.lora) if inp.lora is not None else None,
                     "model": inp.base.spec.name, "backend": opts.backend, "batch_tokens": opts.batch_tokens,
                     "threads": opts.threads, "n_gpu_layers": opts.n_gpu_layers, "generate": opts.generate,
                     "min_exact": opts.min_exact, "risk_margin": opts.risk_margin, "kv_type": opts.kv_type,
                     "share_prefix": opts.share_prefix, "deploy": list(opts.deploy),
                     "sampler": opts.sampler.describe(),
                     "chat_template": inp.chat_template, "eos": inp.eos, "key": inp.key,
                     "system_prompt": inp.system_prompt,
                     "answer_tokens": inp.answer_tokens, **backend_settings},
        "backend": backend.describe(),
        "tokenizer_check": done.tokenizer_check,
        "generation": generation,
        "locality": locality,
        "timings": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in timing.items()},
    }


def verify(corpus_path: str | os.PathLike, out: str | os.PathLike, *, lora: str | os.PathLike | None = None,
           model: str | None = None, options: VerifyOptions | None = None,
           progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Verify greedy verbatim recall of every entry of a corpus; write the report folder `out`; return the
    report (report.json's content, NaN and infinities as None). Bad input raises UserError before anything is
    written."""
    t_start = time.perf_counter()
    opts = options or VerifyOptions()
    opts.validate()
    out = Path(out)
    check_out_dir(out)
    inp = resolve_inputs(corpus_path, lora, model, opts)
    if opts.sampler is None:  # the decoding the run was trained for (plain greedy for most runs)
        opts = replace(opts, sampler=sampler_of(inp.src.settings))
    locality_text = base_vs_tuned.windows(inp, opts, log)  # a bad --locality TEXT is refused before any model loads
    trained_for = inp.trained_for
    if trained_for and not opts.deploy and opts.backend == "llama" and opts.base == "auto":  # what the run promises
        opts = replace(opts, deploy=tuple(trained_for))
        log(f"{inp.src.given} was trained with --deploy {','.join(trained_for)}: certifying both deployed forms of "
            f"each type (--deploy {','.join(trained_for)})")
    if opts.deploy and inp.src.run_dir is None and inp.src.peft_dir is None:
        raise UserError("--deploy needs --lora as a run folder or PEFT adapter folder (the merged form is made from "
                        "the adapter's weights)")
    with ExitStack() as stack:  # closes, in reverse: the report folder (unless committed), backend, temp export
        backend, backend_settings = open_backend(inp, opts, stack, log)
        setup_s = time.perf_counter() - t_start
        writer = stack.enter_context(ReportWriter(out))
        done = stream_pass(backend, inp, opts, writer, progress, log)
        generation = run_generation(backend, inp, opts, done.kept, log)
        t0 = time.perf_counter()
        measured = base_vs_tuned.measure(backend, locality_text, opts, log) if locality_text is not None else None
        if measured is not None:
            measured["seconds"] = round(time.perf_counter() - t0, 3)
        deploy = certify_deploy(inp, opts, writer.tmp, stack, log) if opts.deploy else None
        report = build_report(inp, opts, backend, backend_settings, done, generation, setup_s,
                              time.perf_counter() - t_start, measured)
        if deploy is not None:
            report["deploy"] = deploy
            report["passed"] = report["passed"] and all(passes(r["exact_match_rate"], opts.min_exact) for r in deploy)
        t = report["totals"]
        writer.commit(report, done.plot, f"{Path(corpus_path).name}: exact {t['exact']}/{t['entries']}, certified "
                                         f"{t['certified']}, at risk {t['at_risk']} ({opts.backend})")
    return json_safe(report)
