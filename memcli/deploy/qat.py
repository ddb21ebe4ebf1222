"""Training against a deployment (`memcli train --deploy TYPE`): recall that holds in the files users ship.

Both deployment forms are put in the training loop:
- adapter over the quantised base: the base weights training loads are the base as llama.cpp's quantiser makes
  it at TYPE (the quantised GGUF, dequantised), the adapter applied in float as llama.cpp applies an F32 adapter;
- merged: each adapted linear layer also runs as deq(quant(W + s B A)), the float weight plus the adapter
  quantised to the type llama.cpp's quantiser gives that tensor at TYPE, by ggml's own `ggml_quantize_chunk`
  (the function the quantiser calls; a tensor is quantised row by row, so this is bit for bit what the merged
  file holds) and dequantised by gguf-py (llama.cpp's Python package). The gradient passes the rounding
  straight through (STE) to A and B.
Each step's objective is the sum of the two forms'; a clean check certifies only what both certify. What torch
cannot reproduce (llama.cpp also rounds activations to 8-bit blocks in a quantised matrix product) is left to
the final judge: `--until-recall` stops only when llama.cpp certifies every entry in both deployed files.
"""

from __future__ import annotations

import contextlib
import ctypes
import types
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError

_PEFT_PREFIX = "base_model.model."


def _ggml():
    """libggml-base from llama-cpp-python's build, with ggml_quantize_chunk declared."""
    from .. import llamacpp

    L = llamacpp.lib()
    folder = Path(getattr(L, "_base_path", ""))
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        path = folder / name
        if path.exists():
            lib = ctypes.CDLL(str(path))
            break
    else:
        raise UserError(f"llama.cpp's ggml library was not found in {folder}; reinstall llama-cpp-python")
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


_LIB = None


def roundtrip(w: np.ndarray, qtype: int) -> np.ndarray:
    """deq(quant(w)) for a float32 matrix [rows, cols], quantised to ggml type `qtype` by ggml itself."""
    import gguf

    global _LIB
    qt = gguf.GGMLQuantizationType(qtype)
    if qt == gguf.GGMLQuantizationType.F32:
        return w
    if qt in (gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16):
        return gguf.quants.dequantize(gguf.quants.quantize(w, qt), qt)
    _LIB = _LIB or _ggml()
    w = np.ascontiguousarray(w, dtype=np.float32)
    rows, cols = w.shape
    block, size = gguf.GGML_QUANT_SIZES[qt]
    out = np.empty((rows, cols // block * size), dtype=np.uint8)
    _LIB.ggml_quantize_chunk(int(qtype), w.ctypes.data, out.ctypes.data, 0, rows, cols, None)
    return gguf.quants.dequantize(out, qt).reshape(rows, cols)


class _StraightThrough(torch.autograd.Function):
    """Forward: the weight as the merged file holds it; backward: the gradient of the float weight."""

    @staticmethod
    def forward(ctx, w, qtype):
        q = roundtrip(w.detach().float().cpu().numpy(), qtype)
        return torch.from_numpy(q).to(device=w.device, dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class DeployTarget:
    """The merged form of every adapted layer of a PEFT model, switched on inside `form("merged")`."""

    def __init__(self, model, float_folder: Path, quant_base: Path):
        from peft.tuners.lora import LoraLayer

        from ..gguf.hf import iter_hf_tensors, read_hf
        from ..gguf.reader import read_gguf

        self.mode = "adapter"
        hf = read_hf(float_folder)
        quantised = read_gguf(quant_base, "quantised base")
        self.types: dict[str, str] = {}
        layers = [(n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n, m)
                  for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        floats = dict(iter_hf_tensors(hf, [n + ".weight" for n, _ in layers]))
        for name, layer in layers:
            gname = hf.gguf_name(name + ".weight")
            if gname not in quantised.tensors:
                raise UserError(f"--deploy: {quant_base} has no tensor {gname} for the adapted layer {name}")
            qtype = quantised.tensors[gname].type
            self.types[gname] = _type_name(qtype)
            w = torch.from_numpy(floats[name + ".weight"]).to(next(layer.parameters()).device)
            layer.register_buffer("memcli_float_weight", w, persistent=False)
            layer.forward = types.MethodType(_merged_forward(self, layer.forward, qtype), layer)

    @contextlib.contextmanager
    def form(self, mode: str):
        previous, self.mode = self.mode, mode
        try:
            yield
        finally:
            self.mode = previous

    def forms(self):
        """Runs the loop body once per deployment form, in that form: `[f() for _ in target.forms()]`."""
        for mode in ("adapter", "merged"):
            with self.form(mode):
                yield mode


def _merged_forward(target: DeployTarget, adapter_forward, qtype: int):
    def forward(self, x, *args, **kwargs):
        if target.mode != "merged":
            return adapter_forward(x, *args, **kwargs)
        a, b = self.lora_A["default"].weight, self.lora_B["default"].weight
        w = self.memcli_float_weight + self.scaling["default"] * (b @ a)
        y = F.linear(x.to(w.dtype), _StraightThrough.apply(w, qtype), self.base_layer.bias)
        return y.to(x.dtype)
    return forward


def _type_name(t: int) -> str:
    import gguf

    return gguf.GGMLQuantizationType(t).name.lower()

