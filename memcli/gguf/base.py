"""Base models as llama.cpp GGUFs: `export_base` writes an HF model of a supported family
(memcli.core.models.ARCHITECTURES) with its hyperparameters (memcli.gguf.arch: Gemma 3's and Phi-3's own), weights
(q/k rows permuted for the Llama graph, Gemma 3's norms + 1) and tokenizer (tokens, types, merges, the pre-tokenizer
llama.cpp knows by name, special ids, add-BOS/EOS, chat template); `write_model` writes any of llama.cpp's file
types (a float export, then llama.cpp's quantiser); `cached_base` is a model's training weights as a type, made once
into the cache; `base_gguf` is the base GGUF llama.cpp loads for a model: the shipped GGUF, or the F32 export from
the cache.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from pathlib import Path

import numpy as np

from memcli.core import gguf_reader as reader
from memcli.core import models, runs
from memcli.core.errors import UserError
from memcli.core.quants import check_quant
from memcli.gguf.arch import write_family_keys
from memcli.gguf.hf import HFModel, gguf_array, iter_hf_tensors, llama3_rope_factors, read_base, read_hf
from memcli.llama.quantize import quantize

_F32_LIMIT = 2 * 10**9  # parameters up to which the float file llama.cpp's quantiser reads is F32 (else F16)


def export_base(hf_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
                name: str | None = None, deltas: dict | None = None, metadata: dict | None = None) -> dict:
    """Write an HF model of a supported family (memcli.core.models.ARCHITECTURES) as a llama.cpp base GGUF.
    Returns a summary.
    `hf_dir` may also be a memcli model name (its HF folder, built into the cache if needed, is exported).
    `deltas` (HF tensor name -> float32 array of its shape) are added to those weights in float32 before they
    are written: a LoRA merged into the model (memcli.gguf.merge). `metadata`: extra string keys to record."""
    import gguf

    t0 = time.perf_counter()
    reader.check_outtype(outtype)
    if not Path(hf_dir).is_dir() and str(hf_dir) in models.registry():
        spec = models.resolve(str(hf_dir))
        name, hf_dir = name or spec.name, models.hf_dir(spec)
    hf, vocab, pairs = read_base(hf_dir)
    try:
        tok = models.tokenizer_in(hf.folder)
    except Exception as e:
        raise UserError(f"tokenizer of {hf.folder} cannot be loaded ({e})") from None
    probe_plain = tok("a", add_special_tokens=False).input_ids
    probe = tok("a").input_ids
    add_bos = tok.bos_token_id is not None and len(probe) > len(probe_plain) and probe[0] == tok.bos_token_id
    add_eos = tok.eos_token_id is not None and len(probe) > len(probe_plain) and probe[-1] == tok.eos_token_id
    model_name = name or str(hf.config.get("_name_or_path") or hf.folder.name)
    a = hf.arch

    def write(tmp: Path) -> None:
        w = gguf.GGUFWriter(tmp, a)
        w.add_type(gguf.GGUFType.MODEL)
        w.add_name(model_name)
        w.add_file_type(reader.file_type(outtype))
        if outtype == "q8_0":
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(len(vocab.tokens))
        w.add_context_length(hf.n_ctx)
        w.add_embedding_length(hf.n_embd)
        w.add_block_count(hf.n_layer)
        w.add_feed_forward_length(hf.n_ff)
        w.add_head_count(hf.n_head)
        w.add_head_count_kv(hf.n_head_kv)
        w.add_layer_norm_rms_eps(hf.rms_eps)
        w.add_rope_freq_base(hf.rope_theta)
        w.add_rope_dimension_count(hf.n_rot)
        w.add_key_length(hf.head_dim)  # as llama.cpp's converter does; required where head_dim != n_embd / n_head
        w.add_value_length(hf.head_dim)
        _write_rope_scaling(w, hf)
        write_family_keys(w, a, hf.extra or {})
        w.add_tokenizer_model(vocab.model)
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        if vocab.scores is not None:
            w.add_token_scores(vocab.scores)
        if vocab.merges:
            w.add_token_merges(vocab.merges)
        for tid, setter in ((tok.bos_token_id, w.add_bos_token_id), (tok.eos_token_id, w.add_eos_token_id),
                            (tok.unk_token_id, w.add_unk_token_id), (tok.pad_token_id, w.add_pad_token_id)):
            if tid is not None:
                setter(int(tid))
        w.add_add_bos_token(bool(add_bos))
        w.add_add_eos_token(bool(add_eos))
        w.add_add_space_prefix(vocab.add_space_prefix)
        if isinstance(getattr(tok, "chat_template", None), str):
            w.add_chat_template(tok.chat_template)
        w.add_string("memcli.source", str(hf.folder))
        for key, value in (metadata or {}).items():
            w.add_string(key, str(value))
        gnames = dict(pairs)
        if hf.rope_scaling is not None and hf.rope_scaling[0] == "llama3":  # per-frequency factors, kept in F32
            w.add_tensor(gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight", llama3_rope_factors(hf))
        for gname, array in (hf.extra or {}).get("tensors", {}).items():  # Phi-3's LongRoPE factors, in F32
            w.add_tensor(gname, array)
        for hf_name, array in iter_hf_tensors(hf, [n for n, _ in pairs]):
            gname = gnames[hf_name]
            if deltas and hf_name in deltas:  # a merged LoRA, added in float32 before any layout change
                array = np.asarray(array, dtype=np.float32) + deltas[hf_name]
            data, raw = reader.encode(gguf_array(hf, hf_name, gname, array), outtype)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    runs.atomic_write(out, write, example="base.gguf")
    return {"out": str(out), "outtype": outtype, "arch": a, "name": model_name, "tensors": len(pairs),
            "bytes": Path(out).stat().st_size, "seconds": round(time.perf_counter() - t0, 3)}


def _write_rope_scaling(w, hf: HFModel) -> None:
    """RoPE scaling as llama.cpp reads it: linear (factor), yarn (factor, original context, betas, attention
    factor), llama3 (no key: the rope_freqs tensor carries it)."""
    import gguf

    if hf.rope_scaling is None or hf.rope_scaling[0] == "llama3":
        return
    kind, factor = hf.rope_scaling
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR if kind == "linear" else gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(factor)
    if kind == "yarn":
        w.add_rope_scaling_orig_ctx_len(int(hf.rope["original_max_position_embeddings"]))
        for key, setter in (("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                            ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if hf.rope.get(key) is not None:
                setter(float(hf.rope[key]))
        attention = hf.rope.get("attention_factor", hf.rope.get("attn_factor"))
        if attention is not None:
            w.add_rope_scaling_yarn_attn_factor(float(attention))


def _float_type(folder: Path, quant: str) -> str:
    """The float type of the file llama.cpp's quantiser reads (or the type itself for f32/f16)."""
    if quant in ("f32", "f16"):
        return quant
    n = sum(math.prod(s) for s in read_hf(folder).shapes.values())
    return "f32" if n <= _F32_LIMIT else "f16"


def write_model(folder: Path, out: Path, quant: str, name: str, deltas: dict | None, metadata: dict,
           threads: int | None) -> dict:
    """A model GGUF of any llama.cpp type: export_base (float; `deltas` merged) and, for the other types,
    llama.cpp's quantiser (memcli.llama.quantize) on a temporary float file beside `out`."""
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
            info = quantize(tmp, out, quant, threads)
        finally:
            tmp.unlink(missing_ok=True)
        info.update(name=name, arch=read_hf(folder).arch)
    info["seconds"] = round(time.perf_counter() - t0, 3)
    return info


def folder_stamp(folder: Path) -> str:
    """A short identity of an HF folder's weights (its path, and its files' sizes and times): cache key."""
    stamp = hashlib.sha256()
    stamp.update(str(folder.resolve()).encode())
    for part in ("config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json"):
        p = folder / part
        if p.exists():
            st = p.stat()
            stamp.update(f"{part}:{st.st_size}:{st.st_mtime_ns}".encode())
    return stamp.hexdigest()[:10]


def base_gguf(spec: models.ModelSpec) -> Path:
    """The base GGUF llama.cpp loads for a model: the shipped GGUF, the given .gguf, or an F32 export of the HF
    folder built once into the cache (next to the HF cache, under gguf/) and reused."""
    return spec.gguf_path if spec.gguf_path is not None else cached_base(spec, "f32")


def cached_base(spec: models.ModelSpec, quant: str, threads: int | None = None) -> Path:
    """The weights training loads for `spec` (its HF folder: for a model shipped quantised, the dequantised
    weights) as a GGUF of type `quant`, made once into the cache (export and quantiser are deterministic) and
    reused: verify's F16 base, and the quantised base an adapter is deployed over."""
    folder = models.hf_dir(spec)
    out = models.cache_dir() / "gguf" / f"{folder.name}-{folder_stamp(folder)}.{quant}.gguf"
    if not out.exists():
        write_model(folder, out, quant, spec.name, None, {}, threads)
    return out
