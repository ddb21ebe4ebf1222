"""Quantising a model GGUF with llama.cpp's own quantiser (`llama_model_quantize`, through llama-cpp-python), as
users do before shipping a model to llama.cpp, ollama or LM Studio.

The types are memcli.core.quants' (llama.cpp's names, checked before any work). `quantize` first asks llama.cpp
for a dry run (it chooses every tensor's type without writing anything, so a model the type cannot take is
refused in one line before a byte is written), then writes the file and reports what llama.cpp chose: its
per-tensor types and the tensors it had to fall back for (rows not divisible by a K-quant's 256-element
blocks go to a 32-block type, e.g. Q4_K -> Q5_0), from llama.cpp's own log lines.
"""

from __future__ import annotations

import collections
import ctypes
import os
import re
import time
from pathlib import Path

from memcli.core import runs
from memcli.core.errors import UserError
from memcli.core.gguf_reader import read_gguf
from memcli.core.quants import check_quant
from memcli.llama import library

_FALLBACK = re.compile(r"warning:\s+(\S+)\s+- ncols\s+(\d+) not divisible by\s+(\d+) \(required for type\s+(\S+)\)"
                       r".*-> falling back to\s+(\S+)")


def _ftype(L, name: str) -> int:
    return L.LLAMA_FTYPE_ALL_F32 if name == "f32" else getattr(L, f"LLAMA_FTYPE_MOSTLY_{name.upper()}")


def _run(L, src: Path, dst: Path, name: str, threads: int, dry_run: bool) -> list[str]:
    """One llama_model_quantize call; llama.cpp's log lines of it. UserError when it fails."""
    params = L.llama_model_quantize_default_params()
    params.ftype = _ftype(L, name)
    params.nthread = threads
    params.allow_requantize = True  # a quantised source (the default model ships as Q4_1) is dequantised first
    params.dry_run = dry_run
    with library.capture_log() as lines:
        rc = L.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    text = "".join(lines)
    if rc != 0:
        why = [ln.strip() for ln in text.splitlines() if "failed" in ln or "error" in ln.lower()]
        raise UserError(f"llama.cpp cannot quantise {src} to {name}: {why[-1] if why else f'error {rc}'}")
    return text.splitlines()


def quantize(src: str | os.PathLike, dst: str | os.PathLike, name: str, threads: int | None = None) -> dict:
    """Quantise the model GGUF `src` to type `name` with llama.cpp's quantiser into `dst` (whole or absent).
    Returns {"type", "out", "bytes", "seconds", "tensor_types": {type: count}, "fallbacks": [...]}."""
    name = check_quant(name)
    src, t0 = Path(src), time.perf_counter()
    meta = read_gguf(src, "model")
    if meta.get("general.type", "model") != "model":
        raise UserError(f"{src} is not a model GGUF (general.type={meta.get('general.type')!r}): only a base or "
                        "merged model is quantised")
    L = library.lib()
    threads = threads or len(os.sched_getaffinity(0))
    _run(L, src, Path(os.devnull), name, threads, dry_run=True)  # refuses before anything is written
    lines: list[str] = []
    runs.atomic_write(dst, lambda tmp: lines.extend(_run(L, src, tmp, name, threads, dry_run=False)),
                      example=f"model.{name}.gguf")
    fallbacks = [{"tensor": m[1], "cols": int(m[2]), "block": int(m[3]), "wanted": m[4], "used": m[5]}
                 for m in (_FALLBACK.search(ln) for ln in lines) if m]
    types = collections.Counter(_type_name(t.type) for t in read_gguf(dst, "quantised model").tensors.values())
    return {"type": name, "out": str(dst), "bytes": Path(dst).stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3), "tensor_types": dict(types.most_common()),
            "fallbacks": fallbacks}


def _type_name(t: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(t).name.lower()


def describe_fallbacks(fallbacks: list[dict]) -> str | None:
    """One line: what llama.cpp fell back to and why, grouped, e.g. '60 tensors q4_K -> q5_0 (576 columns not
    divisible by 256)'; None when nothing fell back."""
    if not fallbacks:
        return None
    groups = collections.Counter((f["wanted"], f["used"], f["cols"], f["block"]) for f in fallbacks)
    return "; ".join(f"{n} tensor{'s' if n > 1 else ''} {w} -> {u} ({c} columns not divisible by {b})"
                     for (w, u, c, b), n in groups.most_common())
