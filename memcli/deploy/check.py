"""llama.cpp's verdict on the deployed files of an adapter: both forms of one type made from a PEFT folder and
scored in llama.cpp on the training examples (the check `memcli train --deploy --until-recall` stops on)."""

from __future__ import annotations

import time
from pathlib import Path

from .. import models
from .files import Deployed, make_forms


def score_forms(forms: list[Deployed], examples, *, batch_tokens: int = 2048, threads: int | None = None,
                log=None) -> list[dict]:
    """One row per form: exact, certified, at risk, smallest margin over `examples`, and which entries fail."""
    from ..gguf.adapter import check_pair
    from ..verify.llama import LlamaBackend
    from ..verify.report import Totals
    from ..verdicts import verdicts

    rows = []
    for d in forms:
        t0 = time.perf_counter()
        if d.adapter is not None:
            check_pair(d.adapter, d.model)
        totals, failing = Totals(), []
        with LlamaBackend(d.model, d.adapter, threads=threads, log=log) as backend:
            backend.open(examples, batch_tokens)
            for batch in backend.score(examples, batch_tokens):
                for v in verdicts(batch.stats, batch.targets, batch.lengths, batch.indices):
                    totals.add(v, v.index)
                    if not v.certified:
                        failing.append(v.index)
        s = totals.summary()
        rows.append({"form": d.form, "type": d.type, "bytes": d.bytes, "entries": s["entries"], "exact": s["exact"],
                     "certified": s["certified"], "at_risk": s["at_risk"], "min_margin": s["min_margin"],
                     "uncertified": failing, "seconds": round(time.perf_counter() - t0, 3)})
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
