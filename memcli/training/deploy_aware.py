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
import dataclasses
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
from memcli.llama.sampler import GREEDY, Sampler
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
    if cols % block:  # ggml would write past the buffer; llama.cpp's quantiser picks a fallback type for such rows
        raise ValueError(f"rows of {cols} values cannot be quantised to {qt.name} (blocks of {block})")
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


FLOAT_TYPES = ("f32", "f16", "bf16")  # a 16-bit file holds the float weights to within its rounding


class DeployTarget:
    """The deployment forms of every adapted layer of a PEFT model, one switched on at a time by `form`: the
    base weights of a type (every frozen tensor, swapped in place: no copy) and, in a merged form, each adapted
    layer's output through deq(quant(W + delta)) at the tensor type llama.cpp's quantiser gives it."""

    def __init__(self, model, float_folder: Path, bases: dict[str, tuple[Path | None, dict]], home: str):
        """`bases`: per form type ("float", or a quantised type), (its base GGUF or None, its frozen tensors by
        the plain model's parameter names); `home` is the type whose tensors the model holds now."""
        self.mode, self.current = "adapter", home
        hf = read_hf(float_folder)
        self.types: dict[str, dict[str, str]] = {}  # per quantised type: the tensor type of each adapted layer
        layers = [(n[len(_PEFT_PREFIX):] if n.startswith(_PEFT_PREFIX) else n, m)
                  for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        floats = dict(iter_hf_tensors(hf, [n + ".weight" for n, _ in layers]))
        quantised = {t: read_gguf(path, "quantised base") for t, (path, _) in bases.items() if path is not None}
        self.qtypes: dict[str, dict[str, int]] = {}  # per adapted layer: its ggml type in each quantised base
        for name, layer in layers:
            gname = hf.gguf_name(name + ".weight")
            for t, reader in quantised.items():
                if gname not in reader.tensors:
                    raise UserError(f"--deploy: {bases[t][0]} has no tensor {gname} for the adapted layer {name}")
                qtype = reader.tensors[gname].type
                self.qtypes.setdefault(name, {})[t] = qtype
                self.types.setdefault(t, {})[gname] = _type_name(qtype)
            w = torch.from_numpy(floats[name + ".weight"]).to(next(layer.parameters()).device)
            layer.register_buffer("memcli_float_weight", w, persistent=False)
            layer.register_forward_hook(_merged_hook(self, self.qtypes.get(name, {})))
        # every frozen tensor of the model, with its value in each type's base
        self.frozen = [(p, {t: tensors[_plain_name(n)] for t, (_, tensors) in bases.items()})
                       for n, p in model.named_parameters() if not p.requires_grad]

    @contextlib.contextmanager
    def form(self, base: str, mode: str):
        """The model as the deployed file of type `base` ("float" or a quantised type) in `mode` (adapter or
        merged) computes it."""
        previous = self.current, self.mode
        self.use(base)
        self.mode = mode
        try:
            yield
        finally:
            self.use(previous[0])
            self.mode = previous[1]

    def use(self, base: str) -> None:
        if base != self.current:
            for p, values in self.frozen:
                p.data = values[base]
            self.current = base


def _plain_name(peft_name: str) -> str:
    """A PEFT model's parameter name as the plain model names it (model.layers.15.mlp.up_proj.weight)."""
    name = peft_name[len(_PEFT_PREFIX):] if peft_name.startswith(_PEFT_PREFIX) else peft_name
    return name.replace(".base_layer.", ".")


def _merged_hook(target: DeployTarget, qtypes: dict[str, int]):
    """A forward hook (torch's public API) that, in a merged form, replaces the layer's output by the input
    through deq(quant(W + delta)) at that type; delta is PEFT's own `get_delta_weight` (the scaled B A that
    merging adds)."""
    def hook(layer, args, output):
        if target.mode != "merged":
            return None
        x = args[0]
        w = layer.memcli_float_weight + layer.get_delta_weight(layer.active_adapters[0])
        y = F.linear(x.to(w.dtype), _StraightThrough.apply(w, qtypes[target.current]), layer.get_base_layer().bias)
        return y.to(output.dtype)
    return hook


def _type_name(t: int) -> str:
    return gguf.GGMLQuantizationType(t).name.lower()



# --- the run's side of `train --deploy` ------------------------------------------------------------------

class Deployment:
    """What `train --deploy TYPES` adds to the loop (memcli.training.trainer.Trainer): the bases as llama.cpp's
    quantiser makes them, every deployment form in every forward pass (DeployTarget), and llama.cpp's verdict on
    the deployed files made from the adapter as it is (memcli.deploy.certify).

    The forms trained: both forms of each quantised type, and for the 16-bit types (f16, bf16, f32) the float
    weights, which such a file holds to within its rounding (llama.cpp's check of the files covers the rest)."""

    def __init__(self, spec: models.ModelSpec, quants: list[str], log=print, sampler: Sampler = GREEDY):
        self.spec, self.quants, self.log = spec, list(quants), log
        # llama.cpp certifies the files under plain greedy decoding and under the runner's (train --sampler)
        self.samplers = (GREEDY,) if dataclasses.replace(sampler, name=GREEDY.name) == GREEDY else (GREEDY, sampler)
        quantised = [q for q in self.quants if q not in FLOAT_TYPES]
        self.forms = ([("float", "adapter")] if len(quantised) < len(self.quants) else []) + [
            (q, mode) for q in quantised for mode in ("adapter", "merged")]
        self.bases = list(dict.fromkeys(base for base, _ in self.forms))  # the first is the weights training loads
        self.target = None  # DeployTarget, once the adapter exists
        self.prefixes: dict = {}  # per base: its forward.FrozenPrefix (or None)
        self.rows, self.step, self.error = None, None, None  # llama.cpp's last verdict, its step, why none

    def load_base(self, dtype: str, device: str):
        """The torch model training runs (the first base's weights), every other base's frozen tensors kept beside
        it: the float weights, or the base as llama.cpp quantises it (the quantised GGUF made once, dequantised)."""
        self.base_ggufs, self._tensors, model = {}, {}, None
        for base in self.bases:
            if base == "float":
                path, loaded = None, models.load_model(self.spec, dtype, device)[0]
            else:
                path, loaded = quantised_base(self.spec, base, dtype, device, self.log)
            self.base_ggufs[base] = path
            self._tensors[base] = {n: p.data for n, p in loaded.named_parameters(remove_duplicate=False)}
            model = model or loaded
        return model

    def attach(self, peft_model, blocker: str | None) -> None:
        """Put the forms into the adapted layers; refuse (before the run folder exists) when the adapter could
        not be exported, since the deployed files are made from its GGUF export."""
        if blocker is not None:
            raise UserError(f"--deploy makes and checks GGUF files: {blocker}")
        bases = {b: (self.base_ggufs[b], self._tensors[b]) for b in self.bases}
        self.target = DeployTarget(peft_model, models.hf_dir(self.spec), bases, home=self.bases[0])
        del self._tensors

    def frozen_prefixes(self, make):
        """Each base's frozen prefix (`make()` under its weights); returns the first base's."""
        for base in self.bases:
            with self.target.form(base, "adapter"):
                self.prefixes[base] = make()
        return self.prefixes[self.bases[0]]

    def evaluate(self, evaluate):
        """`evaluate(prefix)` (a clean recall pass) in every form: an entry recalled only where all recall it."""
        recalls = []
        for base, mode in self.forms:
            with self.target.form(base, mode):
                recalls.append(evaluate(self.prefixes.get(base)))
        return worst(recalls)

    def answer_ce(self, answer_ce, batch):
        """`answer_ce()` on `batch` in every form, each token's worst form: the highest CE and lowest margin,
        correct only in all, so the objective trains a token while any deployed file could get it wrong."""
        results, held = [], self.bases[0]  # collate gave the batch the first base's states
        for base, mode in self.forms:
            with self.target.form(base, mode):
                if batch.hidden is not None and base != held:  # the states entering the adapted layer
                    batch.hidden = self.prefixes[base].hidden(batch.idx, batch.input_ids.shape[1], batch.hidden.device)
                    held = base
                results.append(answer_ce())
        ce, ok, margin = zip(*results)
        return (torch.stack(ce).amax(0), torch.stack(ok).all(0), torch.stack(margin).amin(0))

    def check(self, model, examples, out: Path, step: int) -> bool:
        """llama.cpp's verdict on every deployed file made from the adapter now (the merged files kept in
        RUN/deploy/); True when each certifies every entry. A failure to make or score them is a warning
        (recorded in summary.json), never the loss of the run."""
        self.step = step
        try:
            with tempfile.TemporaryDirectory(prefix=".deploy-", dir=out) as work:
                peft = Path(work) / "adapter"
                model.save_pretrained(peft)
                self.rows = certify(peft, self.spec, self.quants, in_memory(examples), Path(work),
                                    keep_merged=lambda quant: runs.deployed_path(out, quant), samplers=self.samplers,
                                    source=out)  # the kept files name the run, not this temporary folder
        except Exception as e:  # noqa: BLE001 - see the docstring
            self.rows, self.error = None, str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            self.log(f"warning: the deployed files could not be checked in llama.cpp: {self.error}")
            return False
        self.error = None
        ok = all(r["certified"] == r["entries"] for r in self.rows)
        forms = ", ".join(f"{r['form']} {r['type']}{'' if len(self.samplers) < 2 else ' (' + r['sampler'] + ')'} "
                          f"{r['certified']}/{r['entries']}" for r in self.rows)
        self.log(f"step {step}: llama.cpp certifies in the deployed files: {forms}{'' if ok else '; training on'}")
        return ok

    def summary(self, model, examples, out: Path, step: int) -> dict:
        """summary.json's `deploy`: llama.cpp's verdict at the last step (checked now if the last check was
        earlier), the files, the tensor types of the adapted layers."""
        if self.step != step:
            self.check(model, examples, out, step)
        return {"type": ",".join(self.quants), "types": self.quants, "forms": self.rows, "error": self.error,
                "merged_gguf": {q: str(runs.deployed_path(out, q).relative_to(out)) for q in self.quants},
                "base_gguf": {b: str(p) for b, p in self.base_ggufs.items() if p is not None},
                "tensor_types": self.target.types}


def quantised_base(spec, quant: str, dtype: str, device: str, log=print):
    """(the base GGUF of `spec` at type `quant`, made once by llama.cpp's quantiser, and the torch model loaded
    from it: the weights llama.cpp multiplies with, dequantised)."""
    log(f"--deploy: training against the base as llama.cpp quantises it to {quant}")
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
