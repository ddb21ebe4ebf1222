"""The one certifier of deployment forms: the files users ship, made from a run's adapter and scored in llama.cpp.

For every type, both forms (memcli.deploy.forms): the adapter merged into the base and quantised by llama.cpp,
and the adapter GGUF over the base quantised by llama.cpp. Each is loaded in llama.cpp and decided by the same
teacher-forced pass as every verdict (memcli.core.verdicts.score_stream); its row of the deploy table gives the
form's totals. `memcli train --deploy` calls it at every check, `memcli verify --deploy` once, with the entries
of each form written beside its report.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Callable, Iterable

from memcli.core import models
from memcli.core.runs import json_safe
from memcli.core.verdicts import DEFAULT_RISK_MARGIN, score_stream
from memcli.deploy.forms import Deployed, make_forms
from memcli.gguf.adapter import check_pair, export_adapter
from memcli.llama.sampler import GREEDY, Sampler
from memcli.llama.scorer import LlamaBackend

# (n_ctx of the loaded model) -> (payload, Example) pairs: the corpus in training's tokenisation, read afresh per form
Pairs = Callable[[int | None], Iterable[tuple[object, object]]]
EntryRow = Callable[[object, object, object], dict]  # (verdict, payload, example) -> one JSON line


def certify(run: str | os.PathLike, spec: models.ModelSpec, types: Iterable[str], pairs: Pairs, work: Path, *,
            batch_tokens: int = 2048, risk_margin: float = DEFAULT_RISK_MARGIN, entries_dir: Path | None = None,
            entry_row: EntryRow | None = None, keep_merged: Callable[[str], Path] | None = None, log=None,
            samplers: tuple[Sampler, ...] = (GREEDY,), source: Path | None = None, **backend_options) -> list[dict]:
    """One row per form, type and sampler: the run's adapter (a run folder or PEFT folder) exported to `work`,
    both forms of each type made there and scored over `pairs` under each runner's decoding. With `entries_dir`
    (one sampler), each form's entries go to `entries_dir/<form>-<type>.jsonl` (one `entry_row` per entry). The
    merged file is the run's own (naming `source`, default `run`, as its adapter): moved to `keep_merged(type)` when
    given, else deleted. `backend_options` go to memcli.llama.scorer.LlamaBackend."""
    if entries_dir is not None and len(samplers) != 1:
        raise ValueError("one entries file per form: certify under one sampler")
    adapter = work / "adapter.gguf"
    export_adapter(run, adapter, base=spec)
    rows = []
    for quant in types:
        for d in make_forms(run, spec, adapter, quant, work, source=source):
            if log is not None:
                log(f"deploy: {d.form} {d.type} ({d.model.name}{' + adapter' if d.adapter else ''})")
            for sampler in samplers:
                options = backend_options | {"sampler": sampler}
                rows.append(score_form(d, pairs, batch_tokens, risk_margin, entries_dir, entry_row, log, options)
                            | {"sampler": sampler.name})
            if d.form == "merged":
                if keep_merged is not None:
                    target = keep_merged(quant)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    d.model.replace(target)
                else:
                    d.model.unlink(missing_ok=True)
    return rows


def score_form(d: Deployed, pairs: Pairs, batch_tokens: int, risk_margin: float, entries_dir: Path | None,
               entry_row: EntryRow | None, log, backend_options: dict) -> dict:
    """One form in llama.cpp: the adapter's pair checked, the teacher-forced pass, the form's row."""
    t0 = time.perf_counter()
    if d.adapter is not None:
        check_pair(d.adapter, d.model)
    lines = open(entries_dir / f"{d.form}-{d.type}.jsonl", "w", encoding="utf-8") if entries_dir else None
    try:
        def write(v, payload, example, stats, offset):
            lines.write(json.dumps(json_safe(entry_row(v, payload, example)), ensure_ascii=False) + "\n")

        with LlamaBackend(d.model, d.adapter, log=log, **backend_options) as backend:
            backend.open(None, batch_tokens)
            s = score_stream(backend, pairs(backend.n_ctx_train), batch_tokens, risk_margin,
                             write if lines is not None else None).summary()
            rechecked = backend.timings["rechecked"]  # near ties scored again as served
    finally:
        if lines is not None:
            lines.close()
    return {"form": d.form, "type": d.type, "bytes": d.bytes, "model_gguf": d.model.name, "entries": s["entries"],
            "exact": s["exact"], "exact_match_rate": s["exact_match_rate"], "certified": s["certified"],
            "at_risk": s["at_risk"], "min_margin": s["min_margin"], "min_p": s["min_p"],
            "failing_lines": s["failing_lines"], "fallbacks": len(d.fallbacks), "rechecked": rechecked,
            "seconds": round(time.perf_counter() - t0, 3)}


def in_memory(examples: list) -> Pairs:
    """`pairs` for examples already tokenised (training's): no payload per entry."""
    return lambda n_ctx: ((None, ex) for ex in examples)
