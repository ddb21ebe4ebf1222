"""The identity of a base model, computable from the HF folder used in training and from any GGUF of the same
base (quantised or not): architecture hyperparameters, a hash of the token vocabulary, tensor names and shapes,
plus the exact values of the 1-D tensors (norms), which every converter keeps in F32. An adapter GGUF records
its base's fingerprint (memcli.base.fingerprint / memcli.base.weights), and check_pair and `memcli verify`
refuse a base that does not match it.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass

import numpy as np

from memcli.core import models
from memcli.core.errors import UserError
from memcli.core.gguf_reader import GGUFMeta, read_gguf
from memcli.gguf.hf import gguf_array, iter_hf_tensors, read_base


@dataclass(frozen=True)
class Fingerprint:
    """`structure`: architecture, hyperparameters, vocabulary and tensor table (equal across quantisations);
    `weights`: the exact values of the 1-D tensors (norms), None where a file stores them other than as F32."""

    structure: str
    weights: str | None

    def matches(self, other: "Fingerprint") -> bool:
        if self.structure != other.structure:
            return False
        return self.weights is None or other.weights is None or self.weights == other.weights

    def __str__(self) -> str:
        return self.structure + (f"/{self.weights}" if self.weights else "")


_ROPE_TABLES = ("rope_freqs", "rope_factors")  # RoPE tables a converter derives from the config, not weights


def _f32(x: float) -> float:
    return float(np.float32(x))


def _structure_digest(arch, hparams: dict, vocab_digest: str, tensors: dict[str, tuple[int, ...]]) -> str:
    record = {"arch": arch, "hparams": hparams, "vocab": vocab_digest,
              "tensors": sorted([n, list(s)] for n, s in tensors.items() if not n.startswith(_ROPE_TABLES))}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _weights_digest(named_arrays) -> str:
    h = hashlib.sha256()
    for name, array in sorted(named_arrays, key=lambda p: p[0]):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return h.hexdigest()[:16]


def _vocab_digest(tokens) -> str:
    h = hashlib.sha256()
    for t in tokens:
        b = t if isinstance(t, bytes) else t.encode("utf-8", "surrogateescape")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


def hf_fingerprint(folder: str | os.PathLike) -> Fingerprint:
    """The fingerprint of the base GGUF that export_base would write for this HF folder."""
    hf, vocab, pairs = read_base(folder)
    tensors = {g: tuple(reversed(hf.shapes[n])) for n, g in pairs}
    hparams = {"n_layer": hf.n_layer, "n_embd": hf.n_embd, "n_ff": hf.n_ff, "n_head": hf.n_head,
               "n_head_kv": hf.n_head_kv, "head_dim": hf.n_rot, "n_vocab": len(vocab.tokens),
               "rope_theta": _f32(hf.rope_theta), "rms_eps": _f32(hf.rms_eps)}
    structure = _structure_digest(hf.arch, hparams, _vocab_digest(vocab.tokens), tensors)
    gnames = dict(pairs)
    ones = [n for n, _ in pairs if len(hf.shapes[n]) == 1]
    weights = _weights_digest((gnames[n], gguf_array(hf, n, gnames[n], array))
                              for n, array in iter_hf_tensors(hf, ones))
    return Fingerprint(structure, weights)


def gguf_fingerprint(meta: GGUFMeta | str | os.PathLike) -> Fingerprint:
    if not isinstance(meta, GGUFMeta):
        meta = read_gguf(meta, "base model")
    arch = meta.get("general.architecture")
    tokens = meta.get("tokenizer.ggml.tokens")
    if arch is None or tokens is None:
        raise UserError(f"base model {meta.path} is not a model GGUF (no architecture or vocabulary)")

    def hp(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise UserError(f"base model {meta.path} lacks {arch}.{key}")
        return value

    n_embd, n_head = int(hp("embedding_length")), int(hp("attention.head_count"))
    head_dim = meta.get(f"{arch}.rope.dimension_count") or meta.get(f"{arch}.attention.key_length") or n_embd // n_head
    hparams = {"n_layer": int(hp("block_count")), "n_embd": n_embd, "n_ff": int(hp("feed_forward_length")),
               "n_head": n_head, "n_head_kv": int(hp("attention.head_count_kv", n_head)), "head_dim": int(head_dim),
               "n_vocab": len(tokens), "rope_theta": _f32(hp("rope.freq_base", 10000.0)),
               "rms_eps": _f32(hp("attention.layer_norm_rms_epsilon"))}
    tensors = {t.name: t.shape for t in meta.tensors.values()}
    structure = _structure_digest(arch, hparams, _vocab_digest(tokens), tensors)
    ones = [t for t in meta.tensors.values() if len(t.shape) == 1 and not t.name.startswith(_ROPE_TABLES)]
    weights = (_weights_digest((t.name, meta.array(t.name)) for t in ones)
               if all(t.type == 0 for t in ones) else None)
    return Fingerprint(structure, weights)


def base_fingerprint(spec):
    """The fingerprint (Fingerprint) of a model as a base: from its GGUF when it comes as
    one (no dequantising), else from its HF folder. The two agree for the same base."""
    return gguf_fingerprint(spec.gguf_path) if spec.gguf_path is not None else hf_fingerprint(models.hf_dir(spec))


def check_base(recorded, spec, adapter) -> None:
    """Refuse a base other than the one the adapter was trained for (the torch backend's counterpart of
    memcli.gguf.adapter.check_pair). recorded: `memcli.commands.verify.sources.recorded_base`'s answer, None to skip."""
    if recorded is None:
        return
    ours, trained_for = recorded
    theirs = base_fingerprint(spec)
    if not ours.matches(theirs):
        raise UserError(f"adapter {adapter} was trained for {trained_for}, base {spec.name} is another model "
                        f"(fingerprint {ours} vs {theirs})")
