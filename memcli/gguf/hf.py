"""What GGUF export needs from an HF model folder, read without building the torch model: config, tensor table,
llama.cpp's name for every tensor, the RoPE row layout llama.cpp's Llama graph wants, and the tokenizer.

RoPE layout: HF Llama rotates the two halves of each head (rotate_half); llama.cpp's Llama graph rotates adjacent
pairs, so its base GGUFs hold q_proj/k_proj with the rows of every head reordered (permute_rope_rows), and an
adapter's output rows (lora_b of q_proj/k_proj) get the same reordering, or it loads and is silently wrong.
Which architectures want it: memcli.core.models.ARCHITECTURES.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memcli.core import models
from memcli.core.errors import UserError
from memcli.gguf import arch as arch_extras

# The pre-tokenizer regexes of tokenizer.json files that llama.cpp implements under a name.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                r"|\s+(?!\S)|\s+")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


ROPE_TYPES = ("default", "linear", "llama3", "yarn", "longrope")


# --- HF model folders ----------------------------------------------------------------------------------------

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
    rope_scaling: tuple[str, float] | None  # (rope type, factor): linear, llama3 or yarn; None: plain RoPE
    rope: dict  # the config's RoPE parameters (factor, original_max_position_embeddings, beta_fast, ...)
    files: dict[str, Path]  # tensor name -> safetensors file
    shapes: dict[str, tuple[int, ...]]  # tensor name -> torch shape
    tied: bool  # the output layer is the token embedding
    n_rot: int = 0  # dimensions of each head RoPE rotates (head_dim unless partial_rotary_factor)
    norm_shift: float = 0.0  # added to RMSNorm weights on export (memcli.core.models.Family)
    extra: dict | None = None  # family keys beyond Llama's (memcli.gguf.arch.family_hparams)

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


def read_json(path: Path, what: str) -> dict:
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
    config = read_json(folder / "config.json", "model config")
    model_type = config.get("model_type")
    if model_type not in models.ARCHITECTURES:
        raise UserError(f"model {folder} is of type '{model_type}'; GGUF export supports "
                        f"{', '.join(models.ARCHITECTURES)}")
    family = models.ARCHITECTURES[model_type]
    arch, permute = family.arch, family.permute_qk
    activation = config.get("hidden_activation") or config.get("hidden_act") or "silu"
    if activation != family.activation:
        raise UserError(f"model {folder}: activation '{activation}' is not supported for {model_type} "
                        f"(llama.cpp's graph applies {family.activation})")
    rope, local_rope = arch_extras.rope_parameters(config, model_type, folder)
    rope_theta = rope["rope_theta"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise UserError(f"model {folder}: RoPE scaling '{rope_type}' is not supported by GGUF export "
                        f"(supported: {', '.join(ROPE_TYPES)})")
    if rope_type == "longrope" and model_type != "phi3":
        raise UserError(f"model {folder}: RoPE scaling 'longrope' is supported on Phi-3 only")
    if rope_type == "llama3" and not permute:
        raise UserError(f"model {folder}: RoPE scaling 'llama3' is supported on the Llama graph only")
    if rope_type == "yarn" and "original_max_position_embeddings" not in rope:
        rope = {**rope, "original_max_position_embeddings": config.get("max_position_embeddings", 4096)}
    rope_scaling = None if rope_type in ("default", "longrope") else (rope_type, float(rope.get("factor", 1.0)))
    n_embd, n_head = int(config["hidden_size"]), int(config["num_attention_heads"])

    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "safetensors index")["weight_map"]
        file_names = sorted(set(weight_map.values()))
    elif (folder / "model.safetensors").exists():
        file_names = ["model.safetensors"]
    else:
        raise UserError(f"model folder {folder} has no model.safetensors")
    files, shapes = {}, {}
    for file_name in file_names:
        try:
            with safe_open(folder / file_name, "np") as f:  # the header only: no tensor is read
                for name in f.keys():
                    files[name] = folder / file_name
                    shapes[name] = tuple(f.get_slice(name).get_shape())
        except Exception as e:  # safetensors raises its own error types for bad headers
            raise UserError(f"weights {folder / file_name} are corrupt or truncated ({e})") from None
    tied = "lm_head.weight" not in shapes or bool(config.get("tie_word_embeddings", False))
    n_layer = int(config["num_hidden_layers"])
    head_dim = int(config.get("head_dim") or n_embd // n_head)
    n_rot = arch_extras.rotary_dims(config, rope, n_embd, n_head, head_dim)
    extra = arch_extras.family_hparams(config, model_type, folder, rope, local_rope, n_layer, n_embd, n_head,
                                       head_dim, n_rot)
    return HFModel(
        folder=folder, config=config, model_type=model_type, arch=arch, permute_qk=permute,
        n_layer=n_layer, n_embd=n_embd, n_ff=int(config["intermediate_size"]),
        n_head=n_head, n_head_kv=int(config.get("num_key_value_heads") or n_head), head_dim=head_dim,
        n_ctx=int(config.get("max_position_embeddings", 4096)), rms_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope_theta), rope_scaling=rope_scaling, rope=rope, files=files, shapes=shapes, tied=tied,
        n_rot=n_rot, norm_shift=family.norm_shift, extra=extra)


def gguf_array(hf: HFModel, hf_name: str, gguf_name: str, array: np.ndarray) -> np.ndarray:
    """An HF tensor as llama.cpp's graph wants it: Gemma 3's RMSNorm weights + 1, q/k rows of the Llama graph in
    its RoPE layout."""
    if hf.norm_shift and hf_name.endswith("norm.weight"):
        array = array + np.float32(hf.norm_shift)
    heads = rope_heads(hf, gguf_name)
    return permute_rope_rows(array, heads) if heads is not None else array


def hf_tensors(hf: HFModel) -> list[tuple[str, str]]:
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


def iter_hf_tensors(hf: HFModel, names):
    """(name, float32 array) for the given tensor names, opening each safetensors file once."""
    from safetensors import safe_open

    by_file: dict[Path, list[str]] = {}
    for name in names:
        by_file.setdefault(hf.files[name], []).append(name)
    for path, file_names in by_file.items():
        with safe_open(path, "np") as f:
            if all(f.get_slice(name).get_dtype() != "BF16" for name in file_names):
                for name in file_names:
                    yield name, f.get_tensor(name).astype(np.float32, copy=False)
                continue
        with safe_open(path, "pt") as f:  # numpy has no bfloat16: torch reads such a file (and costs its import)
            for name in file_names:
                yield name, f.get_tensor(name).float().numpy()


def llama3_rope_factors(hf: HFModel) -> np.ndarray:
    """llama.cpp's `rope_freqs` tensor for Llama 3.x RoPE scaling: the factor each rotary frequency is divided by,
    taken from transformers' own llama3 frequencies (default inv_freq / llama3 inv_freq)."""
    from transformers import AutoConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    dim = hf.head_dim
    default = 1.0 / (hf.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    config = AutoConfig.from_pretrained(hf.folder)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    return (default / scaled.double().numpy()).astype(np.float32)


def permute_rope_rows(rows: np.ndarray, n_head: int) -> np.ndarray:
    """HF rotary layout -> llama.cpp's: inside each head, output row (half h, index i) moves to 2*i + h, so the
    halves HF rotates together become adjacent pairs. Works on weights [out, in], lora_b [out, r], biases [out]."""
    out = rows.shape[0]
    head = out // n_head
    if head * n_head != out or head % 2:
        raise ValueError(f"{out} rows do not split into {n_head} heads of even size")
    return rows.reshape(n_head, 2, head // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def rope_heads(hf: HFModel, gguf_name: str) -> int | None:
    """How many heads to permute by for a q or k tensor of a Llama-graph model; None for any other tensor."""
    if not hf.permute_qk:
        return None
    if re.search(r"\.attn_q\.(weight|bias)$", gguf_name):
        return hf.n_head
    if re.search(r"\.attn_k\.(weight|bias)$", gguf_name):
        return hf.n_head_kv
    return None


# --- the tokenizer -------------------------------------------------------------------------------------------

@dataclass
class Vocab:
    tokens: list[str]
    types: list[int]
    merges: list[str]
    pre: str
    added: dict[int, dict]
    model: str = "gpt2"  # tokenizer.ggml.model: gpt2 (byte-level BPE) or llama (SentencePiece)
    scores: list[float] | None = None  # SentencePiece piece scores
    add_space_prefix: bool = False  # SentencePiece's dummy prefix ("▁" before the text)


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


def _loaded_pre_tokenizer(folder: Path, tj: dict):
    """The pre-tokenizer transformers really applies: it may replace tokenizer.json's by the model type's own
    (transformers 5 loads a qwen2 folder with Qwen2Tokenizer, which splits with Qwen2's regex whatever the file
    says). Falls back to tokenizer.json's when the tokenizer does not load."""
    try:
        backend = models.tokenizer_in(folder).backend_tokenizer
        return json.loads(backend.to_str()).get("pre_tokenizer")
    except Exception:
        return tj.get("pre_tokenizer")


def read_vocab(folder: Path, n_vocab: int) -> Vocab:
    """Tokens (padded to the model's vocabulary size), types and merges from tokenizer.json."""
    import gguf

    where = folder / "tokenizer.json"
    sentencepiece = not where.exists() or _is_sentencepiece(read_json(where, "tokenizer"))
    if (folder / "tokenizer.model").exists() and sentencepiece:
        return read_sentencepiece(folder, n_vocab)
    tj = read_json(where, "tokenizer")
    model = tj.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return read_byte_fallback_bpe(folder, tj, n_vocab)
    if model.get("type") != "BPE":
        kind = f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        raise UserError(f"tokenizer {where}: a {kind} tokenizer exports to GGUF only from its SentencePiece model "
                        f"(tokenizer.model, which {folder} lacks); otherwise BPE only (byte-level, or with byte "
                        "fallback as SentencePiece's)")
    normalizer = tj.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise UserError(f"tokenizer {where}: normalizer {normalizer.get('type')} has no llama.cpp equivalent")
    pre = _pre_tokenizer({"pre_tokenizer": _loaded_pre_tokenizer(folder, tj)}, where)
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


def _is_sentencepiece(tj: dict) -> bool:
    model = tj.get("model") or {}
    return model.get("type") == "Unigram" or bool(model.get("byte_fallback"))


def _space_prefix(tj: dict, where: Path) -> bool:
    """Whether a SentencePiece-style tokenizer.json puts "▁" before the text (llama.cpp's add_space_prefix); UserError
    for normalizers and pre-tokenizers llama.cpp's SentencePiece tokenizer does not reproduce. It replaces every
    space by "▁" and nothing else."""
    def steps(node, key):
        node = node or {}
        return node.get(key, []) if node.get("type") == "Sequence" else ([node] if node else [])

    prefix = spaces_replaced = False
    for step in steps(tj.get("normalizer"), "normalizers"):
        if step.get("type") == "Prepend" and step.get("prepend") == "\u2581":
            prefix = True
        elif step.get("type") == "Replace" and step.get("pattern", {}).get("String") == " " \
                and step.get("content") == "\u2581":
            spaces_replaced = True
        else:
            raise UserError(f"tokenizer {where}: normalizer {step.get('type')} has no llama.cpp equivalent")
    for step in steps(tj.get("pre_tokenizer"), "pretokenizers"):
        if step.get("type") == "Split" and step.get("pattern", {}).get("String") == " " and spaces_replaced:
            continue  # Gemma's: a split at spaces after every space became "▁" splits nothing
        if step.get("type") != "Metaspace" or step.get("split", False) or step.get("replacement", "\u2581") != "\u2581":
            raise UserError(f"tokenizer {where}: pre-tokenizer {step.get('type')}"
                            f"{' (split)' if step.get('split') else ''} has no equivalent in llama.cpp's "
                            "SentencePiece tokenizer")
        scheme = step.get("prepend_scheme", "always" if step.get("add_prefix_space", True) else "never")
        prefix = prefix or scheme != "never"
    return prefix


def read_byte_fallback_bpe(folder: Path, tj: dict, n_vocab: int) -> Vocab:
    """A SentencePiece-style BPE with byte fallback given as tokenizer.json alone (a Llama 2 or Mistral folder saved
    by transformers 5), for llama.cpp's SentencePiece tokenizer: it merges the adjacent pair whose result has the
    highest score, so a token's score is minus the rank of the first merge that makes it (the order BPE merges
    in); <0xXX> tokens are byte tokens, the unknown token is unknown, added tokens control or user-defined."""
    import gguf

    where = folder / "tokenizer.json"
    add_prefix = _space_prefix(tj, where)
    model = tj["model"]
    vocab = model.get("vocab") or {}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    rank: dict[str, int] = {}
    for i, merge in enumerate(merges):
        rank.setdefault(merge.replace(" ", "", 1), i)
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    size = max(n_vocab, len(vocab), max(added, default=-1) + 1, max(vocab.values(), default=-1) + 1)
    tokens: list[str] = [f"[PAD{i}]" for i in range(size)]
    scores = [-1e9] * size
    types = [int(gguf.TokenType.UNUSED)] * size
    for token, i in vocab.items():
        tokens[i] = token
        scores[i] = -float(rank.get(token, len(merges) + i))
        if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
            types[i] = int(gguf.TokenType.BYTE)
        elif token == model.get("unk_token"):
            types[i] = int(gguf.TokenType.UNKNOWN)
        else:
            types[i] = int(gguf.TokenType.NORMAL)
    for i, a in added.items():
        tokens[i] = a["content"]
        if types[i] in (int(gguf.TokenType.NORMAL), int(gguf.TokenType.UNUSED)):
            types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    return Vocab(tokens, types, [], "default", added, model="llama", scores=scores, add_space_prefix=add_prefix)


def read_sentencepiece(folder: Path, n_vocab: int) -> Vocab:
    """Pieces, scores and types from a SentencePiece model (tokenizer.model: BPE or unigram, byte fallback), as
    llama.cpp's SentencePiece tokenizer (tokenizer.ggml.model = llama) reads them; tokens added on top of it
    (tokenizer.json's added_tokens) follow, padded to the model's vocabulary size."""
    import gguf

    try:
        from sentencepiece import sentencepiece_model_pb2
    except ImportError:
        raise UserError(f"{folder} has a SentencePiece tokenizer; reading it needs: pip install 'memcli[sentencepiece]'"
                        ) from None
    where = folder / "tokenizer.model"
    proto = sentencepiece_model_pb2.ModelProto()
    try:
        proto.ParseFromString(where.read_bytes())
    except Exception as e:
        raise UserError(f"tokenizer {where} is not a SentencePiece model ({e})") from None
    if not proto.pieces:
        raise UserError(f"tokenizer {where} is not a SentencePiece model (no pieces)")
    kinds = {1: gguf.TokenType.NORMAL, 2: gguf.TokenType.UNKNOWN, 3: gguf.TokenType.CONTROL,
             4: gguf.TokenType.USER_DEFINED, 5: gguf.TokenType.UNUSED, 6: gguf.TokenType.BYTE}
    tokens = [p.piece for p in proto.pieces]
    scores = [float(p.score) for p in proto.pieces]
    types = [int(kinds.get(int(p.type), gguf.TokenType.NORMAL)) for p in proto.pieces]
    tj = read_json(folder / "tokenizer.json", "tokenizer") if (folder / "tokenizer.json").exists() else {}
    added = {int(a["id"]): a for a in tj.get("added_tokens", [])}
    size = max(n_vocab, len(tokens), max(added, default=-1) + 1)
    for i in range(len(tokens), size):
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    for i, a in added.items():
        if i >= len(proto.pieces) or tokens[i] != a["content"]:
            tokens[i] = a["content"]
            types[i] = int(gguf.TokenType.CONTROL if a.get("special") else gguf.TokenType.USER_DEFINED)
    return Vocab(tokens, types, [], "default", added, model="llama", scores=scores,
                 add_space_prefix=bool(proto.normalizer_spec.add_dummy_prefix))


def read_base(folder: str | os.PathLike) -> tuple[HFModel, Vocab, list[tuple[str, str]]]:
    """Every check GGUF export makes of a base model, in one place (export_base, the fingerprint an adapter
    records, and the `exportable` pre-check all go through it): architecture, activation and RoPE scaling
    (read_hf), tokenizer kind, normalizer and pre-tokenizer (read_vocab), a llama.cpp name for every tensor.
    Reads config.json, tokenizer.json and the safetensors headers, no weights. UserError naming the cause."""
    hf = read_hf(folder)
    vocab = read_vocab(hf.folder, int(hf.config.get("vocab_size") or 0))
    return hf, vocab, hf_tensors(hf)
