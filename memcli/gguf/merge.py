"""Deployable model files: a LoRA merged into its base (`export_merged`), or the base alone (`export_quantised`),
as one self-contained llama.cpp GGUF in any of llama.cpp's file types.

The merge is done in float32 on the weights training used (W + scale * B @ A, PEFT's scale as the adapter
export folds it) and written by `export_base` with the model's tokenizer and metadata; every other type is then
made from that float file by llama.cpp's own quantiser (memcli.gguf.quantize), as users quantise.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

from .. import models
from ..errors import UserError
from ..quants import check_quant
from . import quantize as q
from .adapter import MERGED_KEY, _adapter_source, _resolve_base, adapter_pairs
from .base import export_base, folder_stamp
from .hf import read_hf, read_json

_F32_LIMIT = 2 * 10**9  # parameters up to which the float file the quantiser reads is F32 (else F16)


def merge_deltas(src: str | os.PathLike, base: models.ModelSpec | None = None):
    """(deltas: HF weight name -> scale * B @ A, the base's ModelSpec, its memcli name) for a run folder or a PEFT
    folder."""
    peft_dir, run_model = _adapter_source(Path(src))
    cfg = read_json(peft_dir / "adapter_config.json", "adapter config")
    spec, name = _resolve_base(peft_dir, cfg, run_model, base)
    hf = read_hf(models.hf_dir(spec))
    pairs, _ = adapter_pairs(peft_dir, hf, _permute=False)  # HF row order: export_base permutes the sum
    return {p.module + ".weight": p.b @ p.a for p in pairs}, spec, name


def _float_type(folder: Path, quant: str) -> str:
    """The float type of the file llama.cpp's quantiser reads (or the type itself for f32/f16)."""
    if quant in ("f32", "f16"):
        return quant
    n = sum(math.prod(s) for s in read_hf(folder).shapes.values())
    return "f32" if n <= _F32_LIMIT else "f16"


def _write(folder: Path, out: Path, quant: str, name: str, deltas: dict | None, metadata: dict,
           threads: int | None) -> dict:
    """export_base (float) and, for other types, llama.cpp's quantiser on a temporary float file beside `out`."""
    t0 = time.perf_counter()
    quant = check_quant(quant)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / f'model.{quant}.gguf'}")
    ftype = _float_type(folder, quant)
    if ftype == quant:
        info = export_base(folder, out, quant, name=name, deltas=deltas, metadata=metadata)
        info.update(type=quant, tensor_types=None, fallbacks=[])
    else:
        tmp = out.with_name(f".{out.name}.{os.getpid()}.{ftype}.tmp")
        try:
            export_base(folder, tmp, ftype, name=name, deltas=deltas, metadata=metadata)
            info = q.quantize(tmp, out, quant, threads)
        finally:
            tmp.unlink(missing_ok=True)
        info.update(name=name, arch=read_hf(folder).arch)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def export_merged(src: str | os.PathLike, out: str | os.PathLike, quant: str = "f16",
                  base: models.ModelSpec | None = None, threads: int | None = None) -> dict:
    """Write a run's (or PEFT folder's) LoRA merged into its base as a model GGUF of type `quant`."""
    quant = check_quant(quant, "--quant")
    deltas, spec, name = merge_deltas(src, base)
    info = _write(models.hf_dir(spec), Path(out), quant, f"{name} + memcli LoRA", deltas,
                  {MERGED_KEY: str(Path(src).resolve())}, threads)
    info.update(model=name, merged=len(deltas))
    return info


def export_quantised(model: str, out: str | os.PathLike, quant: str, threads: int | None = None) -> dict:
    """Write a model (a memcli name or an HF folder) as a base GGUF of type `quant` (the weights training uses,
    quantised by llama.cpp): the base an adapter is deployed over."""
    quant = check_quant(quant, "--quant")
    spec = models.resolve(model)
    info = _write(models.hf_dir(spec), Path(out), quant, spec.name, None, {}, threads)
    info.update(model=spec.name)
    return info


def deployed_base(spec: models.ModelSpec, quant: str, threads: int | None = None) -> Path:
    """The base of `spec` as type `quant`, built once into the cache (the quantiser is deterministic) and reused."""
    folder = models.hf_dir(spec)
    out = models.cache_dir() / "gguf" / f"{folder.name}-{folder_stamp(folder)}.{quant}.gguf"
    if not out.exists():
        _write(folder, out, quant, spec.name, None, {}, threads)
    return out
