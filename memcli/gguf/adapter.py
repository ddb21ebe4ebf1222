"""LoRA adapters as llama.cpp adapter GGUFs, and the checks that keep an adapter on the base it was trained for.

`export_adapter(RUN_OR_PEFT_DIR, OUT)` writes a llama.cpp LoRA adapter. Tensor names come from gguf's
TensorNameMap (`blk.N.ffn_up.weight.lora_a`, ...). Two things make it exact rather than merely loadable:
- RoPE layout: lora_b of q_proj/k_proj gets the row permutation the base's q/k weights got (memcli.gguf.hf).
- Scale: llama.cpp scales each pair by user_scale * alpha / rank (rank from lora_b's shape). PEFT's scale
  (alpha/r, alpha/sqrt(r) with rsLoRA, per-module ranks and alphas from rank_pattern/alpha_pattern) is folded
  into lora_b, and `adapter.lora.alpha` is written as the rank (alpha/rank = 1 exactly) or, when the modules'
  ranks differ, as 0, llama.cpp's "no alpha" (scale = user_scale). Either way user scale 1 reproduces PEFT.
What llama.cpp cannot express is refused: DoRA, LoRA biases, modules_to_save, LoRA on embeddings, LoRA on the
lm_head of a tied-embedding model, aLoRA. `exportable` asks the same before training starts (docs/method.md §4:
memcli trains weight-level LoRA so that adapters export).

The adapter records its base (the memcli model name and memcli.gguf.fingerprint's fingerprint);
`check_pair(adapter, base)` refuses a base the adapter was not trained for. Run folders are read through
memcli.core.runs only.
"""

from __future__ import annotations

import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memcli.core import gguf_reader as reader
from memcli.core import models, runs
from memcli.core.errors import UserError
from memcli.core.gguf_reader import read_gguf
from memcli.gguf.fingerprint import Fingerprint, gguf_fingerprint, hf_fingerprint
from memcli.gguf.hf import HFModel, iter_hf_tensors, permute_rope_rows, read_base, read_hf, read_json, rope_heads

_PREFIX = "base_model.model."
MERGED_KEY = "memcli.merged_adapter"  # set in a merged model GGUF: no adapter is applied to it again


def _adapter_source(src: Path) -> tuple[Path, str | None]:
    """(PEFT folder, memcli model name from the run config or None)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} does not exist")
    if runs.is_run(src) and runs.adapter_dir(src).is_dir():
        settings = runs.read_settings(src)
        if not runs.has_adapter(src):
            raise UserError(f"run folder {src} has no finished adapter (adapter/adapter_config.json is missing)")
        return runs.adapter_dir(src), settings.get("model")
    if src.is_dir() and (src / "adapter_config.json").exists():
        return src, None
    if runs.is_run(src):
        raise UserError(f"run folder {src} has no finished adapter (no adapter/ folder yet)")
    if src.is_dir():
        raise UserError(f"{src} is not a PEFT adapter folder or memcli run folder (no adapter_config.json)")
    raise UserError(f"{src} is not a PEFT adapter folder or memcli run folder")


def model_name_for(base_path: str) -> str | None:
    """The registry name of a model whose HF cache folder is base_path, if it is one."""
    path = Path(base_path)
    if path.parent.resolve() != (models.cache_dir() / "hf").resolve():
        return None
    for name, info in models.registry().items():
        stem = Path(info["file"]).stem if info.get("source") == "wheel" else name
        if path.name.startswith(stem + "-"):
            return name
    return None


def _resolve_base(peft_dir: Path, cfg: dict, name: str | None, base: models.ModelSpec | None):
    """(ModelSpec, memcli model name) of the adapter's base."""
    if base is not None:
        return base, base.name
    if name is not None:
        return models.resolve(name), name
    recorded = cfg.get("base_model_name_or_path")
    if not recorded:
        raise UserError(f"adapter {peft_dir} does not name its base model (no base_model_name_or_path); give --model")
    registry_name = model_name_for(recorded)
    if registry_name is not None:
        return models.resolve(registry_name), registry_name
    if Path(recorded).is_dir() or recorded in models.registry():
        spec = models.resolve(recorded)
        return spec, spec.name
    raise UserError(f"adapter {peft_dir} was trained on '{recorded}', which is not a local model folder or a "
                    "memcli model name; give --model")


def _load_adapter_weights(peft_dir: Path) -> dict:
    import torch

    st, binary = peft_dir / "adapter_model.safetensors", peft_dir / "adapter_model.bin"
    try:
        if st.exists():
            from safetensors.torch import load_file

            return load_file(st)
        if binary.exists():
            return torch.load(binary, map_location="cpu", weights_only=True)
    except Exception as e:
        where = st if st.exists() else binary
        raise UserError(f"adapter weights {where} are corrupt or truncated ({e})") from None
    raise UserError(f"adapter {peft_dir} has no adapter_model.safetensors (or adapter_model.bin)")


def _check_lora_config(cfg: dict, where: Path) -> None:
    refuse = [
        (cfg.get("peft_type", "LORA") != "LORA", f"it is a {cfg.get('peft_type')} adapter, not LoRA"),
        (bool(cfg.get("use_dora")), "DoRA (use_dora) has no llama.cpp equivalent"),
        (bool(cfg.get("lora_bias")), "LoRA biases (lora_bias) have no llama.cpp equivalent"),
        (bool(cfg.get("modules_to_save")), f"modules_to_save {cfg.get('modules_to_save')} (fully trained modules) "
                                           "cannot be expressed as a LoRA adapter"),
        (bool(cfg.get("trainable_token_indices")), "trainable tokens cannot be expressed as a LoRA adapter"),
        (bool(cfg.get("layer_replication")), "layer_replication cannot be expressed as a LoRA adapter"),
        (bool(cfg.get("alora_invocation_tokens")), "activated LoRA (aLoRA) is not supported"),
        (bool(cfg.get("target_parameters")), "LoRA on parameters (target_parameters) is not supported"),
        (bool(cfg.get("use_qalora")), "QA-LoRA is not supported"),
    ]
    for bad, why in refuse:
        if bad:
            raise UserError(f"adapter {where} cannot be exported to GGUF: {why}")


def _pattern_value(patterns: dict, key: str, default):
    """PEFT's rule for rank_pattern/alpha_pattern: the first pattern that matches the end of the module name."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", key):
            return value
    return default


def _lora_target(hf: HFModel, module: str, where) -> str:
    """The base GGUF tensor a LoRA on `module` (an HF module name) adapts; UserError when llama.cpp cannot."""
    if module in ("lm_head", "model.lm_head") and hf.tied:
        raise UserError(f"adapter {where} cannot be exported to GGUF: LoRA on lm_head of a model whose "
                        "output layer is tied to its token embedding")
    if module.endswith("embed_tokens"):
        raise UserError(f"adapter {where} cannot be exported to GGUF: LoRA on embeddings ({module})")
    target = hf.gguf_name(module + ".weight")
    if target is None or (module + ".weight") not in hf.shapes:
        raise UserError(f"adapter {where}: module {module} is not a linear layer of {hf.folder.name} "
                        f"that llama.cpp can adapt")
    return target


def exportable(spec: models.ModelSpec, lora_config: dict | None = None, modules=(),
               where: str | os.PathLike = "the adapter") -> str | None:
    """Why `export_adapter` would refuse a LoRA with this adapter_config (`lora_config`, a dict) on these
    modules (HF module names) of this base, or None when it would write it. The same checks as the exporter
    (read_base, _check_lora_config, _lora_target), without reading any weights: cheap enough to ask before
    training starts."""
    try:
        hf, _, _ = read_base(models.hf_dir(spec))
        if lora_config is not None:
            _check_lora_config(lora_config, where)
        for module in modules:
            _lora_target(hf, module, where)
    except UserError as e:
        return str(e)
    except Exception as e:  # a config.json the checks did not foresee (a missing key, a wrong type)
        return f"the model's files cannot be read for export ({type(e).__name__}: {e})"
    return None


@dataclass
class AdapterPair:
    module: str  # HF module name, e.g. model.layers.2.self_attn.q_proj
    target: str  # base GGUF tensor name, e.g. blk.2.attn_q.weight
    a: np.ndarray  # [r, in]
    b: np.ndarray  # [out, r], PEFT's scale folded in and rows in llama.cpp's layout
    rank: int
    scale: float


def adapter_pairs(peft_dir: Path, hf: HFModel, *, _permute: bool = True) -> tuple[list[AdapterPair], dict]:
    """The adapter's (A, B) pairs as llama.cpp needs them, and its adapter_config."""
    cfg = read_json(peft_dir / "adapter_config.json", "adapter config")
    _check_lora_config(cfg, peft_dir)
    weights = _load_adapter_weights(peft_dir)
    modules: dict[str, dict] = {}
    copies = []
    for key, tensor in weights.items():
        name = key[len(_PREFIX):] if key.startswith(_PREFIX) else key
        if "lora_embedding_" in name:
            raise UserError(f"adapter {peft_dir} cannot be exported to GGUF: LoRA on embeddings "
                            f"({name.split('.lora_embedding_')[0]}) is not supported")
        if "lora_magnitude_vector" in name:
            raise UserError(f"adapter {peft_dir} cannot be exported to GGUF: DoRA has no llama.cpp equivalent")
        m = re.fullmatch(r"(.+)\.lora_([AB])(?:\.[^.]+)?\.(weight|bias)", name)
        if m is None:
            base_name = name.replace(".base_layer.", ".")
            if base_name in hf.shapes:  # PEFT saves embedding-like base layers it wraps (save_embedding_layers)
                copies.append((key, base_name, tensor))
                continue
            raise UserError(f"adapter {peft_dir}: tensor '{key}' is not a LoRA weight memcli can export")
        if m.group(3) == "bias":
            raise UserError(f"adapter {peft_dir} cannot be exported to GGUF: LoRA biases have no llama.cpp equivalent")
        modules.setdefault(m.group(1), {})[m.group(2)] = tensor.float().numpy()
    if not modules:
        raise UserError(f"adapter {peft_dir} holds no LoRA weights")
    if copies:
        originals = dict(iter_hf_tensors(hf, [base_name for _, base_name, _ in copies]))
        for key, base_name, tensor in copies:
            if tuple(tensor.shape) != hf.shapes[base_name] or not np.array_equal(
                    tensor.float().numpy(), originals[base_name]):
                raise UserError(f"adapter {peft_dir} carries changed weights of {base_name} ({key}: resized or "
                                "trained), which a LoRA GGUF cannot express")
    pairs = []
    for module in sorted(modules, key=_natural_key):
        ab = modules[module]
        if set(ab) != {"A", "B"}:
            raise UserError(f"adapter {peft_dir}: module {module} lacks lora_{'B' if 'A' in ab else 'A'}")
        a, b = ab["A"], ab["B"]
        target = _lora_target(hf, module, peft_dir)
        out_f, in_f = hf.shapes[module + ".weight"]
        rank = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or a.shape[1] != in_f or b.shape != (out_f, rank):
            raise UserError(f"adapter {peft_dir}: module {module} has LoRA shapes A{tuple(a.shape)} B{tuple(b.shape)}"
                            f" that do not fit the base layer [{out_f}, {in_f}] (adapter for another base?)")
        expected_rank = _pattern_value(cfg.get("rank_pattern"), module, cfg.get("r", rank))
        if int(expected_rank) != rank:
            raise UserError(f"adapter {peft_dir}: module {module} has rank {rank} but adapter_config.json says "
                            f"{expected_rank}")
        alpha = float(_pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", 8)))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        b = (b * np.float32(scale)).astype(np.float32)
        heads = rope_heads(hf, target) if _permute else None
        if heads is not None:
            b = permute_rope_rows(b, heads)
        pairs.append(AdapterPair(module, target, a.astype(np.float32), b, rank, scale))
    return pairs, cfg


def _natural_key(s: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", s)]


def export_adapter(src: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
                   base: models.ModelSpec | None = None, *, _permute: bool = True) -> dict:
    """Write a run folder's (RUN/adapter) or a PEFT folder's LoRA adapter as a llama.cpp adapter GGUF.

    The base is `base` when given, else the run's `settings.model`, else the adapter's base_model_name_or_path.
    Returns a summary: out, outtype, model, fingerprint, modules, ranks, alpha, tensors, bytes, seconds.
    `_permute=False` leaves out the q/k row permutation (for the test that shows why it is needed)."""
    import gguf

    t0 = time.perf_counter()
    reader.check_outtype(outtype)
    peft_dir, run_model = _adapter_source(Path(src))
    cfg = read_json(peft_dir / "adapter_config.json", "adapter config")
    _check_lora_config(cfg, peft_dir)
    spec, model_name = _resolve_base(peft_dir, cfg, run_model, base)
    folder = models.hf_dir(spec)
    hf = read_hf(folder)
    pairs, cfg = adapter_pairs(peft_dir, hf, _permute=_permute)
    fingerprint = hf_fingerprint(folder)
    ranks = sorted({p.rank for p in pairs})
    alpha = float(ranks[0]) if len(ranks) == 1 else 0.0  # scale = user_scale * alpha / rank = user_scale

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, hf.arch)
        w.add_type(gguf.GGUFType.ADAPTER)
        w.add_string(gguf.Keys.Adapter.TYPE, "lora")
        w.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        w.add_name(f"memcli LoRA for {model_name}")
        w.add_file_type(reader.file_type(outtype))
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_uint32("general.base_model.count", 1)
        w.add_string("general.base_model.0.name", model_name)
        w.add_string("memcli.model", model_name)
        w.add_string("memcli.base.fingerprint", fingerprint.structure)
        if fingerprint.weights is not None:
            w.add_string("memcli.base.weights", fingerprint.weights)
        w.add_uint32("memcli.lora.r", int(cfg.get("r", ranks[0])))
        w.add_float32("memcli.lora.peft_alpha", float(cfg.get("lora_alpha", 8)))
        w.add_bool("memcli.lora.use_rslora", bool(cfg.get("use_rslora")))
        w.add_bool("memcli.lora.scale_folded", True)
        for p in pairs:
            data, raw = reader.encode(p.a, outtype)
            w.add_tensor(p.target + ".lora_a", data, raw_dtype=raw)
            data, raw = reader.encode(p.b, outtype)
            w.add_tensor(p.target + ".lora_b", data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    runs.atomic_write(out, write, example="adapter.gguf")
    return {"out": str(out), "outtype": outtype, "model": model_name, "fingerprint": str(fingerprint),
            "modules": [p.module for p in pairs], "ranks": ranks, "alpha": alpha, "tensors": 2 * len(pairs),
            "params": int(sum(p.a.size + p.b.size for p in pairs)), "bytes": Path(out).stat().st_size,
            "seconds": round(time.perf_counter() - t0, 3)}


def adapter_info(adapter_gguf: str | os.PathLike) -> dict:
    """The memcli metadata of an adapter GGUF (model, fingerprint, ...); UserError if it is not a LoRA adapter."""
    meta = read_gguf(adapter_gguf, "adapter")
    if meta.get("general.type") != "adapter" or meta.get("adapter.type") != "lora":
        raise UserError(f"{adapter_gguf} is not a LoRA adapter GGUF (general.type={meta.get('general.type')!r}, "
                        f"adapter.type={meta.get('adapter.type')!r})")
    return {"path": str(adapter_gguf), "arch": meta.get("general.architecture"), "model": meta.get("memcli.model"),
            "fingerprint": meta.get("memcli.base.fingerprint"), "weights": meta.get("memcli.base.weights"),
            "alpha": meta.get("adapter.lora.alpha"), "tensors": len(meta.tensors)}


def check_pair(adapter_gguf: str | os.PathLike, base_gguf_path: str | os.PathLike) -> dict:
    """Refuse an adapter on a base it was not trained for: UserError("adapter ... was trained for X, base ... is
    Y"). Adapters without memcli's fingerprint are checked tensor by tensor (names and shapes). Returns
    adapter_info."""
    info = adapter_info(adapter_gguf)
    adapter = read_gguf(adapter_gguf, "adapter")
    base = read_gguf(base_gguf_path, "base model")
    base_name = base.get("general.name") or Path(base_gguf_path).name
    trained_for = info["model"] or "another model"

    def refuse(why: str):
        raise UserError(f"adapter {adapter_gguf} was trained for {trained_for}, base {base_gguf_path} is "
                        f"{base_name} ({why})")

    if base.get("general.type", "model") != "model":
        raise UserError(f"base {base_gguf_path} is not a model GGUF (general.type={base.get('general.type')!r})")
    if base.get(MERGED_KEY):
        raise UserError(f"base {base_gguf_path} already has an adapter merged into it ({base.get(MERGED_KEY)}); "
                        "verify it without --lora, or apply the adapter to the unmerged base")
    if info["arch"] != base.get("general.architecture"):
        refuse(f"architecture {info['arch']} vs {base.get('general.architecture')}")
    if info["fingerprint"] is not None:
        theirs = gguf_fingerprint(base)
        ours = Fingerprint(info["fingerprint"], info["weights"])
        if not ours.matches(theirs):
            refuse(f"fingerprint {ours} vs {theirs}")
    for name, t in adapter.tensors.items():
        target, _, part = name.rpartition(".")
        bt = base.tensors.get(target)
        if bt is None:
            refuse(f"it has no tensor {target}")
        rows = t.shape[0] if part == "lora_a" else t.shape[1]
        if (part == "lora_a" and rows != bt.shape[0]) or (part == "lora_b" and rows != bt.shape[1]):
            refuse(f"{name} has shape {list(t.shape)}, {target} is {list(bt.shape)}")
    return info

