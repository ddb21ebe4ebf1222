"""llama.cpp's verdict on the deployed files of an adapter: both forms of one type made from a PEFT folder and
scored in llama.cpp on the training examples (the check `memcli train --deploy --until-recall` stops on)."""

from __future__ import annotations

import time
from pathlib import Path

from .. import models
from .files import Deployed, make_forms


def score_form(d: Deployed, run_pass, log=None, **backend_options) -> dict:
    """One deployment form in llama.cpp: the adapter's pair checked, a backend loaded on the form's files,
    `run_pass(backend)` (opens it and runs the teacher-forced pass; returns its verify.report.Totals), and the
    form's row of the deploy table. `backend_options` go to verify.llama.LlamaBackend."""
    from ..gguf.adapter import check_pair
    from ..verify.llama import LlamaBackend

    t0 = time.perf_counter()
    if d.adapter is not None:
        check_pair(d.adapter, d.model)
    with LlamaBackend(d.model, d.adapter, log=log, **backend_options) as backend:
        s = run_pass(backend).summary()
    return {"form": d.form, "type": d.type, "bytes": d.bytes, "model_gguf": d.model.name, "entries": s["entries"],
            "exact": s["exact"], "exact_match_rate": s["exact_match_rate"], "certified": s["certified"],
            "at_risk": s["at_risk"], "min_margin": s["min_margin"], "min_p": s["min_p"],
            "failing_lines": s["failing_lines"], "fallbacks": len(d.fallbacks),
            "seconds": round(time.perf_counter() - t0, 3)}


def score_forms(forms: list[Deployed], examples, *, batch_tokens: int = 2048, threads: int | None = None,
                log=None) -> list[dict]:
    """One row per form over a list of examples, with the indices of the entries not certified."""
    from ..verdicts import verdicts
    from ..verify.report import Totals

    rows = []
    for d in forms:
        uncertified = []

        def run_pass(backend):
            totals = Totals()
            backend.open(examples, batch_tokens)
            for batch in backend.score(examples, batch_tokens):
                for v in verdicts(batch.stats, batch.targets, batch.lengths, batch.indices):
                    totals.add(v, v.index)
                    if not v.certified:
                        uncertified.append(v.index)
            return totals

        rows.append({**score_form(d, run_pass, log=log, threads=threads), "uncertified": uncertified})
    return rows


def check_deployed(peft_dir: Path, spec: models.ModelSpec, quant: str, examples, work: Path, log=None,
                   keep_merged: Path | None = None) -> list[dict]:
    """Export the adapter, make both forms of `quant` in `work`, score them. With `keep_merged`, the merged file
    is moved there (the certified file to ship) instead of being left in `work`."""
    from ..gguf.adapter import export_adapter

    adapter = work / "adapter.gguf"
    export_adapter(peft_dir, adapter, base=spec)
    forms = make_forms(peft_dir, spec, adapter, quant, work)
    rows = score_forms(forms, examples, log=log)
    for d in forms:
        if d.form == "merged":
            if keep_merged is not None:
                keep_merged.parent.mkdir(parents=True, exist_ok=True)
                d.model.replace(keep_merged)
            else:
                d.model.unlink(missing_ok=True)
    return rows
