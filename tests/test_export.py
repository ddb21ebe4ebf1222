"""GGUF export: adapters and base models that llama.cpp (llama-cpp-python) runs exactly like torch + PEFT.

The exactness tests run the tiny model exported in F32, with llama.cpp's KV cache in F32, so the only differences
from torch are float32 summation order (~1e-4 in log-probabilities). llama.cpp and torch both run on one thread:
on a shared, busy machine two spinning threads each made these tests 10-20x slower.
"""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PARTLY_TRAINED, SEVEN, lora_target, make_adapter, max_diff, phonebook_ids, run_cli

from memcli.commands.bench.agree import llama_logits
from memcli.core import gguf_reader as gguf_reader
from memcli.core import models
from memcli.core.errors import UserError
from memcli.core.gguf_reader import read_gguf
from memcli.gguf.adapter import adapter_info, check_pair, export_adapter
from memcli.gguf.base import base_gguf, export_base
from memcli.gguf.fingerprint import gguf_fingerprint, hf_fingerprint
from memcli.gguf.hf import permute_rope_rows

DATA = Path(__file__).resolve().parent / "data"
TOL = 1e-3


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_spec():
    return models.resolve("tiny")


@pytest.fixture(scope="module")
def tiny_base(tiny_spec) -> Path:
    return base_gguf(tiny_spec)



@pytest.fixture(scope="module")
def seqs(tiny_tokenizer):
    return phonebook_ids(tiny_tokenizer)


@pytest.fixture(scope="module")
def plain_adapter(tmp_path_factory, tiny_spec, seqs):
    """LoRA (r=4, alpha=8) on all seven linear module types of layers 1 and 2 of tiny."""
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    adapted, plain = make_adapter(tiny_spec, folder, seqs, r=4, lora_alpha=8)
    return folder, adapted, plain


# ----------------------------------------------------------------------------- exactness against torch + PEFT


@pytest.mark.parametrize("permute", [True, False], ids=["permuted", "without-permutation"])
def test_adapter_matches_torch_and_needs_the_qk_permutation(plain_adapter, tiny_spec, tiny_base, seqs, tmp_path,
                                                          permute):
    folder, adapted, plain = plain_adapter
    out = tmp_path / "adapter.gguf"
    info = export_adapter(folder, out, base=tiny_spec, _permute=permute)
    assert info["tensors"] == 2 * 7 * 2 and info["ranks"] == [4]
    diff = max_diff(llama_logits(tiny_base, seqs, out, n_threads=1), adapted, seqs)
    if permute:
        assert diff < TOL
    else:  # loads fine, silently wrong
        assert diff > 100 * TOL


def test_scale_zero_is_the_base_and_scale_one_is_not(plain_adapter, tiny_spec, tiny_base, seqs, tmp_path):
    folder, adapted, plain = plain_adapter
    out = tmp_path / "adapter.gguf"
    export_adapter(folder, out, base=tiny_spec)
    at_zero = llama_logits(tiny_base, seqs, out, scale=0.0, n_threads=1)
    at_one = llama_logits(tiny_base, seqs, out, scale=1.0, n_threads=1)
    no_adapter = llama_logits(tiny_base, seqs, n_threads=1)
    assert max_diff(at_zero, plain, seqs) < TOL
    assert max(float(np.abs(a - b).max()) for a, b in zip(at_zero, no_adapter)) < 1e-5
    assert max_diff(at_one, plain, seqs) > 0.5  # the adapter does something ...
    assert max_diff(at_one, adapted, seqs) < TOL  # ... and exactly what PEFT does


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
@pytest.mark.parametrize("lora_kwargs", [
    dict(r=4, lora_alpha=3, use_rslora=True, rank_pattern={"q_proj": 2, "model.layers.2.mlp.down_proj": 6},
         alpha_pattern={"v_proj": 5}),
    dict(r=3, lora_alpha=7, rank_pattern={"k_proj": 5}, alpha_pattern={"up_proj": 1.5, "o_proj": 20}),
    dict(r=2, lora_alpha=2, use_rslora=True, target_modules=[*SEVEN, "lm_head"]),  # untied output layer
], ids=["rslora+patterns", "patterns", "lm_head-untied"])
def test_per_module_scaling_is_reproduced(tmp_path, tiny_spec, tiny_base, seqs, lora_kwargs):
    adapted, _ = make_adapter(tiny_spec, tmp_path / "peft", seqs, seed=1, std=0.2, **lora_kwargs)
    out = tmp_path / "adapter.gguf"
    info = export_adapter(tmp_path / "peft", out, base=tiny_spec)
    if "rank_pattern" in lora_kwargs:
        assert len(info["ranks"]) > 1 and info["alpha"] == 0.0  # llama.cpp's "no alpha": scale = user scale
    assert max_diff(llama_logits(tiny_base, seqs, out, n_threads=1), adapted, seqs) < TOL


# ----------------------------------------------------------------------------- the files themselves


def rope_order(rows: int, heads: int) -> list[int]:
    """Written out here, independently of memcli: the source row of every row of llama.cpp's q/k layout. Inside
    each head of d rows, HF rotates row i with row i + d/2; llama.cpp's Llama graph rotates adjacent rows, so
    row 2i holds HF's row i and row 2i + 1 holds HF's row i + d/2."""
    d = rows // heads
    return [h * d + j for h in range(heads) for i in range(d // 2) for j in (i, i + d // 2)]


HF_TO_GGUF = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}


def expected_adapter_tensors(folder: Path, scale: float, n_head: int, n_head_kv: int) -> dict[str, np.ndarray]:
    """The tensors an exact llama.cpp adapter must hold, computed by hand from the PEFT safetensors: lora_a is
    PEFT's A; lora_b is PEFT's B times PEFT's scale (alpha / r), and for q_proj and k_proj its rows are in
    llama.cpp's RoPE layout (rope_order)."""
    from safetensors.torch import load_file

    expected = {}
    for key, tensor in load_file(folder / "adapter_model.safetensors").items():
        layer, module, part = re.fullmatch(
            r"base_model\.model\.model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])\.weight", key).groups()
        array = tensor.numpy()
        if part == "B":
            array = array * np.float32(scale)
            if module in ("q_proj", "k_proj"):
                array = array[rope_order(array.shape[0], n_head if module == "q_proj" else n_head_kv)]
        expected[f"blk.{layer}.{HF_TO_GGUF[module]}.weight.lora_{part.lower()}"] = array
    return expected


@pytest.mark.parametrize("outtype", ["f32", "f16", "q8_0"])
def test_adapter_reads_back(plain_adapter, tiny_spec, tmp_path, outtype):
    import gguf

    folder, _, _ = plain_adapter
    out = tmp_path / "adapter.gguf"
    info = export_adapter(folder, out, outtype=outtype, base=tiny_spec)
    expected = expected_adapter_tensors(folder, scale=8 / 4, n_head=4, n_head_kv=2)  # plain_adapter, tiny
    reader = gguf.GGUFReader(out)
    fields = {name: f.contents() for name, f in reader.fields.items()}
    assert fields["general.type"] == "adapter" and fields["adapter.type"] == "lora"
    assert fields["general.architecture"] == "llama"
    assert fields["adapter.lora.alpha"] == 4.0
    assert fields["memcli.model"] == "tiny"
    assert fields["memcli.base.fingerprint"] == hf_fingerprint(models.hf_dir(tiny_spec)).structure
    assert fields["memcli.lora.scale_folded"] is True
    assert {t.name for t in reader.tensors} == set(expected)
    assert "blk.1.attn_q.weight.lora_a" in expected and "blk.2.ffn_down.weight.lora_b" in expected
    for t in reader.tensors:
        want = expected[t.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        if outtype == "f32":
            np.testing.assert_array_equal(got, want, err_msg=t.name)
        elif outtype == "f16" or want.shape[-1] % 32:  # q8_0 keeps rows that are not whole blocks in F16
            np.testing.assert_array_equal(got, want.astype(np.float16).astype(np.float32), err_msg=t.name)
        else:
            np.testing.assert_allclose(got, want, atol=np.abs(want).max() / 127, err_msg=t.name)
    # memcli's own header reader agrees with gguf's
    meta = read_gguf(out)
    assert {n: list(t.shape) for n, t in meta.tensors.items()} == {t.name: list(t.shape) for t in reader.tensors}
    assert info["bytes"] == out.stat().st_size


def test_base_reads_back(tiny_spec, tiny_base):
    """Metadata and tensors of the exported base (memcli's header reader; gguf's GGUFReader takes seconds to walk a
    49k-token vocabulary, and the adapter test already checks the two readers agree)."""
    from safetensors.torch import load_file

    meta = read_gguf(tiny_base)
    config = json.loads((models.hf_dir(tiny_spec) / "config.json").read_text())
    tokenizer = json.loads((models.hf_dir(tiny_spec) / "tokenizer.json").read_text())
    assert meta.get("general.type") == "model" and meta.get("general.name") == "tiny"
    assert meta.get("llama.block_count") == config["num_hidden_layers"]
    assert meta.get("llama.embedding_length") == config["hidden_size"]
    assert meta.get("llama.feed_forward_length") == config["intermediate_size"]
    assert meta.get("llama.attention.head_count") == config["num_attention_heads"]
    assert meta.get("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert meta.get("llama.rope.freq_base") == config["rope_parameters"]["rope_theta"]
    assert meta.get("llama.attention.layer_norm_rms_epsilon") == np.float32(config["rms_norm_eps"])
    assert meta.get("tokenizer.ggml.model") == "gpt2" and meta.get("tokenizer.ggml.pre") == "smollm"
    assert meta.get("tokenizer.ggml.bos_token_id") == 1 and meta.get("tokenizer.ggml.eos_token_id") == 2
    assert meta.get("tokenizer.ggml.add_bos_token") is False
    assert "<|im_start|>" in meta.get("tokenizer.chat_template")
    tokens = [t.decode() for t in meta.get("tokenizer.ggml.tokens")]
    assert len(tokens) == config["vocab_size"] and tokens[1] == "<|im_start|>"
    assert all(tokens[i] == t for t, i in tokenizer["model"]["vocab"].items())
    merges = [m.decode() for m in meta.get("tokenizer.ggml.merges")]
    assert merges == [" ".join(m) if isinstance(m, list) else m for m in tokenizer["model"]["merges"]]
    assert list(meta.get("tokenizer.ggml.token_type")[:3]) == [3, 3, 3]  # special added tokens are CONTROL
    weights = load_file(models.hf_dir(tiny_spec) / "model.safetensors")
    assert len(meta.tensors) == 2 + 4 * 9 + 1  # embeddings, output norm, output; 9 per layer
    np.testing.assert_array_equal(meta.array("blk.0.ffn_up.weight"), weights["model.layers.0.mlp.up_proj.weight"])
    np.testing.assert_array_equal(meta.array("output.weight"), weights["lm_head.weight"])
    np.testing.assert_array_equal(meta.array("token_embd.weight"), weights["model.embed_tokens.weight"])
    for name, heads in (("q_proj", 4), ("k_proj", 2)):
        hf = weights[f"model.layers.3.self_attn.{name}.weight"].numpy()
        got = meta.array(f"blk.3.attn_{name[0]}.weight")
        np.testing.assert_array_equal(got, hf[rope_order(hf.shape[0], heads)])
        assert not np.array_equal(got, hf)
    np.testing.assert_array_equal(meta.array("blk.3.attn_v.weight"), weights["model.layers.3.self_attn.v_proj.weight"])


def test_permutation_pairs_the_rotated_halves():
    rows = np.arange(8)[:, None] * np.ones((1, 3))  # 1 head of 8: rows 0-3 pair with rows 4-7 in HF's layout
    np.testing.assert_array_equal(permute_rope_rows(rows, 1)[:, 0], [0, 4, 1, 5, 2, 6, 3, 7])
    np.testing.assert_array_equal(permute_rope_rows(np.arange(8), 2), [0, 2, 1, 3, 4, 6, 5, 7])
    np.testing.assert_array_equal(permute_rope_rows(np.arange(64), 4), rope_order(64, 4))


def test_tokenisation_equals_transformers(tiny_spec, tiny_base, tiny_tokenizer):
    """llama.cpp tokenises the shared data files exactly as the HF tokenizer of the exported folder does.
    special=True: HF matches added (special) tokens in text, llama.cpp does so when asked to parse them."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(tiny_base), vocab_only=True, verbose=False)
    texts = []
    for path in sorted(DATA.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            row = json.loads(line)
            texts += [row[k] for k in ("query", "target", "question", "matching") if k in row]
    texts += ["  17 spaces  before\n\n digits 123 4567", "<|im_start|>user\nhi<|im_end|>",
              "naïve café ÄÖÜ 日本語"]
    assert len(texts) > 50
    for text in texts:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == \
            tiny_tokenizer(text, add_special_tokens=False).input_ids, text[:60]
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == tiny_tokenizer(text).input_ids
    llm.close()


def test_fingerprints_match_across_formats(tiny_spec, tiny_base):
    assert hf_fingerprint(models.hf_dir(tiny_spec)) == gguf_fingerprint(tiny_base)
    smol = models.resolve("smollm2-135m")  # shipped Q4_1 GGUF vs the dequantised HF folder training uses
    assert hf_fingerprint(models.hf_dir(smol)) == gguf_fingerprint(smol.gguf_path)
    assert gguf_fingerprint(tiny_base).structure != gguf_fingerprint(smol.gguf_path).structure


def test_base_gguf_is_cached_and_named_models_resolve(tiny_spec, tiny_base):
    assert base_gguf(tiny_spec) == tiny_base and tiny_base.parent == models.cache_dir() / "gguf"
    smol = models.resolve("smollm2-135m")
    assert base_gguf(smol) == smol.gguf_path
    assert base_gguf(models.resolve(str(tiny_base))) == tiny_base


@pytest.mark.slow  # exports and loads three bases
def test_export_base_outtypes(tiny_spec, tmp_path):
    import gguf

    sizes = {}
    for outtype in ("f16", "q8_0"):
        out = tmp_path / f"base-{outtype}.gguf"
        export_base(models.hf_dir(tiny_spec), out, outtype)
        types = {t.name: t.type for t in read_gguf(out).tensors.values()}
        assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
        assert types["blk.0.ffn_up.weight"] == (gguf.GGMLQuantizationType.F16 if outtype == "f16"
                                                else gguf.GGMLQuantizationType.Q8_0)
        sizes[outtype] = out.stat().st_size
        assert gguf_fingerprint(out) == hf_fingerprint(models.hf_dir(tiny_spec))
    assert sizes["q8_0"] < sizes["f16"]


# ----------------------------------------------------------------------------- pairing and bad input


def test_run_folder_and_pairing(plain_adapter, tiny_spec, tiny_base, tmp_path):
    folder, _, _ = plain_adapter
    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    for f in folder.iterdir():
        (run / "adapter" / f.name).write_bytes(f.read_bytes())
    (run / "config.yaml").write_text("settings:\n  model: tiny\n")
    out = tmp_path / "adapter.gguf"
    assert export_adapter(run, out)["model"] == "tiny"
    assert check_pair(out, tiny_base)["model"] == "tiny"
    # without a run config, the base comes from the PEFT folder's base_model_name_or_path (the HF cache folder)
    assert export_adapter(folder, tmp_path / "b.gguf")["model"] == "tiny"
    smol = models.resolve("smollm2-135m").gguf_path
    with pytest.raises(UserError, match=r"adapter .* was trained for tiny, base .* is Smollm2"):
        check_pair(out, smol)


def test_another_base_with_the_same_structure_is_refused(plain_adapter, tiny_spec, tiny_base, tmp_path):
    """Same architecture, vocabulary and shapes, other norm weights: the fingerprint's weight part refuses it."""
    folder, _, _ = plain_adapter
    out = tmp_path / "adapter.gguf"
    export_adapter(folder, out, base=tiny_spec)
    other = tmp_path / "other.gguf"
    other.write_bytes(tiny_base.read_bytes())
    norm = read_gguf(other).tensors["output_norm.weight"]
    with open(other, "r+b") as f:  # a base with one norm weight changed
        f.seek(norm.offset)
        f.write(np.float32(0.5).tobytes())
    with pytest.raises(UserError, match="was trained for tiny"):
        check_pair(out, other)


def no_leftovers(folder: Path):
    return [p.name for p in folder.iterdir() if p.suffix in (".gguf", ".tmp")]


def test_bad_inputs(tmp_path, tiny_spec, plain_adapter):
    out = tmp_path / "out" / "adapter.gguf"
    (tmp_path / "out").mkdir()
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="not a PEFT adapter folder"):
        export_adapter(empty, out)
    with pytest.raises(UserError, match="does not exist"):
        export_adapter(tmp_path / "missing", out)
    bad_json = tmp_path / "badjson"
    bad_json.mkdir()
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        export_adapter(bad_json, out, base=tiny_spec)
    # weights cut short
    folder, _, _ = plain_adapter
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "adapter_config.json").write_text((folder / "adapter_config.json").read_text())
    data = (folder / "adapter_model.safetensors").read_bytes()
    (cut / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="corrupt or truncated"):
        export_adapter(cut, out, base=tiny_spec)
    with pytest.raises(UserError, match="--outtype"):
        export_adapter(folder, out, outtype="q4_0", base=tiny_spec)
    with pytest.raises(UserError, match=r"--out .*out is a folder; give a file name such as .*adapter\.gguf"):
        export_adapter(folder, tmp_path / "out", base=tiny_spec)
    assert no_leftovers(tmp_path / "out") == []


@pytest.mark.filterwarnings("ignore:Setting `save_embedding_layers`")
def test_unexpressible_adapters_are_refused(tmp_path, tiny_spec, seqs):
    with pytest.raises(UserError, match="DoRA"):
        make_adapter(tiny_spec, tmp_path / "dora", seqs[:1], use_dora=True, r=2,
                     target_modules=lora_target((1,), ("up_proj",)))
        export_adapter(tmp_path / "dora", tmp_path / "dora.gguf", base=tiny_spec)
    with pytest.raises(UserError, match="embeddings"):
        make_adapter(tiny_spec, tmp_path / "emb", seqs[:1], r=2, target_modules=["embed_tokens"])
        export_adapter(tmp_path / "emb", tmp_path / "emb.gguf", base=tiny_spec)
    assert no_leftovers(tmp_path) == []


def fake_peft(folder: Path, base_path: str, tensors: dict, **config):
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "base_model_name_or_path": base_path} | config
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    save_file({k: torch.zeros(s) for k, s in tensors.items()}, folder / "adapter_model.safetensors")


def test_lm_head_of_a_tied_model_and_unknown_modules_are_refused(tmp_path, tiny_spec):
    smol = models.resolve("smollm2-135m")  # tied embeddings
    fake_peft(tmp_path / "head", str(models.hf_dir(smol)), {"base_model.model.lm_head.lora_A.weight": (2, 576),
                                                            "base_model.model.lm_head.lora_B.weight": (49152, 2)})
    with pytest.raises(UserError, match="lm_head of a model whose output layer is tied"):
        export_adapter(tmp_path / "head", tmp_path / "head.gguf", base=smol)
    fake_peft(tmp_path / "odd", str(models.hf_dir(tiny_spec)),
              {"base_model.model.model.layers.0.mlp.act.lora_A.weight": (2, 64),
               "base_model.model.model.layers.0.mlp.act.lora_B.weight": (64, 2)})
    with pytest.raises(UserError, match="not a linear layer"):
        export_adapter(tmp_path / "odd", tmp_path / "odd.gguf")
    fake_peft(tmp_path / "bias", str(models.hf_dir(tiny_spec)), {}, lora_bias=True)
    with pytest.raises(UserError, match="LoRA biases"):
        export_adapter(tmp_path / "bias", tmp_path / "bias.gguf")
    assert no_leftovers(tmp_path) == []


def test_truncated_and_foreign_gguf(plain_adapter, tiny_spec, tiny_base, tmp_path):
    folder, _, _ = plain_adapter
    out = tmp_path / "adapter.gguf"
    export_adapter(folder, out, base=tiny_spec)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(out.read_bytes()[: out.stat().st_size - 100])
    with pytest.raises(UserError, match="truncated"):
        check_pair(cut, tiny_base)
    head = tmp_path / "head.gguf"
    head.write_bytes(out.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt or truncated"):
        adapter_info(head)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(UserError, match="not a GGUF file"):
        check_pair(out, junk)
    with pytest.raises(UserError, match="not a LoRA adapter"):
        check_pair(tiny_base, tiny_base)


def test_no_partial_file_when_writing_fails(plain_adapter, tiny_spec, tmp_path, monkeypatch):
    folder, _, _ = plain_adapter
    out = tmp_path / "adapter.gguf"
    out.write_bytes(b"previous")
    calls = []

    def failing(array, outtype, **kw):
        calls.append(1)
        if len(calls) > 3:
            raise OSError("disk full")
        return real(array, outtype, **kw)

    real = gguf_reader.encode
    monkeypatch.setattr(gguf_reader, "encode", failing)
    with pytest.raises(UserError, match=r"adapter\.gguf: cannot write it \(disk full\)"):  # one line, exit 2
        export_adapter(folder, out, base=tiny_spec)
    assert out.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter.gguf"]


def test_export_base_refuses_unsupported(tmp_path):
    folder = tmp_path / "gpt2"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError, match="type 'gpt2'"):
        export_base(folder, tmp_path / "base.gguf")
    with pytest.raises(UserError, match="does not exist"):
        export_base(tmp_path / "nothing", tmp_path / "base.gguf")
    assert not (tmp_path / "base.gguf").exists()


# ----------------------------------------------------------------------------- the default model


@pytest.mark.slow  # the default model
def test_default_model_q4_1_base_with_adapter(tmp_path, tiny_tokenizer):
    """smollm2-135m: adapter trained on the dequantised weights, run by llama.cpp on the shipped Q4_1 GGUF.
    llama.cpp's Q4_1 kernels quantise activations to 8 bits, so even without an adapter its log-probabilities
    differ from torch's by up to ~0.4 here; the adapter must not add to that gap, and the q/k permutation on
    9 query / 3 key-value heads must hold (without it the gap grows several-fold)."""
    smol = models.resolve("smollm2-135m")
    seqs = phonebook_ids(tiny_tokenizer, n=3)  # tiny uses SmolLM2's tokenizer
    layers = (15,)
    adapted, plain = make_adapter(smol, tmp_path / "peft", seqs, std=0.15, r=8, lora_alpha=16,
                                  target_modules=lora_target(layers, ("q_proj", "k_proj", "gate_proj", "up_proj",
                                                                      "down_proj")))
    out = tmp_path / "adapter.gguf"
    info = export_adapter(tmp_path / "peft", out)
    assert info["model"] == "smollm2-135m"
    base = base_gguf(smol)
    check_pair(out, base)
    with_adapter = llama_logits(base, seqs, out, n_threads=1)
    without = llama_logits(base, seqs, n_threads=1)
    gap_base = max_diff(without, plain, seqs)
    gap_adapter = max_diff(with_adapter, adapted, seqs)
    effect = max(float(np.abs(a - b).max()) for a, b in zip(adapted, plain))
    assert effect > 1.0  # measured: 1.87
    assert gap_base < 0.5 and gap_adapter < gap_base + 0.1  # measured: 0.347 and 0.344
    export_adapter(tmp_path / "peft", tmp_path / "wrong.gguf", _permute=False)
    gap_wrong = max_diff(llama_logits(base, seqs, tmp_path / "wrong.gguf", n_threads=1), adapted, seqs)
    assert gap_wrong > gap_adapter + 0.3  # measured: 0.965


# ----------------------------------------------------------------------------- other Llama-family architectures


@pytest.fixture(scope="module", params=["qwen2", "mistral"])
def other_arch(request, tmp_path_factory, tiny_tokenizer):
    """A seeded random 2-layer model of the architecture, with SmolLM2's tokenizer: qwen2 (q/k/v biases, tied
    embeddings, NEOX RoPE: no permutation) and mistral (the Llama graph: permuted)."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = {"qwen2": (Qwen2Config, Qwen2ForCausalLM),
                             "mistral": (MistralConfig, MistralForCausalLM)}[request.param]
    config = config_cls(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                        rope_theta=10000.0, initializer_range=0.3, tie_word_embeddings=request.param == "qwen2",
                        bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    try:
        model = model_cls(config)
        if request.param == "qwen2":
            with torch.no_grad():  # make the biases count
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
    finally:
        torch.random.set_rng_state(state)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder)
    tiny_tokenizer.save_pretrained(folder)
    base = folder.parent / "base.gguf"
    export_base(folder, base)
    return request.param, models.resolve(str(folder)), base


def test_other_architectures_match_torch(other_arch, seqs, tmp_path):
    arch, spec, base = other_arch
    assert read_gguf(base).get("general.architecture") == ("qwen2" if arch == "qwen2" else "llama")
    adapted, plain = make_adapter(spec, tmp_path / "peft", seqs, r=4, lora_alpha=8,
                                  target_modules=lora_target((0, 1), SEVEN))
    assert max_diff(llama_logits(base, seqs, n_threads=1), plain, seqs) < TOL
    out = tmp_path / "adapter.gguf"
    assert export_adapter(tmp_path / "peft", out)["model"] == str(spec.path)  # base from the PEFT folder
    check_pair(out, base)
    assert max_diff(llama_logits(base, seqs, out, n_threads=1), adapted, seqs) < TOL
    export_adapter(tmp_path / "peft", out, _permute=False)
    unpermuted = max_diff(llama_logits(base, seqs, out, n_threads=1), adapted, seqs)
    assert (unpermuted < TOL) if arch == "qwen2" else (unpermuted > 100 * TOL)  # qwen2's RoPE needs none


# ----------------------------------------------------------------------------- the agreement check


@pytest.mark.slow  # a benchmark
def test_bench_agree_on_a_partly_recalled_run(pb8, tmp_path):
    """`memcli bench agree`: torch + PEFT and llama.cpp (tiny F32 base, exported adapter) reach the same verdict on
    every entry of a run that recalls some entries and not others, and the verdicts are those of training's
    clean pass (summary.json's exact_match): one verdict function for all three."""
    from memcli.training.config import TrainConfig
    from memcli.training.trainer import Trainer

    run = tmp_path / "run"
    Trainer(TrainConfig(corpus=str(pb8), model="tiny", **PARTLY_TRAINED), run,
            log=lambda m: None).run()
    exact = round(json.loads((run / "summary.json").read_text())["exact_match"] * 8)
    assert 0 < exact < 8
    result = run_cli("bench", "agree", run)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith(f"8/8 verdicts agree (100.00 %); llama.cpp: {exact} exact,"), result.stdout
    result = run_cli("bench", "agree", tmp_path / "nothing")
    assert result.exit_code == 2 and "nothing" in result.stderr


@pytest.mark.slow
def test_first_use_dequantisation_equals_transformers_own(tiny_base, tmp_path, monkeypatch):
    """A .gguf model's first use reads the file once (memcli caches gguf's parser inside transformers' loading):
    the folder it writes holds the same tensors and tokenizer as transformers' own, uncached conversion."""
    import contextlib

    from safetensors.torch import load_file

    models._dequantise_gguf(tiny_base, tmp_path / "cached")
    monkeypatch.setattr(models, "_gguf_parsed_once", contextlib.nullcontext)
    models._dequantise_gguf(tiny_base, tmp_path / "plain")
    cached, plain = (load_file(tmp_path / f / "model.safetensors") for f in ("cached", "plain"))
    assert cached.keys() == plain.keys() and len(cached) > 0
    assert all(torch.equal(cached[k], plain[k]) for k in cached)
    for name in ("tokenizer.json", "config.json"):
        assert (tmp_path / "cached" / name).read_text() == (tmp_path / "plain" / name).read_text()
