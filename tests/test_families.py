"""Every supported family through train, export and verify, against llama.cpp's own converters (issue 10).

Per case of tests/families.py (a seeded random 2-layer model: llama with default, linear, llama3 and yarn RoPE,
mistral, qwen2, qwen3 with head_dim != hidden/heads; tied and untied; GQA):
- `memcli export-base` and llama.cpp's `convert_hf_to_gguf.py` give the same logits in llama.cpp, both match torch,
  and memcli's fingerprint accepts the converter's base;
- `memcli train` writes adapter/ and adapter.gguf; on the converter's F32 base (KV cache F32) llama.cpp with
  memcli's adapter matches torch + PEFT within 1e-3 per-token log-probability, and so does the adapter that
  llama.cpp's `convert_lora_to_gguf.py` makes from the same PEFT folder; a base of another case is refused;
- `memcli verify` verdicts equal real greedy generation in llama.cpp.
The slow cases (families.MORE_CASES): gemma3_text, phi3 (Phi-3-mini style SentencePiece; Phi-4-mini style partial
rotary, LongRoPE and byte-level BPE) and a Llama 2 folder whose tokenizer is tokenizer.json alone.
The references are llama.cpp's converters and torch, never memcli's own output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from families import BY_NAME, CASES, MORE_CASES, Reference, build_model
from helpers import run_cli

from memcli.commands.bench.agree import llama_logits
from memcli.core import models
from memcli.core.errors import UserError
from memcli.core.gguf_reader import read_gguf
from memcli.gguf.adapter import check_pair
from memcli.gguf.base import export_base
from memcli.gguf.fingerprint import gguf_fingerprint, hf_fingerprint

pytestmark = pytest.mark.slow  # every family against llama.cpp's converters (minutes)

IDS = [c.name for c in CASES]
# Issue 22's families (Gemma 3, Phi-3, Phi-4-mini, a tokenizer.json-only Llama 2): built as a second group, on
# first use (`-k "gemma3 or phi3 or phi4 or tjson"` builds these alone).
PARAMS = IDS + [c.name for c in MORE_CASES]
GROUPS = {c.name: group for group in (CASES, MORE_CASES) for c in group}
# Where llama.cpp's converter cannot take the case: the qwen2 test model carries SmolLM2's vocabulary, which
# transformers splits with Qwen2's regex for a qwen2 folder: a (vocabulary, pre-tokenizer) pair the converter does
# not know by its hash, so it refuses it ("BPE pre-tokenizer was not recognized"). memcli's own base stands in.
NO_CONVERTER = {"qwen2", "llama-bpe3", "mistral-gpt2"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def reference() -> Reference:
    return Reference.fetch()


@pytest.fixture(scope="session")
def family_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


_BUILT: dict = {}


def built(name: str, root: Path, reference: Reference, pb8: Path) -> dict:
    """The case's HF folder, memcli's base, the converter's base and adapter, a trained run. The first call builds
    every case, and runs llama.cpp's converters for all of them in one subprocess (torch imported once)."""
    if name not in _BUILT:
        build_all(root, reference, pb8, GROUPS[name])
    return _BUILT[name]


def build_all(root: Path, reference: Reference, pb8: Path, cases) -> None:
    from memcli.training.config import TrainConfig
    from memcli.training.trainer import Trainer

    jobs, built_cases = [], {}
    for case in cases:
        where = root / case.name
        where.mkdir()
        folder = build_model(case, where / "hf")
        ours = where / "memcli.f32.gguf"
        export_base(folder, ours)
        corpus = pb8  # values without a leading space: SentencePiece cases too (memcli.core.corpus.tokenize)
        run = where / "run"
        Trainer(TrainConfig(corpus=str(corpus), model=str(folder), modules=["all-linear"], layers=[0, 1], rank=4,
                            max_steps=40, lr=0.03, dropout=0.0, check_every=1000, device="cpu", dtype="float32"),
                run, log=lambda m: None).run()
        item = {"case": case, "folder": folder, "ours": ours, "theirs": ours, "run": run, "corpus": corpus,
                "converter_adapter": None}
        if case.name not in NO_CONVERTER:
            item["theirs"], item["converter_adapter"] = where / "converter.f32.gguf", run / "converter-adapter.gguf"
            jobs += [Reference.base_job(folder, item["theirs"]),
                     Reference.lora_job(run / "adapter", folder, item["converter_adapter"])]
        built_cases[case.name] = item
    reference.run_many(jobs)
    _BUILT.update(built_cases)


@pytest.fixture(params=PARAMS)
def family(request, family_root, reference, pb8):
    return built(request.param, family_root, reference, pb8)


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def token_logprobs(logits, seq) -> np.ndarray:
    return log_softmax(logits)[np.arange(len(seq) - 1), seq[1:]]


def max_diff(llama, torch_lp, seqs) -> float:
    return max(float(np.abs(token_logprobs(a, s) - b).max()) for a, b, s in zip(llama, torch_lp, seqs))


def sequences(folder: Path, corpus: Path) -> list[list[int]]:
    """The corpus entries as the model's tokenizer splits them (key with BOS where it uses one, then the value),
    plus a longer text that reaches positions where RoPE scaling matters."""
    tok = models.load_tokenizer(models.resolve(str(folder)))
    rows = [json.loads(line) for line in corpus.read_text().splitlines()]
    seqs = [tok(r["key"] if "key" in r else r["query"]).input_ids +
            tok(r.get("value", r.get("target")), add_special_tokens=False).input_ids for r in rows[:4]]
    seqs.append(tok("The quick brown fox jumps over the lazy dog; 0123456789, naïve café. " * 3).input_ids)
    return seqs


def torch_logprobs(folder: Path, seqs, adapter: Path | None = None) -> list[np.ndarray]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        return [token_logprobs(model(torch.tensor([s])).logits[0].numpy(), s) for s in seqs]


# ----------------------------------------------------------------------------- base models


def test_export_base_equals_llama_cpp_converter(family, pb8):
    folder, ours, theirs = family["folder"], family["ours"], family["theirs"]
    seqs = sequences(folder, family["corpus"])
    expected = torch_logprobs(folder, seqs)
    ours_logits = llama_logits(ours, seqs, n_threads=1)
    theirs_logits = llama_logits(theirs, seqs, n_threads=1)
    measured = (max_diff(ours_logits, expected, seqs), max_diff(theirs_logits, expected, seqs),
                max(float(np.abs(a - b).max()) for a, b in zip(ours_logits, theirs_logits)))
    print(f"\nMEASURED base {family['case'].name}: memcli-torch {measured[0]:.2e} converter-torch "
          f"{measured[1]:.2e} memcli-converter logits {measured[2]:.2e}")
    assert measured[0] < family["case"].tol and measured[1] < family["case"].tol
    assert measured[2] < 1e-4
    # the fingerprint recognises the converter's base as the model trained on ...
    assert gguf_fingerprint(theirs) == hf_fingerprint(folder) == gguf_fingerprint(ours)
    # ... and both files say the same about it
    a, b = read_gguf(ours), read_gguf(theirs)
    arch = a.get("general.architecture")
    assert arch == b.get("general.architecture") == {"llama": "llama", "mistral": "llama", "qwen2": "qwen2",
                                                     "qwen3": "qwen3", "gemma3_text": "gemma3",
                                                     "phi3": "phi3"}[family["case"].model_type]
    for key in ("rope.scaling.type", "rope.scaling.factor", "rope.scaling.original_context_length",
                "rope.dimension_count", "attention.key_length", "tokenizer"):
        if key == "tokenizer":
            differs = family["case"].converter_vocab_differs
            # "specials": the converter types and scores the special and padding tokens its own way; compare the
            # pieces' (NORMAL and BYTE tokens) only
            pieces = [i for i, t in enumerate(b.get("tokenizer.ggml.token_type")) if int(t) in (1, 6)]
            for k in ("model", "pre", "tokens", "token_type", "scores", "merges", "add_space_prefix"):
                x, y = a.get(f"tokenizer.ggml.{k}"), b.get(f"tokenizer.ggml.{k}")
                if "specials" in differs and k in ("token_type", "scores"):
                    x, y = [x[i] for i in pieces], [y[i] for i in pieces]
                if y is not None and k not in differs:
                    assert (list(x) == list(y)) if hasattr(y, "__len__") and not isinstance(y, (str, bytes)) \
                        else x == y, k
            continue
        if b.get(f"{arch}.{key}") is not None:
            assert a.get(f"{arch}.{key}") == b.get(f"{arch}.{key}"), key
    assert set(a.tensors) == set(b.tensors)


def test_tokenisation_equals_transformers(family):
    """llama.cpp with memcli's base tokenises as transformers does the model's folder (the check verify makes)."""
    from llama_cpp import Llama

    tok = models.load_tokenizer(models.resolve(str(family["folder"])))
    llm = Llama(model_path=str(family["ours"]), vocab_only=True, verbose=False)
    rows = [json.loads(line) for line in family["corpus"].read_text().splitlines()]
    texts = [r["query"] + r["target"] for r in rows]
    texts += ["digits 123 4567  17 spaces  here\n\n x", "it's they'll I'M", "naïve café ÄÖÜ 日本語", "a\r\n\tb"]
    if not family["case"].tokenizer.startswith("spm"):
        # SentencePiece: llama.cpp puts its "▁" before any text, transformers 5 not before one that starts with
        # a space (nor after a special token): not a difference of the GGUF (llama.cpp's converter writes the same)
        texts += ["  leading spaces", "<|im_start|>user\nhi<|im_end|>"]
    try:
        for text in texts:
            assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
                tok(text, add_special_tokens=False).input_ids, text
            assert llm.tokenize(text.encode(), add_bos=True, special=True) == tok(text).input_ids, text
    finally:
        llm.close()


def test_tokenizer_json_only_scores_are_merge_ranks(family_root, reference, pb8):
    """A SentencePiece-style BPE given as tokenizer.json alone: llama.cpp's SentencePiece tokenizer merges by score,
    so memcli scores each token by the rank of the merge that makes it; llama.cpp's converter scores every token
    -1000, and its base then splits some text otherwise than transformers does."""
    from llama_cpp import Llama

    item = built("llama-tjson", family_root, reference, pb8)
    tok = models.load_tokenizer(models.resolve(str(item["folder"])))
    texts = [json.loads(line)["query"] + json.loads(line)["target"] for line in item["corpus"].read_text().splitlines()]
    texts += ["The quick brown fox jumps over the lazy dog; 0123456789, naïve café.", "digits 123 4567 here"]
    agree = {}
    for which in ("ours", "theirs"):
        llm = Llama(model_path=str(item[which]), vocab_only=True, verbose=False)
        try:
            agree[which] = [llm.tokenize(t.encode(), add_bos=False) == tok(t, add_special_tokens=False).input_ids
                            for t in texts]
        finally:
            llm.close()
    assert all(agree["ours"])
    assert not all(agree["theirs"])


def test_gemma_tokenizer_json_only(family_root, reference, pb8, tmp_path):
    """A Gemma 3 folder saved by transformers 5 (tokenizer.json, no tokenizer.model) exports a base that tokenises as
    transformers does and as the base exported from tokenizer.model."""
    import shutil

    from llama_cpp import Llama
    from transformers import AutoTokenizer

    item = built("gemma3", family_root, reference, pb8)
    folder = tmp_path / "gemma3-tokenizer-json"
    shutil.copytree(item["folder"], folder)
    AutoTokenizer.from_pretrained(folder).save_pretrained(folder)
    (folder / "tokenizer.model").unlink(missing_ok=True)
    export_base(folder, tmp_path / "base.gguf")
    tok = AutoTokenizer.from_pretrained(folder)
    texts = [json.loads(line)["query"] + json.loads(line)["target"] for line in item["corpus"].read_text().splitlines()]
    texts += ["The quick brown fox jumps over the lazy dog; 0123456789, naïve café.", "  two  spaces\n\nx", "日本語"]
    ours, before = (Llama(model_path=str(p), vocab_only=True, verbose=False) for p in (tmp_path / "base.gguf",
                                                                                       item["ours"]))
    try:
        for text in texts:
            ids = ours.tokenize(text.encode(), add_bos=True, special=True)
            assert ids == tok(text).input_ids == before.tokenize(text.encode(), add_bos=True, special=True), text
    finally:
        ours.close()
        before.close()


def test_phi3_module_names(family_root, reference, pb8, tmp_path):
    """Phi-3's LoRA placement names are its fused projections: the default is the middle layer's gate_up_proj and
    down_proj, all-linear adds qkv_proj and o_proj, and a Llama name is refused with the model's list."""
    from memcli.training.lora import resolve_placement

    model, _ = models.load_model(models.resolve(str(built("phi3", family_root, reference, pb8)["folder"])))
    assert resolve_placement(model, None, None) == ([1], ["gate_up_proj", "down_proj"])
    assert sorted(resolve_placement(model, [0], "all-linear")[1]) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    with pytest.raises(UserError, match="unknown module 'q_proj'.*gate_up_proj, o_proj, qkv_proj"):
        resolve_placement(model, [0], ["q_proj"])


# ----------------------------------------------------------------------------- adapters


def test_trained_adapter_on_the_converter_base_matches_torch(family, pb8, reference):
    run, folder, theirs = family["run"], family["folder"], family["theirs"]
    assert (run / "adapter" / "adapter_config.json").exists() and (run / "adapter.gguf").exists()
    seqs = sequences(folder, family["corpus"])
    adapted = torch_logprobs(folder, seqs, run / "adapter")
    plain = torch_logprobs(folder, seqs)
    assert max(float(np.abs(a - b).max()) for a, b in zip(adapted, plain)) > 0.05  # the adapter does something
    check_pair(run / "adapter.gguf", theirs)
    ours = llama_logits(theirs, seqs, run / "adapter.gguf", n_threads=1)
    gap = max_diff(ours, adapted, seqs)
    print(f"\nMEASURED adapter {family['case'].name}: memcli adapter on the converter base vs torch+PEFT {gap:.2e}")
    assert gap < family["case"].tol
    if family["case"].name in NO_CONVERTER:
        return
    # llama.cpp's own adapter converter, from the same PEFT folder: the same logits
    theirs_adapter = llama_logits(theirs, seqs, family["converter_adapter"], n_threads=1)
    gaps = (max_diff(theirs_adapter, adapted, seqs),
            max(float(np.abs(a - b).max()) for a, b in zip(ours, theirs_adapter)))
    print(f"MEASURED adapter {family['case'].name}: converter adapter vs torch+PEFT {gaps[0]:.2e}, "
          f"memcli vs converter adapter logits {gaps[1]:.2e}")
    assert gaps[0] < family["case"].tol and gaps[1] < 1e-3


def test_a_base_of_another_model_is_refused(family_root, reference, pb8):
    a = built("llama", family_root, reference, pb8)
    b = built("mistral", family_root, reference, pb8)  # same structure, other weights
    c = built("qwen3", family_root, reference, pb8)
    with pytest.raises(UserError, match="was trained for"):
        check_pair(a["run"] / "adapter.gguf", b["theirs"])
    with pytest.raises(UserError, match="was trained for"):
        check_pair(a["run"] / "adapter.gguf", c["theirs"])
    check_pair(b["run"] / "adapter.gguf", b["theirs"])


def quantise(src: Path, out: Path, ftype: str) -> Path:
    """llama.cpp's own quantiser (llama_model_quantize) on an F32 base."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    params.nthread = 1
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(out).encode(), ctypes.byref(params)) == 0
    return out


def same_as_converter_adapter(base: Path, ours: Path, theirs: Path, peft: Path, folder: Path, seqs):
    """On a quantised base, memcli's adapter and the one llama.cpp's converter made from the same PEFT folder
    (`theirs`) give the same logits (both see the same quantised base); returns the gap to torch + PEFT, which the
    quantised base widens."""
    a, b = llama_logits(base, seqs, ours, n_threads=1), llama_logits(base, seqs, theirs, n_threads=1)
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) < 1e-3
    return max_diff(a, torch_logprobs(folder, seqs, peft), seqs)


def test_quantised_bases_pair(family_root, reference, pb8, tmp_path):
    """Quantised bases from llama.cpp's tools pair with memcli's adapter, which gives there the logits of llama.cpp's
    own converted adapter: Q8_0 from the converter (qwen3), and
    Q4_K_M from llama.cpp's quantiser on a llama whose rows are whole 256-blocks (hidden 256), so that the Q4_K
    tensors are really Q4_K. The fingerprint (structure and F32 norms) is the same across quantisations."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from memcli.gguf.adapter import export_adapter

    qwen3 = built("qwen3", family_root, reference, pb8)
    q8 = tmp_path / "q8_0.gguf"
    folder = build_model(BY_NAME["llama"], tmp_path / "wide", hidden_size=256, intermediate_size=256)
    f32 = export_base(folder, tmp_path / "wide.f32.gguf")["out"]
    q4 = quantise(f32, tmp_path / "wide.q4_k_m.gguf", "Q4_K_M")
    assert read_gguf(q4).tensors["blk.0.attn_q.weight"].type == 12  # Q4_K
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(folder),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    model.save_pretrained(tmp_path / "wide-peft")
    export_adapter(tmp_path / "wide-peft", tmp_path / "wide-adapter.gguf")
    reference.run_many([Reference.base_job(qwen3["folder"], q8, "q8_0"),
                        Reference.lora_job(tmp_path / "wide-peft", folder, tmp_path / "wide-converter.gguf")])

    assert read_gguf(q8).tensors["blk.0.ffn_up.weight"].type == 8  # Q8_0
    check_pair(qwen3["run"] / "adapter.gguf", q8)
    seqs = sequences(qwen3["folder"], qwen3["corpus"])
    assert same_as_converter_adapter(q8, qwen3["run"] / "adapter.gguf", qwen3["converter_adapter"],
                                     qwen3["run"] / "adapter", qwen3["folder"], seqs) < 1.0  # measured: 0.51

    check_pair(tmp_path / "wide-adapter.gguf", q4)
    with pytest.raises(UserError, match="was trained for"):
        check_pair(tmp_path / "wide-adapter.gguf", q8)
    # 4-bit weights of a random model are far from torch (measured: 10.9), so only the converter's adapter is
    # the reference here
    same_as_converter_adapter(q4, tmp_path / "wide-adapter.gguf", tmp_path / "wide-converter.gguf",
                              tmp_path / "wide-peft", folder, seqs)


# ----------------------------------------------------------------------------- verify against generation


def greedy(base: Path, adapter: Path, prompt: list[int], n: int) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(base), lora_path=str(adapter), n_ctx=128, n_threads=1, n_threads_batch=1,
                logits_all=True, type_k=0, type_v=0, verbose=False)
    try:
        out, seq = [], list(prompt)
        llm.eval(seq)
        for _ in range(n):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out.append(token)
            llm.eval([token])
        return out
    finally:
        llm.close()


def test_verify_verdicts_equal_greedy_generation(family, pb8, tmp_path):
    from memcli.core.corpus import load_examples
    from memcli.core.datagen import generate_phonebook

    run, folder = family["run"], family["folder"]
    corpus = tmp_path / "pb8+4.jsonl"  # the 8 trained entries and 4 the adapter never saw
    unseen = [json.dumps(r) for r in generate_phonebook(4, seed=1)]
    corpus.write_text(family["corpus"].read_text() + "".join(u + "\n" for u in unseen))
    result = run_cli("verify", corpus, "--lora", run, "--out", tmp_path / "v", "--min-exact", "0", "--threads", "1",
                     "--kv-type", "f32")
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "v" / "report.json").read_text())
    assert report["tokenizer_check"]["mismatches"] == 0  # llama.cpp tokenises every entry as transformers does
    rows = [json.loads(line) for line in (tmp_path / "v" / "entries.jsonl").read_text().splitlines()]
    examples = load_examples(corpus, models.load_tokenizer(models.resolve(str(folder))))
    from memcli.gguf.base import base_gguf

    base = base_gguf(models.resolve(str(folder)))
    assert len(rows) == len(examples) == 12
    for row, ex in zip(rows, examples):
        generated = greedy(base, run / "adapter.gguf", list(ex.prompt_ids), len(ex.target_ids))
        target = list(ex.target_ids)
        first_divergence = next((i for i, (g, t) in enumerate(zip(generated, target)) if g != t), None)
        assert row["exact"] == (generated == target), (row, generated, target)
        if not row["exact"]:  # the first wrong token of generation is the verdict's first failure
            assert row["first_failure"] == first_divergence, (row, generated, target)
    exact = sum(r["exact"] for r in rows)
    assert 0 < exact < 12, exact  # both verdicts are tested
