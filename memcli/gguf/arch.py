"""What llama.cpp's Gemma 3 and Phi-3 graphs need beyond the Llama graph's hyperparameters, read from an HF config
and written to a base GGUF. Each is checked against what llama.cpp's graph does, so that a model llama.cpp would
run differently from torch is refused instead of exported:

- gemma3 (HF `gemma3_text`): RMSNorm weights are stored +1 (HF scales by 1 + w, llama.cpp by w); embeddings
  scaled by sqrt(hidden) and q/k norms are in llama.cpp's graph already. Sliding-window layers: the window
  (`attention.sliding_window`), which layers slide (llama.cpp assumes 5 sliding, 1 global, repeating; another
  `layer_types` is written as `attention.sliding_window_pattern`), their RoPE base (`rope.freq_base_swa`). The
  query scale: llama.cpp uses 1/sqrt(head_dim) (1/sqrt(hidden/heads) for 62-layer models), so a
  `query_pre_attn_scalar` that differs is refused. Final-logit soft-capping is written; attention soft-capping
  (Gemma 2) is refused.
- phi3 (Phi-3, Phi-3.5-mini, Phi-4-mini): fused qkv_proj and gate_up_proj stay fused (llama.cpp's attn_qkv and
  a 2*n_ff ffn_up whose first half is the gate). Partial rotary (`partial_rotary_factor`: Phi-4-mini rotates 3/4
  of each head) sets `rope.dimension_count`. LongRoPE: the long and short factor tensors and the attention factor
  sqrt(1 + ln(s)/ln(original context)); llama.cpp picks the short factors when its context is at most the
  original context, as transformers does for sequences that short. llama.cpp does not apply Phi-3's sliding
  window (it warns "Phi SWA is currently disabled"): positions further apart than `sliding_window` (2047 for
  Phi-3-mini-4k) attend in llama.cpp and not in torch.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from memcli.core.errors import UserError

LLAMA_CPP_SWA_PERIOD = 6  # llama.cpp's Gemma 3 default: layer i slides unless i % 6 == 5


def rope_parameters(config: dict, model_type: str, folder: Path) -> tuple[dict, dict | None]:
    """(the global layers' RoPE parameters, the sliding layers' or None). transformers 5 nests them per layer kind
    for Gemma 3 ({"full_attention": ..., "sliding_attention": ...}); older configs use rope_scaling, rope_theta and
    rope_local_base_freq."""
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    local = None
    if "full_attention" in rope or "sliding_attention" in rope:
        local = dict(rope.get("sliding_attention") or {}) or None
        rope = dict(rope.get("full_attention") or {})
    elif config.get("rope_local_base_freq") is not None:
        local = {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]}
    if model_type == "gemma3_text":
        local = local or {"rope_type": "default", "rope_theta": 10000.0}
        if local.get("rope_type", local.get("type", "default")) != "default":
            raise UserError(f"model {folder}: RoPE scaling on Gemma 3's sliding layers is not supported by GGUF export "
                            "(llama.cpp scales only the global layers)")
    for key in ("partial_rotary_factor", "original_max_position_embeddings", "long_factor", "short_factor"):
        if key not in rope and config.get(key) is not None:
            rope[key] = config[key]
    rope.setdefault("rope_theta", config.get("rope_theta", 10000.0))
    return rope, local


def rotary_dims(config: dict, rope: dict, n_embd: int, n_head: int, head_dim: int) -> int:
    """How many dimensions of each head RoPE rotates (llama.cpp's rope.dimension_count)."""
    factor = float(rope.get("partial_rotary_factor", config.get("partial_rotary_factor") or 1.0))
    if factor == 1.0:
        return head_dim
    return int(factor * n_embd) // n_head  # as transformers computes it for Phi-3 and llama.cpp's converter


def family_hparams(config: dict, model_type: str, folder: Path, rope: dict, local: dict | None,
                   n_layer: int, n_embd: int, n_head: int, head_dim: int, n_rot: int) -> dict:
    """The GGUF keys (gguf.Keys names without the architecture, plus two tensors) a family needs beyond Llama's,
    after checking that llama.cpp's graph computes what torch does."""
    out: dict = {}
    if model_type == "gemma3_text":
        for key in ("attn_logit_softcapping",):
            if config.get(key) is not None:
                raise UserError(f"model {folder}: {key} is not supported by llama.cpp's Gemma 3 graph")
        if config.get("use_bidirectional_attention"):
            raise UserError(f"model {folder}: bidirectional attention (an embedding model) is not a causal LM")
        scalar = config.get("query_pre_attn_scalar", head_dim)
        theirs = n_embd / n_head if n_layer == 62 else head_dim  # what llama.cpp's graph divides by (its sqrt)
        if not math.isclose(float(scalar), float(theirs)):
            raise UserError(f"model {folder}: query_pre_attn_scalar {scalar} differs from the {theirs:g} llama.cpp's "
                            "Gemma 3 graph uses for this shape; GGUF export would change the model")
        if config.get("final_logit_softcapping") is not None:
            out["final_logit_softcapping"] = float(config["final_logit_softcapping"])
        window = config.get("sliding_window")
        if window:
            kinds = config.get("layer_types") or [
                "full_attention" if (i + 1) % int(config.get("sliding_window_pattern") or LLAMA_CPP_SWA_PERIOD) == 0
                else "sliding_attention" for i in range(n_layer)]
            sliding = [k == "sliding_attention" for k in kinds]
            out["attention.sliding_window"] = int(window)
            if sliding != [i % LLAMA_CPP_SWA_PERIOD < LLAMA_CPP_SWA_PERIOD - 1 for i in range(n_layer)]:
                out["attention.sliding_window_pattern"] = sliding
            out["rope.freq_base_swa"] = float(local["rope_theta"])
    if model_type == "phi3":
        out["attention.sliding_window"] = int(config.get("sliding_window") or 0)  # as the converter (llama.cpp: unused)
        original = rope.get("original_max_position_embeddings", config.get("max_position_embeddings", 4096))
        out["rope.scaling.original_context_length"] = int(original)
        if rope.get("rope_type", rope.get("type")) == "longrope":
            long, short = rope.get("long_factor"), rope.get("short_factor")
            if not long or not short or len(long) != len(short) or len(long) != n_rot // 2:
                raise UserError(f"model {folder}: LongRoPE needs long_factor and short_factor of {n_rot // 2} values")
            scale = float(config.get("max_position_embeddings", original)) / float(original)
            attention = rope.get("attention_factor")
            if attention is None:
                attention = math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1.0 else 1.0
            out["rope.scaling.attn_factor"] = float(attention)
            out["tensors"] = {"rope_factors_long.weight": np.asarray(long, dtype=np.float32),
                              "rope_factors_short.weight": np.asarray(short, dtype=np.float32)}
    return out


def write_family_keys(w, arch: str, extra: dict) -> None:
    """Write family_hparams' keys to a GGUFWriter (the tensors are written with the weights)."""
    for key, value in extra.items():
        if key == "tensors":
            continue
        name = f"{arch}.{key}"
        if isinstance(value, list):
            w.add_array(name, value)
        elif isinstance(value, bool):
            w.add_bool(name, value)
        elif isinstance(value, int):
            w.add_uint32(name, value)
        else:
            w.add_float32(name, value)
