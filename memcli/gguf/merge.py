"""Deployable model files: a LoRA merged into its base (`export_merged`), or the base alone (`export_quantised`),
as one self-contained llama.cpp GGUF in any of llama.cpp's file types.

The merge is done in float32 on the weights training used (W + scale * B @ A, PEFT's scale as the adapter
export folds it) and written by `export_base` with the model's tokenizer and metadata; every other type is then
made from that float file by llama.cpp's own quantiser (memcli.llama.quantize), as users quantise.
"""

from __future__ import annotations

import os
from pathlib import Path

from memcli.core import models
from memcli.core.quants import check_quant
from memcli.gguf.adapter import MERGED_KEY, _adapter_source, _resolve_base, adapter_pairs
from memcli.gguf.base import write_model
from memcli.gguf.hf import read_hf, read_json


def merge_deltas(src: str | os.PathLike, base: models.ModelSpec | None = None):
    """(deltas: HF weight name -> scale * B @ A, the base's ModelSpec, its memcli name) for a run folder or a PEFT
    folder."""
    peft_dir, run_model = _adapter_source(Path(src))
    cfg = read_json(peft_dir / "adapter_config.json", "adapter config")
    spec, name = _resolve_base(peft_dir, cfg, run_model, base)
    hf = read_hf(models.hf_dir(spec))
    pairs, _ = adapter_pairs(peft_dir, hf, _permute=False)  # HF row order: export_base permutes the sum
    return {p.module + ".weight": p.b @ p.a for p in pairs}, spec, name


def export_merged(src: str | os.PathLike, out: str | os.PathLike, quant: str = "f16",
                  base: models.ModelSpec | None = None, threads: int | None = None,
                  source: str | os.PathLike | None = None) -> dict:
    """Write a run's (or PEFT folder's) LoRA merged into its base as a model GGUF of type `quant`; the file names
    `source` (default: src) as the adapter merged into it."""
    quant = check_quant(quant, "--quant")
    deltas, spec, name = merge_deltas(src, base)
    info = write_model(models.hf_dir(spec), Path(out), quant, f"{name} + memcli LoRA", deltas,
                  {MERGED_KEY: str(Path(source or src).resolve())}, threads)
    info.update(model=name, merged=len(deltas))
    return info


def export_quantised(model: str, out: str | os.PathLike, quant: str, threads: int | None = None) -> dict:
    """Write a model (a memcli name or an HF folder) as a base GGUF of type `quant` (the weights training uses,
    quantised by llama.cpp): the base an adapter is deployed over."""
    quant = check_quant(quant, "--quant")
    spec = models.resolve(model)
    info = write_model(models.hf_dir(spec), Path(out), quant, spec.name, None, {}, threads)
    info.update(model=spec.name)
    return info
