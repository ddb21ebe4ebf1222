"""Small random models of every supported family, and llama.cpp's own converters as the independent reference.

`build_model(case, folder)` writes a seeded 2-layer HF model folder (hidden 64, GQA 4/2) of the case's
architecture, RoPE kind, embedding tying and tokenizer. `Reference` runs llama.cpp's `convert_hf_to_gguf.py` and
`convert_lora_to_gguf.py` from the llama-cpp-python sdist (the version installed here), fetched once with pip into
$MEMCLI_CACHE/reference and run in a subprocess with the sdist's gguf-py on PYTHONPATH. Nothing of the converters is
copied into memcli.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import torch

from memcli.core import models


@dataclass(frozen=True)
class Case:
    name: str
    model_type: str  # HF model_type
    rope: dict | None = None  # rope_scaling / rope_parameters beyond rope_theta
    tied: bool = False
    tokenizer: str = "smollm"  # smollm: SmolLM2's byte-level BPE (pre-tokenizer smollm); spm[-unigram]: SentencePiece
    extra: dict = field(default_factory=dict)
    permuted: bool = True  # llama.cpp's graph wants the q/k rows permuted (the Llama graph)
    tol: float = 1e-3  # llama.cpp vs torch, max |d log p|
    converter_vocab_differs: tuple = ()  # tokenizer.ggml keys llama.cpp's converter writes otherwise ("specials": the
    # types and scores of special and padding tokens)


CASES = [
    Case("llama", "llama"),
    Case("llama-linear", "llama", rope={"rope_type": "linear", "factor": 2.0}),
    Case("llama3-rope", "llama", tied=True, rope={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    Case("llama-yarn", "llama", rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    Case("mistral", "mistral"),
    Case("qwen2", "qwen2", tied=True, permuted=False),
    Case("qwen3", "qwen3", extra={"head_dim": 32}, permuted=False),
    Case("llama-spm", "llama", tokenizer="spm"),  # Llama 2 style: SentencePiece BPE with byte fallback
    Case("mistral-spm", "mistral", tied=True, tokenizer="spm"),  # Mistral v0.1 style
    Case("llama-unigram", "llama", tokenizer="spm-unigram"),  # SentencePiece unigram with byte fallback
    Case("llama-bpe3", "llama", tokenizer="llama3"),  # Llama 3's split regex, then byte-level BPE
    Case("mistral-gpt2", "mistral", tokenizer="gpt2"),  # GPT-2's byte-level pre-tokenizer alone
]
# The families of issue 22, in tests marked slow (tests/test_families.py builds them as a second group).
# gemma3: 6 layers (5 sliding, 1 global, as Gemma 3 270M/1B), a window of 8 tokens that the test sequences exceed,
# head_dim 32 != hidden/heads, q/k norms, tied embeddings, Gemma's SentencePiece (no dummy prefix).
# phi3: Phi-3-mini style (SentencePiece, fused qkv/gate_up); phi4-mini: partial rotary 0.75, LongRoPE, tied,
# byte-level BPE.
# llama-tjson: a Llama 2 folder as transformers 5 saves it, its SentencePiece BPE given as tokenizer.json alone.
MORE_CASES = [
    # llama.cpp's CPU GELU reads an F16 table (ggml-cpu/vec.h, GGML_GELU_FP16): 2e-3 from torch on this model
    Case("gemma3", "gemma3_text", tied=True, tokenizer="spm-gemma", permuted=False, tol=5e-3,
         converter_vocab_differs=("specials",),
         rope={"full_attention": {"rope_type": "default", "rope_theta": 1000000.0},
               "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}},
         extra={"num_hidden_layers": 6, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 8}),
    Case("phi3", "phi3", tokenizer="spm-phi3", permuted=False, extra={"sliding_window": 2047},
         converter_vocab_differs=("specials",)),  # Phi-3's converter: every added token CONTROL, score -1000
    Case("phi4-mini", "phi3", tied=True, tokenizer="phi4", permuted=False,
         rope={"rope_type": "longrope", "partial_rotary_factor": 0.75,
               "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5], "long_factor": [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]},
         extra={"original_max_position_embeddings": 512, "max_position_embeddings": 4096}),
    # the converter scores every token -1000 (gguf-py's LlamaHfVocab), memcli by merge rank (see test_families)
    Case("llama-tjson", "llama", tokenizer="spm-tjson", converter_vocab_differs=("scores",)),
]
# The pre-tokenizers of Llama 3's and GPT-2's tokenizer.json, as Hugging Face ships them; put on SmolLM2's
# vocabulary (llama.cpp's converter knows tokenizers by a hash of their output, so it refuses these pairs).
PRE_TOKENIZERS = {
    "llama3": {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|"
                                               "\\p{N}{1,3}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|"
                                               "\\s+(?!\\S)|\\s+"},
         "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
    "gpt2": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
}
BY_NAME = {c.name: c for c in CASES + MORE_CASES}


def smollm_tokenizer():
    return models.load_tokenizer(models.resolve("tiny"))


def sentencepiece_tokenizer(folder: Path, model_type: str = "bpe", gemma: bool = False):
    """A Llama 2 style tokenizer folder: a SentencePiece model (BPE or unigram) with byte fallback (<unk> 0, <s> 1,
    </s> 2), trained in a second on generated PhoneBook text, and tokenizer_config.json. `gemma`: Gemma's layout instead
    (<pad> 0, <eos> 1, <bos> 2, <unk> 3, no "▁" put before the text)."""
    import json

    import sentencepiece as spm
    from transformers import AutoTokenizer

    from memcli.core.datagen import generate_phonebook

    folder.mkdir(parents=True, exist_ok=True)
    text = folder / "text.txt"
    rows = generate_phonebook(300, seed=5)
    text.write_text("".join(f"{r['query']} {r['target']}\n" for r in rows) +
                    "The quick brown fox jumps over the lazy dog; naïve café, it's 0123456789.\n" * 5)
    ids = (dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>",
                add_dummy_prefix=False) if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(folder / "sp"), vocab_size=400,
                                   model_type=model_type, byte_fallback=True, character_coverage=1.0, minloglevel=2,
                                   num_threads=1, normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   **ids)  # as Llama 2 (Gemma)
    (folder / "sp.model").rename(folder / "tokenizer.model")
    for leftover in (text, folder / "sp.vocab"):
        leftover.unlink()
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer", "bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>",
        "pad_token": "<pad>", "add_bos_token": True, "add_eos_token": False} if gemma else {
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False}))
    return AutoTokenizer.from_pretrained(folder)


def build_model(case: Case, folder: Path, **sizes) -> Path:
    """A seeded random model of the case (2 layers, hidden 64, 4 query / 2 key-value heads) saved with its
    tokenizer to `folder`."""
    import transformers

    spm_kind = case.tokenizer.partition("-")[2]
    spm_type = "unigram" if spm_kind == "unigram" else "bpe"
    tokenizer = (sentencepiece_tokenizer(folder, spm_type, gemma=spm_kind == "gemma")
                 if case.tokenizer.startswith("spm") else smollm_tokenizer())
    if spm_kind == "phi3":  # Phi-3 adds <|endoftext|> after the SentencePiece pieces (llama.cpp's vocabulary code for
        # a model named phi3 looks it up)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<|endoftext|>"]})
        tokenizer.save_pretrained(folder)
    config_cls = getattr(transformers, {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config",
                                        "qwen3": "Qwen3Config", "gemma3_text": "Gemma3TextConfig",
                                        "phi3": "Phi3Config"}[case.model_type])
    rope = case.rope if case.rope and "full_attention" in case.rope else \
        {"rope_theta": 10000.0, "rope_type": "default", **(case.rope or {})}
    shape = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "initializer_range": 0.3, "max_position_embeddings": 512, **case.extra, **sizes}
    config = config_cls(vocab_size=len(tokenizer), tie_word_embeddings=case.tied, rope_parameters=rope,
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **shape)
    if case.model_type in ("gemma3_text", "phi3"):  # their configs default to the real model's padding id
        config.pad_token_id = tokenizer.pad_token_id
    state = torch.random.get_rng_state()
    torch.manual_seed(zlib.crc32(case.name.encode()))  # every case its own weights
    try:
        model = transformers.AutoModelForCausalLM.from_config(config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("norm.weight"):  # norms that are not all ones, so that a wrong pairing shows
                    p.uniform_(0.5, 1.5)
                    if case.model_type == "gemma3_text":  # Gemma 3 stores scale - 1: the same scales
                        p.sub_(1.0)
                elif name.endswith(".bias"):  # qwen2's q/k/v biases count
                    p.normal_(0, 0.5)
    finally:
        torch.random.set_rng_state(state)
    model.save_pretrained(folder)
    if case.tokenizer == "spm-tjson":  # as transformers 5 saves a Llama 2 tokenizer: tokenizer.json, no tokenizer.model
        (folder / "tokenizer.model").unlink()
        tokenizer.save_pretrained(folder)
        assert not (folder / "tokenizer.model").exists()
    elif not case.tokenizer.startswith("spm"):  # the SentencePiece folder holds tokenizer.model and its config already
        tokenizer.save_pretrained(folder)
    if case.tokenizer == "phi4":  # Phi-4-mini's tokenizer_config names GPT2Tokenizer (llama.cpp's converter reads it)
        config_path = folder / "tokenizer_config.json"
        config_path.write_text(json.dumps({**json.loads(config_path.read_text()), "tokenizer_class": "GPT2Tokenizer"}))
    if case.tokenizer in PRE_TOKENIZERS:
        spec = json.loads((folder / "tokenizer.json").read_text())
        spec["pre_tokenizer"] = PRE_TOKENIZERS[case.tokenizer]
        (folder / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    return folder


# ----------------------------------------------------------------------------- llama.cpp's converters


class Reference:
    """llama.cpp's converter scripts from the llama-cpp-python sdist of the installed version."""

    def __init__(self, root: Path):
        self.root = root

    @classmethod
    def fetch(cls) -> "Reference":
        """The sdist's llama.cpp folder, downloaded with pip once into $MEMCLI_CACHE/reference."""
        import llama_cpp
        import pytest

        version = llama_cpp.__version__
        target = models.cache_dir() / "reference" / f"llama_cpp_python-{version}"
        root = target / "vendor" / "llama.cpp"
        if (root / "convert_hf_to_gguf.py").exists():
            return cls(root)
        download = target.parent / f"download-{os.getpid()}"
        download.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
                               f"llama-cpp-python=={version}", "-d", str(download), "-q"],
                              capture_output=True, text=True)
        sdists = list(download.glob("llama_cpp_python-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            pytest.skip(f"offline? these tests download the llama-cpp-python {version} sdist at test time (once, "
                        f"with pip, into {target.parent}: it carries llama.cpp's converters), and pip could not "
                        f"({done.stderr.strip().splitlines()[-1:]}); run them once with a package index, or "
                        f"unpack the sdist's vendor/llama.cpp to {root}")
        prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
        wanted = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "gguf-py/", "conversion/")
        staging = target.parent / f"staging-{os.getpid()}"
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers()
                       if m.name.startswith(prefix) and m.name[len(prefix):].startswith(wanted)]
            tar.extractall(staging, members=members, filter="data")
        try:
            os.replace(staging / f"llama_cpp_python-{version}", target)
        except OSError:  # another process finished first
            pass
        for f in sdists:
            f.unlink()
        download.rmdir()
        return cls(root)

    def run(self, script: str, *args) -> None:
        self.run_many([(script, *args)])

    def run_many(self, jobs) -> None:
        """Run converter scripts (script, *args) one after the other in one subprocess, as `python script args`
        would (runpy, as __main__), so that torch and the converter are imported once for all of them."""
        driver = ("import json, runpy, sys\n"
                  "for script, *args in json.loads(sys.argv[1]):\n"
                  "    sys.argv = [script, *args]\n"
                  "    try:\n"
                  "        runpy.run_path(script, run_name='__main__')\n"
                  "    except SystemExit as e:\n"
                  "        if e.code not in (None, 0):\n"
                  "            raise\n")
        jobs = [[str(self.root / script), *map(str, args)] for script, *args in jobs]
        env = dict(os.environ, PYTHONPATH=str(self.root / "gguf-py"), NO_LOCAL_GGUF="1")
        done = subprocess.run([sys.executable, "-c", driver, json.dumps(jobs)], capture_output=True, text=True,
                              env=env, timeout=1200, cwd=self.root)
        if done.returncode != 0:
            raise AssertionError(f"llama.cpp's converter failed:\n{done.stderr[-3000:]}")

    @staticmethod
    def base_job(hf_folder: Path, out: Path, outtype: str = "f32"):
        return ("convert_hf_to_gguf.py", hf_folder, "--outfile", out, "--outtype", outtype)

    @staticmethod
    def lora_job(peft_folder: Path, hf_folder: Path, out: Path):
        return ("convert_lora_to_gguf.py", peft_folder, "--base", hf_folder, "--outfile", out, "--outtype", "f32")

    def convert_base(self, hf_folder: Path, out: Path, outtype: str = "f32") -> Path:
        self.run(*self.base_job(hf_folder, out, outtype))
        return out

    def convert_lora(self, peft_folder: Path, hf_folder: Path, out: Path) -> Path:
        self.run(*self.lora_job(peft_folder, hf_folder, out))
        return out
