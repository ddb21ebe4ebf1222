"""Benchmark: adapter GGUF export time and file size per LoRA rank on the default model.

    memcli bench export [--ranks 1,2,4,8,16,32,64] [--outtype f32] [--model smollm2-135m]

Each rank gets a fresh seeded random adapter on the default placement (the middle layer's MLP projections),
saved in PEFT format, then exported; the time is export_adapter's wall time (reading the PEFT folder, checking and
fingerprinting the base, writing the GGUF).
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from memcli.core import models
from memcli.gguf.adapter import export_adapter
from memcli.training import lora


def bench_export(ranks=(1, 2, 4, 8, 16, 32, 64), outtype: str = "f32", model: str | None = None,
                 repeats: int = 3, seed: int = 0) -> list[dict]:
    """[{rank, params, outtype, seconds (best of `repeats`), bytes}] for each rank."""
    import torch

    spec = models.resolve(model)
    base_model, _ = models.load_model(spec)
    layers, modules = lora.resolve_placement(base_model, None, None)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memcli-bench-export-") as tmp:
        for rank in ranks:
            peft_model = lora.add_lora(base_model, rank, None, 0.0, layers, modules, seed)
            g = torch.Generator().manual_seed(seed + rank)
            with torch.no_grad():
                for name, p in peft_model.named_parameters():
                    if "lora_" in name:
                        p.copy_(torch.randn(p.shape, generator=g) * 0.02)
            folder = Path(tmp) / f"r{rank}"
            peft_model.save_pretrained(folder)
            base_model = peft_model.unload()  # the bare base again, for the next rank
            out = Path(tmp) / f"r{rank}.gguf"
            times = []
            for _ in range(repeats):
                t0 = time.perf_counter()
                info = export_adapter(folder, out, outtype=outtype, base=spec)
                times.append(time.perf_counter() - t0)
            rows.append({"rank": rank, "params": info["params"], "outtype": outtype, "seconds": min(times),
                         "bytes": info["bytes"]})
    return rows


def format_table(rows: list[dict]) -> str:
    lines = ["| rank | parameters | outtype | export time (s) | file size (KiB) |",
             "|-----:|-----------:|:-------:|----------------:|----------------:|"]
    for r in rows:
        lines.append(f"| {r['rank']} | {r['params']:,} | {r['outtype']} | {r['seconds']:.3f} | "
                     f"{r['bytes'] / 1024:,.1f} |")
    return "\n".join(lines)
