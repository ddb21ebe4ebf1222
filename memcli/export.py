"""GGUF export: LoRA adapters and base models that llama.cpp runs exactly as torch + PEFT do.

Written with the `gguf` package alone (no llama.cpp checkout, no converter scripts).

- `export_adapter(RUN_OR_PEFT_DIR, OUT)`: a llama.cpp LoRA adapter. Tensor names come from gguf's TensorNameMap
  (`blk.N.ffn_up.weight.lora_a`, ...). Two things make it exact rather than merely loadable:
  * RoPE layout. HF Llama rotates the two halves of each head (rotate_half); llama.cpp's Llama graph rotates
    adjacent pairs, so its base GGUFs hold q_proj/k_proj with the rows of every head reordered. The adapter's
    output rows (lora_b of q_proj/k_proj) get the same reordering, or the adapter loads and is silently wrong.
  * Scale. llama.cpp scales each pair by user_scale * alpha / rank (rank from lora_b's shape). PEFT's scale
    (alpha/r, alpha/sqrt(r) with rsLoRA, per-module ranks and alphas from rank_pattern/alpha_pattern) is folded
    into lora_b, and `adapter.lora.alpha` is written as the rank (alpha/rank = 1 exactly) or, when the modules'
    ranks differ, as 0, llama.cpp's "no alpha" (scale = user_scale). Either way user scale 1 reproduces PEFT.
  What llama.cpp cannot express is refused: DoRA, LoRA biases, modules_to_save, LoRA on embeddings, LoRA on the
  lm_head of a tied-embedding model, aLoRA.
- `export_base(HF_DIR, OUT)`: an HF Llama-family model (llama, mistral, qwen2) as a base GGUF: hyperparameters,
  weights (q/k rows permuted for the Llama graph) and the tokenizer (tokens, types, merges, the pre-tokenizer
  llama.cpp knows by name, special ids, add-BOS/EOS, chat template).
- `base_gguf(spec)`: the base GGUF of a model: the shipped GGUF, or an export built once into the cache.
- The adapter records its base: the memcli model name and a fingerprint computable from the HF folder used in
  training and from any GGUF of the same base (quantised or not): architecture hyperparameters, a hash of the
  token vocabulary, tensor names and shapes, plus the exact values of the 1-D tensors (norms), which every
  converter keeps in F32. `check_pair(adapter, base)` refuses a base the adapter was not trained for.

Every file is written to a temporary name and renamed: an error never leaves a partial .gguf.

Outtypes: adapters are small, so f32 (the default) is the exact choice. With F16 or Q8_0 weights llama.cpp also
rounds the activations it multiplies them with (to F16, to 8-bit blocks), which on the random test adapters cost
~1e-2 (f16) and ~0.3 (q8_0) in log-probability, against ~1e-4 for f32.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import models
from .errors import UserError

OUTTYPES = ("f32", "f16", "q8_0")

# HF model_type -> (gguf architecture, whether llama.cpp's graph for it wants q/k rows in the interleaved layout)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False)}

# The pre-tokenizer regexes of tokenizer.json files that llama.cpp implements under a name.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


# --------------------------------------------------------------------------------------------------------------
# Writing files atomically
# --------------------------------------------------------------------------------------------------------------

def _atomic_gguf(out: Path, write) -> None:
    """write(tmp_path) then rename into place; on any error the temporary file goes and `out` is untouched."""
    out = Path(out)
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name such as {out / 'adapter.gguf'}")
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.touch()  # can files be created there at all
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from None
    try:
        write(tmp)
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        if e.filename is not None and Path(e.filename) not in (tmp, out):
            raise  # not the output: an input that could not be read
        raise UserError(f"--out {out}: cannot write it ({e.strerror or e})") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _check_outtype(outtype: str) -> str:
    if outtype not in OUTTYPES:
        raise UserError(f"--outtype must be one of {', '.join(OUTTYPES)}, got '{outtype}'")
    return outtype


def _encode(array: np.ndarray, outtype: str, *, keep_f32: bool = False):
    """(data, raw_dtype) for GGUFWriter.add_tensor. 1-D tensors stay F32 (as every llama.cpp converter keeps
    them); Q8_0 needs rows that are whole 32-blocks, others fall back to F16."""
    import gguf

    array = np.ascontiguousarray(array, dtype=np.float32)
    if outtype == "f32" or keep_f32 or array.ndim < 2:
        return array, None
    if outtype == "q8_0" and array.shape[-1] % 32 == 0:
        return gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0), gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), None


def _file_type(outtype: str) -> int:
    import gguf

    return {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
            "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[outtype]


# --------------------------------------------------------------------------------------------------------------
# Reading GGUF headers: fast (no per-element objects), and every size checked against the file
# --------------------------------------------------------------------------------------------------------------

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1", 10: "<u8", 11: "<i8",
          12: "<f8"}


@dataclass
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order (ne): the row length first
    type: int  # GGMLQuantizationType value
    offset: int  # absolute, in the file
    nbytes: int


@dataclass
class GGUFMeta:
    path: Path
    kv: dict
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    def get(self, key, default=None):
        return self.kv.get(key, default)

    def array(self, name: str) -> np.ndarray:
        """The values of an F32/F16 tensor as a numpy array (numpy shape = reversed ggml shape)."""
        t = self.tensors[name]
        dtype = {0: np.float32, 1: np.float16}.get(t.type)
        if dtype is None:
            raise ValueError(f"tensor {name} is quantised")
        with open(self.path, "rb") as f:
            f.seek(t.offset)
            data = np.frombuffer(f.read(t.nbytes), dtype=dtype)
        return data.reshape(tuple(reversed(t.shape)))


class _Cursor:
    def __init__(self, buf):
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        value = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def raw_string(self) -> bytes:
        n = self.take("<Q")
        if self.pos + n > len(self.buf):
            raise struct.error("string past the end of the file")
        s = self.buf[self.pos: self.pos + n]
        self.pos += n
        return s

    def string(self) -> str:
        return self.raw_string().decode("utf-8", "surrogateescape")

    def value(self, vtype: int, raw_strings: bool):
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == 8:
            return self.raw_string() if raw_strings else self.string()
        if vtype == 9:
            sub, n = self.take("<I"), self.take("<Q")
            if sub in _NUMPY:
                width = np.dtype(_NUMPY[sub]).itemsize
                if self.pos + n * width > len(self.buf):
                    raise struct.error("array past the end of the file")
                values = np.frombuffer(self.buf, dtype=_NUMPY[sub], count=n, offset=self.pos).copy()
                self.pos += n * width
                return values.astype(bool) if sub == 7 else values
            if sub == 8:
                return [self.raw_string() if raw_strings else self.string() for _ in range(n)]
            return [self.value(sub, raw_strings) for _ in range(n)]
        raise ValueError(f"unknown GGUF value type {vtype}")


def read_gguf(path: str | os.PathLike, what: str = "GGUF file") -> GGUFMeta:
    """The metadata and tensor table of a GGUF file. Token strings are kept as bytes. UserError when the file is
    missing, not GGUF, corrupt or truncated."""
    import gguf

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    size = path.stat().st_size
    if size < 24:
        raise UserError(f"{what} {path} is not a GGUF file (only {size} bytes)")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != b"GGUF":
            raise UserError(f"{what} {path} is not a GGUF file")
        try:
            cur = _Cursor(buf)
            cur.pos = 4
            version = cur.take("<I")
            if version not in (2, 3):
                raise UserError(f"{what} {path}: unsupported GGUF version {version}")
            n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
            if n_tensors > size or n_kv > size:
                raise ValueError("implausible counts")
            kv = {}
            for _ in range(n_kv):
                key = cur.string()
                vtype = cur.take("<I")
                kv[key] = cur.value(vtype, raw_strings=key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges"))
            infos = []
            for _ in range(n_tensors):
                name = cur.string()
                n_dims = cur.take("<I")
                if n_dims > 8:
                    raise ValueError("implausible tensor rank")
                shape = tuple(cur.take("<Q") for _ in range(n_dims))
                infos.append((name, shape, cur.take("<I"), cur.take("<Q")))
            align = int(kv.get("general.alignment", 32))
            start = -(-cur.pos // align) * align
        except UserError:
            raise
        except (struct.error, ValueError, OverflowError, UnicodeDecodeError, MemoryError) as e:
            raise UserError(f"{what} {path} is corrupt or truncated ({e})") from None
    meta = GGUFMeta(path, kv)
    for name, shape, ttype, offset in infos:
        try:
            block, type_size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(ttype)]
        except (ValueError, KeyError):
            raise UserError(f"{what} {path} is corrupt: tensor {name} has unknown type {ttype}") from None
        nbytes = math.prod(shape) // block * type_size
        if start + offset + nbytes > size:
            raise UserError(f"{what} {path} is truncated: tensor {name} ends at byte {start + offset + nbytes:,}, "
                            f"the file has {size:,}")
        meta.tensors[name] = GGUFTensor(name, shape, ttype, start + offset, nbytes)
    return meta


# --------------------------------------------------------------------------------------------------------------
# HF model folders
# --------------------------------------------------------------------------------------------------------------

@dataclass
class HFModel:
    """What export needs from an HF folder, read without building the torch model."""

    folder: Path
    config: dict
    model_type: str
    arch: str  # gguf architecture name
    permute_qk: bool
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rms_eps: float
    rope_theta: float
    rope_scaling: tuple[str, float] | None  # ("linear", factor)
    files: dict[str, Path]  # tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]]  # tensor name -> torch shape
    tied: bool  # the output layer is the token embedding

    def gguf_name(self, hf_name: str) -> str | None:
        return _name_map(self.arch, self.n_layer).get_name(hf_name, try_suffixes=(".weight", ".bias"))


_NAME_MAPS: dict = {}


def _name_map(arch: str, n_layer: int):
    import gguf

    key = (arch, n_layer)
    if key not in _NAME_MAPS:
        arch_enum = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
        _NAME_MAPS[key] = gguf.get_tensor_name_map(arch_enum, n_layer)
    return _NAME_MAPS[key]


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise UserError(f"{what} {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{what} {path} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{what} {path} is not a JSON object")
    return value


def read_hf(folder: str | os.PathLike) -> HFModel:
    """Config and tensor table of an HF model folder; UserError for anything export cannot handle."""
    from safetensors import safe_open

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"model folder {folder} does not exist")
    config = _read_json(folder / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type not in ARCHITECTURES:
        raise UserError(f"model {folder} is of type '{model_type}'; GGUF export supports "
                        f"{', '.join(ARCHITECTURES)}")
    arch, permute = ARCHITECTURES[model_type]
    if config.get("hidden_act", "silu") != "silu":
        raise UserError(f"model {folder}: activation '{config.get('hidden_act')}' is not supported (silu only)")
    rope = dict(config.get("rope_parameters") or config.get("rope_scaling") or {})
    rope_theta = rope.get("rope_theta", config.get("rope_theta", 10000.0))
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        rope_scaling = None
    elif rope_type == "linear":
        rope_scaling = ("linear", float(rope["factor"]))
    else:
        raise UserError(f"model {folder}: RoPE scaling '{rope_type}' is not supported by GGUF export")
    n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json(index, "safetensors index")["weight_map"]
        file_names = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        file_names = ["model.safetensors"]
    else:
        raise UserError(f"model folder {folder} has no model.safetensors")
    files, shapes = {}, {}
    for file_name in file_names:
        try:
            with safe_open(folder / file_name, "pt") as f:
                for name in f.keys():
                    files[name] = folder / file_name
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"weights {folder / file_name} are corrupt or truncated ({e})") from None
    tied = "lm_head.weight" not in shapes or bool(config.get("tie_word_embeddings", False))
    return HFModel(
        folder=folder, config=config, model_type=model_type, arch=arch, permute_qk=permute,
        n_layer=int(config["num_hidden_layers"]), n_embd=n_embd, n_ff=int(config["intermediate_size"]),
        n_head=n_head, n_head_kv=int(config.get("num_key_value_heads") or n_head),
        head_dim=int(config.get("head_dim") or n_embd // n_head),
        n_ctx=int(config.get("max_position_embeddings", 4096)), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling, files=files, shapes=shapes, tied=tied)


def _hf_tensors(hf: HFModel) -> list[tuple[str, str]]:
    """(hf name, gguf name) of every tensor a base GGUF holds, in the HF file order."""
    pairs = []
    for name in hf.shapes:
        if name == "lm_head.weight" and hf.tied:
            continue
        if name.endswith("rotary_emb.inv_freq"):
            continue
        gname = hf.gguf_name(name)
        if gname is None:
            raise UserError(f"model {hf.folder}: tensor '{name}' has no llama.cpp counterpart for {hf.arch}")
        pairs.append((name, gname))
    return pairs


def _iter_hf_tensors(hf: HFModel, names):
    """(name, float32 array) for the given tensor names, opening each safetensors file once."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(hf.files[name], []).append(name)
    for path, file_names in by_file.items():
        with safe_open(path, "pt") as f:
            for name in file_names:
                yield name, f.get_tensor(name).float().numpy()


def permute_rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's: inside each head, output row (half h, index i) moves to 2*i + h, so the
    halves HF rotates together become adjacent pairs. Works on weights [out, in], lora_b [out, r], biases [out]."""
    out = rows.shape[0]
    head = out // n_head
    if head * n_head != out or head % 2:
        raise ValueError(f"{out} rows do not split into {n_head} heads of even size")
    return rows.reshape(n_head, 2, head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def _rope_heads(hf: HFModel, gguf_name: str) -> int | None:
    """How many heads to permute by for a q or k tensor of a Llama-graph model; None for any other tensor."""
    if not hf.permute_qk:
        return None
    if re.search(r"\.attn_q\.(weight|bias)$", gguf_name):
        return hf.n_head
    if re.search(r"\.attn_k\.(weight|bias)$", gguf_name):
        return hf.n_head_kv
    return None


# --------------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    added: dict[int, dict]


def _pre_tokenizer(tj: dict, where: Path) -> str:
    """The llama.cpp pre-tokenizer name for a tokenizer.json whose splitting llama.cpp reproduces."""
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]

    def describe(step):
        kind = step.get("type")
        if kind == "ByteLevel":
            return ("ByteLevel", bool(step.get("use_regex", True)), bool(step.get("add_prefix_space", False)))
        if kind == "Digits":
            return ("Digits", bool(step.get("individual_digits", False)))
        if kind == "Split":
            pattern = step.get("pattern", {})
            return ("Split", pattern.get("Regex", pattern.get("String")), step.get("behavior"), step.get("invert"))
        return (kind,)

    shape = [describe(s) for s in steps]
    known = {
        (("ByteLevel", True, False),): "gpt-2",
        (("Digits", True), ("ByteLevel", True, False)): "smollm",
        (("Split", _QWEN2_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "qwen2",
        (("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False, False)): "llama-bpe",
    }
    name = known.get(tuple(shape))
    if name is None:
        raise UserError(f"tokenizer {where}: its pre-tokenizer {[s[0] for s in shape]} has no llama.cpp "
                        "equivalent that memcli knows (byte-level BPE of the GPT-2, SmolLM, Qwen2 or Llama 3 kind)")
    return name


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Tokens (padded to the model's vocabulary size), types and merges from tokenizer.json."""
    import gguf

    where = folder / "tokenizer.json"
    tj = _read_json(where, "tokenizer")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        kind = f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        raise UserError(f"tokenizer {where}: only byte-level BPE tokenizers can be exported to GGUF (this one is "
                        f"{kind}, e.g. a SentencePiece-style Llama 2 / Mistral tokenizer)")
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise UserError(f"tokenizer {where}: normalizer {normalizer.get('type')} has no llama.cpp equivalent")
    pre = _pre_tokenizer(tj, where)
    vocab = model["vocab"]
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    size = max(n_vocab, len(vocab), max(added, default=-1) + 1)
    tokens: list[str | None] = [None] * size
    for token, i in vocab.items():
        tokens[i] = token
    types = [int(gguf.TokenType.NORMAL)] * size
    for i, a in added.items():
        tokens[i] = a["content"]
        types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    for i, t in enumerate(tokens):
        if t is None:
            tokens[i] = f"[PAD{i}]"
            types[i] = int(gguf.TokenType.UNUSED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    return Vocab(tokens, types, merges, pre, added)


def _vocab_digest(tokens) -> str:
    h = hashlib.sha256()
    for t in tokens:
        b = t if isinstance(t, bytes) else t.encode("utf-8", "surrogateescape")
        h.update(struct.pack("<Q", len(b)))
        h.update(b)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------------------------

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


def _f32(x: float) -> float:
    return float(np.float32(x))


def _structure_digest(arch, hparams: dict, vocab_digest: str, tensors: dict[str, tuple[int, ...]]) -> str:
    record = {"arch": arch, "hparams": hparams, "vocab": vocab_digest,
              "tensors": sorted([n, list(s)] for n, s in tensors.items() if not n.startswith("rope_freqs"))}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def _weights_digest(named_arrays) -> str:
    h = hashlib.sha256()
    for name, array in sorted(named_arrays, key=lambda p: p[0]):
        h.update(name.encode() + b"\0")
        h.update(np.ascontiguousarray(array, dtype="<f4").tobytes())
    return h.hexdigest()[:16]


def read_base(folder: str | os.PathLike) -> tuple[HFModel, Vocab, list[tuple[str, str]]]:
    """Every check GGUF export makes of a base model, in one place (export_base, the fingerprint an adapter
    records, and the `exportable` pre-check all go through it): architecture, activation and RoPE scaling
    (read_hf), tokenizer kind, normalizer and pre-tokenizer (read_vocab), a llama.cpp name for every tensor.
    Reads config.json, tokenizer.json and the safetensors headers, no weights. UserError naming the cause."""
    hf = read_hf(folder)
    vocab = read_vocab(hf.folder, int(hf.config.get("vocab_size") or 0))
    return hf, vocab, _hf_tensors(hf)


def hf_fingerprint(folder: str | os.PathLike) -> Fingerprint:
    """The fingerprint of the base GGUF that export_base would write for this HF folder."""
    hf, vocab, pairs = read_base(folder)
    tensors = {g: tuple(reversed(hf.shapes[n])) for n, g in pairs}
    hparams = {"n_layer": hf.n_layer, "n_embd": hf.n_embd, "n_ff": hf.n_ff, "n_head": hf.n_head,
               "n_head_kv": hf.n_head_kv, "head_dim": hf.head_dim, "n_vocab": len(vocab.tokens),
               "rope_theta": _f32(hf.rope_theta), "rms_eps": _f32(hf.rms_eps)}
    structure = _structure_digest(hf.arch, hparams, _vocab_digest(vocab.tokens), tensors)
    gnames = dict(pairs)
    ones = [n for n, _ in pairs if len(hf.shapes[n]) == 1]
    weights = _weights_digest((gnames[n], array) for n, array in _iter_hf_tensors(hf, ones))
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
    ones = [t for t in meta.tensors.values() if len(t.shape) == 1 and not t.name.startswith("rope_freqs")]
    weights = (_weights_digest((t.name, meta.array(t.name)) for t in ones)
               if all(t.type == 0 for t in ones) else None)
    return Fingerprint(structure, weights)


# --------------------------------------------------------------------------------------------------------------
# Base models
# --------------------------------------------------------------------------------------------------------------

def export_base(hf_dir: str | os.PathLike, out: str | os.PathLike, outtype: str = "f32",
                name: str | None = None) -> dict:
    """Write an HF Llama-family model (llama, mistral, qwen2) as a llama.cpp base GGUF. Returns a summary.
    `hf_dir` may also be a memcli model name (its HF folder, built into the cache if needed, is exported)."""
    import gguf
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    _check_outtype(outtype)
    if not Path(hf_dir).is_dir() and str(hf_dir) in models.registry():
        spec = models.resolve(str(hf_dir))
        name, hf_dir = name or spec.name, models.hf_dir(spec)
    hf, vocab, pairs = read_base(hf_dir)
    try:
        tok = AutoTokenizer.from_pretrained(hf.folder)
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
        w.add_file_type(_file_type(outtype))
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
        w.add_rope_dimension_count(hf.head_dim)
        if hf.head_dim != hf.n_embd // hf.n_head:
            w.add_key_length(hf.head_dim)
            w.add_value_length(hf.head_dim)
        if hf.rope_scaling is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(hf.rope_scaling[1])
        w.add_tokenizer_model("gpt2")
        w.add_tokenizer_pre(vocab.pre)
        w.add_token_list(vocab.tokens)
        w.add_token_types(vocab.types)
        w.add_token_merges(vocab.merges)
        for tid, setter in ((tok.bos_token_id, w.add_bos_token_id), (tok.eos_token_id, w.add_eos_token_id),
                            (tok.unk_token_id, w.add_unk_token_id), (tok.pad_token_id, w.add_pad_token_id)):
            if tid is not None:
                setter(int(tid))
        w.add_add_bos_token(bool(add_bos))
        w.add_add_eos_token(bool(add_eos))
        w.add_add_space_prefix(False)
        if isinstance(getattr(tok, "chat_template", None), str):
            w.add_chat_template(tok.chat_template)
        w.add_string("memcli.source", str(hf.folder))
        gnames = dict(pairs)
        for hf_name, array in _iter_hf_tensors(hf, [n for n, _ in pairs]):
            gname = gnames[hf_name]
            heads = _rope_heads(hf, gname)
            if heads is not None:
                array = permute_rope_rows(array, heads)
            data, raw = _encode(array, outtype)
            w.add_tensor(gname, data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic_gguf(Path(out), write)
    return {"out": str(out), "outtype": outtype, "arch": a, "name": model_name, "tensors": len(pairs),
            "bytes": Path(out).stat().st_size, "seconds": round(time.perf_counter() - t0, 3)}


def base_gguf(spec: models.ModelSpec) -> Path:
    """The base GGUF llama.cpp loads for a model: the shipped GGUF, the given .gguf, or an F32 export of the HF
    folder built once into the cache (next to the HF cache, under gguf/) and reused."""
    if spec.gguf_path is not None:
        return spec.gguf_path
    folder = models.hf_dir(spec)
    stamp = hashlib.sha256()
    stamp.update(str(folder.resolve()).encode())
    for part in ("config.json", "tokenizer.json", "model.safetensors", "model.safetensors.index.json"):
        p = folder / part
        if p.exists():
            st = p.stat()
            stamp.update(f"{part}:{st.st_size}:{st.st_mtime_ns}".encode())
    out = models.cache_dir() / "gguf" / f"{folder.name}-{stamp.hexdigest()[:10]}.f32.gguf"
    if not out.exists():
        export_base(folder, out, "f32", name=spec.name)
    return out


# --------------------------------------------------------------------------------------------------------------
# Adapters
# --------------------------------------------------------------------------------------------------------------

_PREFIX = "base_model.model."


def _adapter_source(src: Path) -> tuple[Path, str | None]:
    """(PEFT folder, memcli model name from the run config or None)."""
    src = Path(src)
    if not src.exists():
        raise UserError(f"{src} does not exist")
    if (src / "adapter").is_dir() and (src / "config.yaml").exists():
        import yaml

        try:
            settings = (yaml.safe_load((src / "config.yaml").read_text()) or {}).get("settings", {})
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise UserError(f"run config {src / 'config.yaml'} cannot be read ({e})") from None
        if not (src / "adapter" / "adapter_config.json").exists():
            raise UserError(f"run folder {src} has no finished adapter (adapter/adapter_config.json is missing)")
        return src / "adapter", settings.get("model")
    if src.is_dir() and (src / "adapter_config.json").exists():
        return src, None
    if (src / "config.yaml").exists():
        raise UserError(f"run folder {src} has no finished adapter (no adapter/ folder yet)")
    if src.is_dir():
        raise UserError(f"{src} is not a PEFT adapter folder or memcli run folder (no adapter_config.json)")
    raise UserError(f"{src} is not a PEFT adapter folder or memcli run folder")


def _model_name_for(base_path: str) -> str | None:
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
    registry_name = _model_name_for(recorded)
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
    cfg = _read_json(peft_dir / "adapter_config.json", "adapter config")
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
        originals = dict(_iter_hf_tensors(hf, [base_name for _, base_name, _ in copies]))
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
        heads = _rope_heads(hf, target) if _permute else None
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
    _check_outtype(outtype)
    peft_dir, run_model = _adapter_source(Path(src))
    cfg = _read_json(peft_dir / "adapter_config.json", "adapter config")
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
        w.add_file_type(_file_type(outtype))
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
            data, raw = _encode(p.a, outtype)
            w.add_tensor(p.target + ".lora_a", data, raw_dtype=raw)
            data, raw = _encode(p.b, outtype)
            w.add_tensor(p.target + ".lora_b", data, raw_dtype=raw)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()

    _atomic_gguf(Path(out), write)
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


# --------------------------------------------------------------------------------------------------------------
# Running llama.cpp (reference runner for tests and the agreement check)
# --------------------------------------------------------------------------------------------------------------

def llama_logits(base: str | os.PathLike, sequences: list[list[int]], adapter: str | os.PathLike | None = None,
                 scale: float = 1.0, n_threads: int = 2, n_ctx: int | None = None) -> list[np.ndarray]:
    """Logits [len(seq), n_vocab] at every position of each token sequence, from llama.cpp (llama-cpp-python)
    with an F32 KV cache, so the only differences from torch are the weights' own quantisation."""
    from llama_cpp import Llama

    from . import llamacpp

    longest = max(len(s) for s in sequences)
    n_ctx = n_ctx or max(64, longest)
    kwargs = dict(model_path=str(base), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, n_threads=n_threads,
                  n_threads_batch=n_threads, logits_all=True, type_k=0, type_v=0, verbose=False, n_gpu_layers=0)
    if adapter is not None:
        kwargs.update(lora_path=str(adapter), lora_scale=float(scale))
    try:
        with llamacpp.safe_defaults(base):  # off llama.cpp's extra buffer types where they crash (AMX)
            llm = Llama(**kwargs)
    except (ValueError, RuntimeError) as e:
        raise UserError(f"llama.cpp could not load {base}{' with ' + str(adapter) if adapter else ''} ({e})") from None
    try:
        result = []
        for seq in sequences:
            llm.reset()
            llm.eval(list(seq))
            result.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
        return result
    finally:
        llm.close()


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def agreement(run: str | os.PathLike, corpus_path: str | os.PathLike | None = None, limit: int | None = None,
              n_threads: int | None = None, adapter_gguf: str | os.PathLike | None = None) -> dict:
    """Per-entry exact-match verdicts (teacher-forced greedy: every answer token is the argmax) from torch + PEFT
    on the dequantised base and from llama.cpp on the base GGUF (e.g. the shipped Q4_1) with the exported
    adapter, over a run's corpus. Returns the agreement rate and every disagreement with both logit margins
    (target logit minus the best other logit at the entry's worst position)."""
    import tempfile

    import torch
    import yaml
    from peft import PeftModel

    from . import corpus as corpus_mod

    run = Path(run)
    settings = yaml.safe_load((run / "config.yaml").read_text())["settings"]
    spec = models.resolve(settings["model"])
    model, tokenizer = models.load_model(spec)
    examples = corpus_mod.load_examples(corpus_path or settings["corpus"], tokenizer, key=settings.get("key", ""),
                                        chat_template=settings.get("chat_template", False),
                                        eos=settings.get("eos", False), answer_tokens=settings.get("answer_tokens"))
    if limit:
        examples = examples[:limit]
    peft_model = PeftModel.from_pretrained(model, run / "adapter").eval()
    with tempfile.TemporaryDirectory() as tmp:
        if adapter_gguf is None:
            adapter_gguf = run / "adapter.gguf"
            if not adapter_gguf.exists():
                adapter_gguf = Path(tmp) / "adapter.gguf"
                export_adapter(run, adapter_gguf)
        base = base_gguf(spec)
        check_pair(adapter_gguf, base)
        seqs = [ex.input_ids for ex in examples]
        llama = llama_logits(base, seqs, adapter_gguf, n_threads=n_threads or max(1, os.cpu_count() // 2),
                             n_ctx=max(len(s) for s in seqs))

    def verdict(logits: np.ndarray, ex) -> tuple[bool, float]:
        p = len(ex.prompt_ids)
        rows = logits[p - 1: p - 1 + len(ex.target_ids)].astype(np.float64)
        tgt = np.array(ex.target_ids)
        target_logit = rows[np.arange(len(tgt)), tgt]
        others = rows.copy()
        others[np.arange(len(tgt)), tgt] = -np.inf
        margins = target_logit - others.max(-1)
        return bool((margins > 0).all()), float(margins.min())

    disagreements, agree, exact, gaps, margins = [], 0, 0, [], []
    with torch.no_grad():
        for ex, ll in zip(examples, llama):
            logits = peft_model(torch.tensor([ex.input_ids])).logits[0].float().numpy()
            t_ok, t_margin = verdict(logits, ex)
            l_ok, l_margin = verdict(ll, ex)
            exact += l_ok
            gaps.append(abs(t_margin - l_margin))
            margins.append(l_margin)
            if t_ok == l_ok:
                agree += 1
            else:
                disagreements.append({"line": ex.line, "torch_exact": t_ok, "llama_exact": l_ok,
                                      "torch_margin": round(t_margin, 4), "llama_margin": round(l_margin, 4)})
    return {"entries": len(examples), "agree": agree, "rate": agree / len(examples), "llama_exact": exact,
            "min_llama_margin": round(min(margins), 4), "max_margin_gap": round(max(gaps), 4),
            "base": str(base), "adapter": str(adapter_gguf), "disagreements": disagreements}


def main(argv: list[str] | None = None) -> int:
    """`python -m memcli.export agree RUN [--corpus C] [--limit N]`: the torch vs llama.cpp verdict agreement."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m memcli.export")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("agree", help="torch vs llama.cpp exact-match verdict agreement of a finished run")
    p.add_argument("run")
    p.add_argument("--corpus")
    p.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    try:
        result = agreement(args.run, args.corpus, args.limit)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{result['agree']}/{result['entries']} verdicts agree ({100 * result['rate']:.2f} %); llama.cpp: "
          f"{result['llama_exact']} exact, smallest margin {result['min_llama_margin']}; largest torch/llama.cpp "
          f"margin difference {result['max_margin_gap']}; base {result['base']}, adapter {result['adapter']}")
    for d in result["disagreements"]:
        print(f"  line {d['line']}: torch {'exact' if d['torch_exact'] else 'miss'} (margin {d['torch_margin']}), "
              f"llama.cpp {'exact' if d['llama_exact'] else 'miss'} (margin {d['llama_margin']})")
    return 0 if result["rate"] >= 0.99 else 1


if __name__ == "__main__":
    raise SystemExit(main())
