"""`memcli verify --deploy TYPES`: certify recall in the files users ship, not only in the weights training used.

For every type, both deployment forms (memcli.deploy.files): the adapter merged into the base and quantised by
llama.cpp, and the run's adapter over the base quantised by llama.cpp. Each is verified by the same
teacher-forced pass as the main report (the run's tokenisation and corpus options), its entries written to
`deploy/<form>-<type>.jsonl` in the report folder and its totals to one row of report.json's `deploy` table.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import replace
from pathlib import Path


class _Lines:
    """The `entry` sink of a pass, writing JSON lines to one file."""

    def __init__(self, path: Path):
        import json

        from ..runs import json_safe

        self._f, self._dumps, self._safe = open(path, "w", encoding="utf-8"), json.dumps, json_safe

    def entry(self, row: dict) -> None:
        self._f.write(self._dumps(self._safe(row), ensure_ascii=False) + "\n")

    def close(self) -> None:
        self._f.close()


def certify_deploy(inp, opts, report_dir: Path, score, log) -> list[dict]:
    """The deploy table for `opts.deploy` (types). `score(backend, sink)` runs the teacher-forced pass of the
    corpus on an opened backend and returns its Pass (memcli.verify.run.stream_pass)."""
    from ..deploy.check import score_form
    from ..deploy.files import make_forms
    from ..gguf.adapter import export_adapter

    src = inp.src
    spec = inp.base.token_spec  # the model training used: both forms are made from its weights
    (report_dir / "deploy").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".memcli-deploy-", dir=report_dir.parent))
    rows = []
    try:
        adapter = work / "adapter.gguf"  # the adapter as the run holds it now, exported afresh
        export_adapter(src.run_dir or src.peft_dir, adapter, base=spec)
        for quant in opts.deploy:
            for d in make_forms(src.run_dir or src.peft_dir, spec, adapter, quant, work):
                log(f"deploy: {d.form} {d.type} ({d.model.name}{' + adapter' if d.adapter else ''})")
                sink = _Lines(report_dir / "deploy" / f"{d.form}-{d.type}.jsonl")

                def run_pass(backend):
                    backend.open(None, opts.batch_tokens)
                    return score(backend, sink).totals

                try:
                    rows.append(score_form(d, run_pass, log=log, n_gpu_layers=opts.n_gpu_layers, threads=opts.threads,
                                           kv_type=opts.kv_type, share_prefix=opts.share_prefix))
                finally:
                    sink.close()
                if d.form == "merged":
                    d.model.unlink(missing_ok=True)  # the run's own file: made again by `memcli export --merge`
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def plain_options(opts):
    """The options of a deploy pass: no plot, no generation (the main pass has them)."""
    return replace(opts, plot=False, generate=0)
