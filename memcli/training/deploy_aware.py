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
import tempfile
from pathlib import Path

import gguf
import numpy as np
import torch
import torch.nn.functional as F
from peft.tuners.lora import LoraLayer

from memcli.core import models, runs
from memcli.core.errors import UserError
from memcli.core.gguf_reader import read_gguf
from memcli.deploy.certify import certify, in_memory
from memcli.gguf.base import cached_base
from memcli.gguf.hf import iter_hf_tensors, read_hf
from memcli.llama import library
from memcli.training.forward import Recall

_PEFT_PREFIX = "base_model.model."


def _ggml():
    """libggml-base from llama-cpp-python's build, with ggml_quantize_chunk declared."""
    L = library.lib()
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
            layer.register_forward_hook(_merged_hook(self, qtype))

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


def _merged_hook(target: DeployTarget, qtype: int):
    """A forward hook (torch's public API) that, in the merged form, replaces the layer's output by the input
    through deq(quant(W + delta)); delta is PEFT's own `get_delta_weight` (the scaled B A that merging adds)."""
    def hook(layer, args, output):
        if target.mode != "merged":
            return None
        x = args[0]
        w = layer.memcli_float_weight + layer.get_delta_weight(layer.active_adapters[0])
        y = F.linear(x.to(w.dtype), _StraightThrough.apply(w, qtype), layer.get_base_layer().bias)
        return y.to(output.dtype)
    return hook


def _type_name(t: int) -> str:
    return gguf.GGMLQuantizationType(t).name.lower()



# --- the run's side of `train --deploy` ------------------------------------------------------------------

class Deployment:
    """What `train --deploy TYPE` adds to the loop (memcli.training.trainer.Trainer): the base as llama.cpp's
    quantiser makes it at TYPE, both deployment forms in every forward pass (DeployTarget), and llama.cpp's
    verdict on the deployed files made from the adapter as it is (memcli.deploy.certify)."""

    def __init__(self, spec: models.ModelSpec, quant: str, log=print):
        self.spec, self.quant, self.log = spec, quant, log
        self.target = None  # DeployTarget, once the adapter exists
        self.rows, self.step, self.error = None, None, None  # llama.cpp's last verdict, its step, why none

    def load_base(self, dtype: str, device: str):
        """The torch model of the base as llama.cpp quantises it (the quantised GGUF made once, dequantised)."""
        self.base_gguf, model = quantised_base(self.spec, self.quant, dtype, device, self.log)
        return model

    def attach(self, peft_model, blocker: str | None) -> None:
        """Put the merged form into the adapted layers; refuse (before the run folder exists) when the adapter
        could not be exported, since both deployed files are made from its GGUF export."""
        if blocker is not None:
            raise UserError(f"--deploy makes and checks GGUF files: {blocker}")
        self.target = DeployTarget(peft_model, models.hf_dir(self.spec), self.base_gguf)

    def evaluate(self, evaluate):
        """`evaluate()` (a clean recall pass) in both forms: an entry recalled only where both recall it."""
        return worst([evaluate() for _ in self.target.forms()])

    def answer_ce(self, answer_ce):
        """`answer_ce()` in both forms, each token's worse form: the higher CE and lower margin, correct only in
        both, so the objective trains a token while either deployed file could get it wrong."""
        (ce_a, ok_a, m_a), (ce_m, ok_m, m_m) = [answer_ce() for _ in self.target.forms()]
        return torch.maximum(ce_a, ce_m), ok_a & ok_m, torch.minimum(m_a, m_m)

    def check(self, model, examples, out: Path, step: int) -> bool:
        """llama.cpp's verdict on both deployed files made from the adapter now (the merged file kept in
        RUN/deploy/); True when both certify every entry. A failure to make or score them is a warning (recorded
        in summary.json), never the loss of the run."""
        self.step = step
        try:
            with tempfile.TemporaryDirectory(prefix=".deploy-", dir=out) as work:
                peft = Path(work) / "adapter"
                model.save_pretrained(peft)
                self.rows = certify(peft, self.spec, [self.quant], in_memory(examples), Path(work),
                                    keep_merged=lambda quant: runs.deployed_path(out, quant))
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.rows, self.error = None, str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.log(f"warning: the deployed files could not be checked in llama.cpp: {self.error}")
            return False
        self.error = None
        ok = all(r["certified"] == r["entries"] for r in self.rows)
        forms = ", ".join(f"{r['form']} {r['certified']}/{r['entries']} certified" for r in self.rows)
        self.log(f"step {step}: llama.cpp on the deployed {self.quant} files: {forms}{'' if ok else '; training on'}")
        return ok

    def summary(self, model, examples, out: Path, step: int) -> dict:
        """summary.json's `deploy`: llama.cpp's verdict at the last step (checked now if the last check was
        earlier), the files, the tensor types of the adapted layers."""
        if self.step != step:
            self.check(model, examples, out, step)
        return {"type": self.quant, "forms": self.rows, "error": self.error,
                "merged_gguf": str(runs.deployed_path(out, self.quant).relative_to(out)),
                "base_gguf": str(self.base_gguf), "tensor_types": self.target.types}


def quantised_base(spec, quant: str, dtype: str, device: str, log=print):
    """(the base GGUF of `spec` at type `quant`, made once by llama.cpp's quantiser, and the torch model loaded
    from it: the weights llama.cpp multiplies with, dequantised)."""
    log(f"--deploy {quant}: training against the base as llama.cpp quantises it to {quant}")
    path = cached_base(spec, quant)
    model, _ = models.load_model(models.resolve(str(path)), dtype, device)
    return path, model


def worst(recalls):
    """One forward.Recall from the recall of each form: an entry is recalled (certified) only where every form
    recalls (certifies) it; its min p and token accuracy are the lowest, the mean CE the highest."""
    def each(name, pick):
        return [pick(vals) for vals in zip(*(getattr(r, name) for r in recalls))]

    return Recall(max(r.mean_ce for r in recalls), each("exact", all), each("certified", all), each("min_p", min),
                  min(r.above for r in recalls), each("token_accuracy", min))
