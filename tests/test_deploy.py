"""Deployment: merged and quantised GGUFs made as llama.cpp makes them, certified per form, trained against.

Expectations come from outside the code under test: llama.cpp's quantiser called directly (llama_cpp's
llama_model_quantize) and the tensors it writes, llama.cpp's logits of the base with the adapter applied at run
time, gguf-py's Q8_0 quantiser, and llama-cpp-python's own greedy generation.
"""

import ctypes
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import make_adapter, max_diff, phonebook_ids, run_cli, run_memcli

from memcli.commands.bench.agree import llama_logits
from memcli.core import models
from memcli.core.gguf_reader import read_gguf
from memcli.gguf.adapter import export_adapter
from memcli.gguf.base import base_gguf, export_base


@pytest.fixture(scope="module")
def tiny_spec():
    return models.resolve("tiny")


@pytest.fixture(scope="module")
def seqs(tiny_tokenizer):
    return phonebook_ids(tiny_tokenizer)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_spec, seqs):
    """A PEFT adapter (r=4, alpha=8, random non-zero A and B) on all linear modules of layers 1 and 2 of tiny."""
    folder = tmp_path_factory.mktemp("peft") / "adapter"
    adapted, _ = make_adapter(tiny_spec, folder, seqs, r=4, lora_alpha=8)
    return folder, adapted


def llama_quantize(src: Path, dst: Path, ftype: int) -> None:
    """llama.cpp's quantiser, called directly (not through memcli)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0


@pytest.mark.parametrize("quant,ftype", [("q8_0", 7), ("q4_0", 2), ("q4_k_m", 15)])
def test_quantised_base_is_llama_cpps(tiny_spec, seqs, tmp_path, quant, ftype):
    """export-base --quant gives the logits of the same model quantised by llama.cpp's quantiser directly."""
    out = tmp_path / f"tiny.{quant}.gguf"
    result = run_cli("export-base", "tiny", "--quant", quant, "--out", out)
    assert result.exit_code == 0, result.output
    f32 = tmp_path / "tiny.f32.gguf"
    export_base(models.hf_dir(tiny_spec), f32, "f32")
    theirs = tmp_path / f"theirs.{quant}.gguf"
    llama_quantize(f32, theirs, ftype)
    ours, expected = llama_logits(out, seqs, n_threads=1), llama_logits(theirs, seqs, n_threads=1)
    assert all(np.array_equal(a, b) for a, b in zip(ours, expected))
    types = {t.type for t in read_gguf(out).tensors.values()}
    assert types != {0}  # quantised, not F32
    if quant == "q4_k_m":  # tiny's rows of 64 are not whole 256-blocks: llama.cpp falls back, and memcli says so
        assert "fell back" in result.output and "not divisible by 256" in result.output


@pytest.mark.slow  # three exports and four llama.cpp loads
def test_merged_f32_is_base_plus_adapter(adapter, tiny_spec, seqs, tmp_path):
    """The merged F32 file gives llama.cpp's logits of the base with the adapter applied at run time, and
    torch + PEFT's; F16 stays within float16 rounding of them."""
    folder, adapted = adapter
    merged = tmp_path / "merged.f32.gguf"
    assert run_cli("export", folder, "--merge", "--quant", "f32", "--out", merged, "--model", "tiny").exit_code == 0
    lora = tmp_path / "adapter.gguf"
    export_adapter(folder, lora, base=tiny_spec)
    runtime = llama_logits(base_gguf(tiny_spec), seqs, lora, n_threads=1)
    assert max(float(np.abs(a - b).max()) for a, b in zip(llama_logits(merged, seqs, n_threads=1), runtime)) < 1e-3
    assert max_diff(llama_logits(merged, seqs, n_threads=1), adapted, seqs) < 1e-3
    half = tmp_path / "merged.f16.gguf"
    assert run_cli("export", folder, "--merge", "--out", half, "--model", "tiny").exit_code == 0  # f16: the default
    from peft import PeftModel

    merged_torch = PeftModel.from_pretrained(models.load_model(tiny_spec)[0], folder).merge_and_unload()
    expected = merged_torch.model.layers[1].mlp.up_proj.weight.detach().numpy()  # PEFT's own merge
    stored = read_gguf(half).array("blk.1.ffn_up.weight").astype(np.float32)
    assert np.abs(stored - expected).max() <= np.abs(expected).max() * 2**-10  # float16 rounding only
    assert np.abs(stored - read_gguf(merged).array("blk.1.ffn_up.weight")).max() > 0  # and it is F16
    assert read_gguf(half).get("memcli.merged_adapter")


def test_fake_quantisation_is_what_the_quantised_file_holds(tiny_spec, tmp_path):
    """qat.roundtrip(w, type) equals the tensor llama.cpp's quantiser writes (read back and dequantised by
    gguf-py), for K-quant and legacy types, and gguf-py's own Q8_0 round trip."""
    import gguf
    import llama_cpp

    from memcli.training.deploy_aware import roundtrip

    f32 = tmp_path / "tiny.f32.gguf"
    export_base(models.hf_dir(tiny_spec), f32, "f32")
    name = "blk.1.ffn_down.weight"  # rows of 256: every K-quant applies without a fallback
    w = read_gguf(f32).array(name)
    Q = gguf.GGMLQuantizationType
    assert np.array_equal(roundtrip(w, Q.Q8_0), gguf.quants.dequantize(gguf.quants.quantize(w, Q.Q8_0), Q.Q8_0))
    for qtype, ftype in ((Q.Q4_K, 15), (Q.Q6_K, 18), (Q.Q5_0, 8), (Q.Q4_0, 2), (Q.Q3_K, 12)):
        dst = tmp_path / f"pure.{qtype.name}.gguf"
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.pure = ftype, True  # every tensor to the type itself
        assert llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), ctypes.byref(params)) == 0
        t = next(t for t in gguf.GGUFReader(dst).tensors if t.name == name)
        assert t.tensor_type == qtype
        theirs = gguf.quants.dequantize(np.asarray(t.data), qtype).reshape(w.shape)
        ours = roundtrip(w, qtype)
        assert np.array_equal(ours, theirs), qtype.name
        assert 0 < np.abs(ours - w).max() < 0.5 * np.abs(w).max()  # it did round
    with pytest.raises(ValueError, match="blocks of 256"):  # a refusal, not ggml writing past the buffer
        roundtrip(np.ones((4, 576), dtype=np.float32), Q.Q4_K)


def test_the_forms_in_training_are_the_files_peft_and_llama_cpps_quantiser_make(adapter, tiny_spec, seqs):
    """`train --deploy`'s forms: the merged form (a forward hook on every adapted layer) gives the logits of
    PEFT's own merge_and_unload with each merged weight rounded as llama.cpp's quantiser rounds it and every other
    tensor the quantised base's, and passes the gradient on to A and B; the adapter form over a quantised base is
    PEFT's own forward over that base (its tensors swapped in); the float form and the model after any form are
    PEFT's forward over the float base. Fails loudly if a PEFT upgrade changes the public API the hook uses
    (get_delta_weight, active_adapters, get_base_layer)."""
    import gguf
    from peft import PeftModel

    from memcli.gguf.base import cached_base
    from memcli.training.deploy_aware import DeployTarget, roundtrip

    folder, adapted = adapter
    quant_base = cached_base(tiny_spec, "q8_0")
    ids = torch.tensor([seqs[0]])
    q8_model = models.load_model(models.resolve(str(quant_base)))[0]

    def peft_model(base=None):
        return PeftModel.from_pretrained(base or models.load_model(tiny_spec)[0], folder)

    expected = peft_model().merge_and_unload()
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(quant_base).tensors}
    rounded = 0
    with torch.no_grad():
        for name, module in expected.named_modules():
            ours = q8_model.get_submodule(name)
            if (".layers.1." in name or ".layers.2." in name) and isinstance(module, torch.nn.Linear):
                layer, kind = name.split(".layers.")[1].split(".", 1)
                gname = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                         "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                         "mlp.down_proj": "ffn_down"}[kind]
                w = module.weight.detach().numpy()
                module.weight.copy_(torch.from_numpy(roundtrip(w, types[f"blk.{layer}.{gname}.weight"])))
                rounded += 1
            else:  # every other tensor as the quantised base holds it
                for pname, p in module.named_parameters(recurse=False):
                    p.copy_(getattr(ours, pname))
        want_merged = expected(ids).logits
        want_adapter = peft_model(models.load_model(models.resolve(str(quant_base)))[0])(ids).logits
    assert rounded == 14

    model = peft_model()
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    floats = {n: p.data for n, p in models.load_model(tiny_spec)[0].named_parameters(remove_duplicate=False)}
    q8 = {n: p.data for n, p in q8_model.named_parameters(remove_duplicate=False)}
    target = DeployTarget(model, models.hf_dir(tiny_spec), {"float": (None, floats), "q8_0": (quant_base, q8)},
                          home="float")
    with torch.no_grad():
        plain = model(ids).logits
        with target.form("float", "adapter"):
            assert torch.equal(model(ids).logits, plain)
        with target.form("q8_0", "adapter"):
            over_q8 = model(ids).logits
        assert torch.equal(model(ids).logits, plain)  # the float tensors are back
    assert torch.allclose(over_q8, want_adapter, atol=1e-5), float((over_q8 - want_adapter).abs().max())
    with target.form("q8_0", "merged"):
        merged = model(ids).logits
    assert torch.allclose(merged, want_merged, atol=1e-4), float((merged - want_merged).abs().max())
    assert not torch.allclose(merged, plain, atol=1e-3)  # the rounding shows
    merged.sum().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_" in n]
    assert len(grads) == 28 and all(g is not None and g.abs().sum() > 0 for g in grads)
    lp = torch.log_softmax(plain[0].double(), -1)
    got = lp[torch.arange(len(seqs[0]) - 1), torch.tensor(seqs[0][1:])].numpy()
    assert np.abs(got - adapted[0]).max() < 1e-4  # the float adapter form is PEFT's own forward


@pytest.mark.parametrize("args,message", [
    (["--merge", "--quant", "q9_9"], "--quant must be one of"),
    (["--merge", "--quant", "iq2_xxs"], "importance matrix"),
    (["--quant", "q4_k_m"], "--quant applies to --merge"),
])
def test_bad_quant_types_exit_2_before_any_work(adapter, tmp_path, args, message):
    folder, _ = adapter
    out = tmp_path / "m.gguf"
    result = run_cli("export", folder, *args, "--out", out, "--model", "tiny")
    assert result.exit_code == 2 and message in result.output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_bad_deploy_types_exit_2(pb8, adapter, tmp_path):
    folder, _ = adapter
    result = run_cli("verify", pb8, "--lora", folder, "--model", "tiny", "--out", tmp_path / "v", "--deploy", "q4_k_x")
    assert result.exit_code == 2 and "--deploy must be one of" in result.output and not (tmp_path / "v").exists()
    result = run_cli("verify", pb8, "--model", "tiny", "--out", tmp_path / "v", "--deploy", "q8_0")
    assert result.exit_code == 2 and "--deploy needs --lora" in result.output and not (tmp_path / "v").exists()
    result = run_cli("train", pb8, "--model", "tiny", "--out", tmp_path / "r", "--deploy", "q5")
    assert result.exit_code == 2 and "--deploy must be one of" in result.output and not (tmp_path / "r").exists()
    result = run_cli("export-base", "tiny", "--quant", "Q8_K", "--out", tmp_path / "b.gguf")
    assert result.exit_code == 2 and not (tmp_path / "b.gguf").exists()


@pytest.fixture(scope="module")
def deploy_run(pb8, tmp_path_factory):
    """tiny trained on pb8 with --deploy q8_0,f16 for llama-cpp-python's server until llama.cpp certifies both
    deployed forms of each type under plain greedy decoding and under that runner's (or 300 steps)."""
    run = tmp_path_factory.mktemp("deploy") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_cli("train", pb8, "--model", "tiny", "--out", run, "--deploy", "q8_0,f16", "--until-recall",
                         "--sampler", "llama-cpp-python", "--max-steps", "300", "--lr", "0.02", "--check-every", "20")
    finally:
        torch.set_num_threads(threads)
    assert result.exit_code == 0, result.output
    return run


@pytest.mark.slow  # training to certified recall in both deployed forms, or exports of every form
def test_train_deploy_certifies_the_deployed_files(deploy_run, pb8):
    """--deploy's summary records llama.cpp's verdict on both forms of each type; the merged files it keeps
    recall every entry under llama-cpp-python's own greedy generation (`memcli ask`)."""
    summary = json.loads((deploy_run / "summary.json").read_text())
    d = summary["deploy"]
    assert d["types"] == ["q8_0", "f16"] and d["error"] is None
    assert sorted((r["form"], r["type"], r["sampler"]) for r in d["forms"]) == sorted(
        (f, t, s) for f in ("merged", "adapter") for t in ("q8_0", "f16") for s in ("greedy", "llama-cpp-python"))
    assert summary["stop_reason"] == "certified"
    assert all(r["certified"] == r["entries"] == 8 for r in d["forms"])
    for quant, ggml_type in (("q8_0", 8), ("f16", 1)):
        merged = deploy_run / "deploy" / f"merged.{quant}.gguf"
        assert ggml_type in {t.type for t in read_gguf(merged).tensors.values()}
        assert read_gguf(merged).get("memcli.merged_adapter") == str(deploy_run.resolve())  # not a deleted folder
        for row in map(json.loads, pb8.read_text().splitlines()[:3]):
            key, value = row.get("query") or row.get("key"), row.get("target") or row.get("value")
            result = run_cli("ask", merged, key, "--max-tokens", "16")
            assert result.exit_code == 0, result.output
            assert result.stdout.splitlines()[0].startswith(key + value)


@pytest.mark.slow  # training to certified recall in both deployed forms, or exports of every form
def test_verify_deploy_prints_and_records_the_survival_table(deploy_run, pb8, tmp_path):
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--lora", deploy_run, "--out", out, "--deploy", "f32,q8_0", "--base", "training")
    assert result.exit_code == 0, result.output
    assert "recall where it ships" in result.output
    report = json.loads((out / "report.json").read_text())
    rows = {(r["form"], r["type"]): r for r in report["deploy"]}
    assert set(rows) == {("merged", "f32"), ("adapter", "f32"), ("merged", "q8_0"), ("adapter", "q8_0")}
    main = [json.loads(x) for x in (out / "entries.jsonl").read_text().splitlines()]
    for form in ("merged", "adapter"):  # F32 deployment is the verified weights themselves: the same verdicts
        lines = [json.loads(x) for x in (out / "deploy" / f"{form}-f32.jsonl").read_text().splitlines()]
        assert [e["exact"] for e in lines] == [e["exact"] for e in main]
        assert max(abs(a["min_margin"] - b["min_margin"]) for a, b in zip(lines, main)) < 1e-2
    assert rows[("merged", "q8_0")]["certified"] == 8  # what train --deploy certified
    assert not any(p.name.startswith(".memcli-deploy") for p in tmp_path.iterdir())


@pytest.mark.slow  # training to certified recall in both deployed forms, or exports of every form
def test_verify_of_a_deploy_run_certifies_what_it_was_trained_for(deploy_run, pb8, tmp_path):
    """verify --lora RUN of a --deploy q8_0,f16 run, nothing else asked: its adapter over the base as llama.cpp
    quantises it to Q8_0, the first type (not the float base), and both deployed forms of each type in the
    table."""
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--lora", deploy_run, "--out", out)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["base"]["kind"] == "deploy-q8_0"
    assert {t.type for t in read_gguf(Path(report["settings"]["base_gguf"])).tensors.values()} >= {8}  # Q8_0
    assert {(r["form"], r["type"]) for r in report["deploy"]} == {(f, t) for f in ("merged", "adapter")
                                                                  for t in ("q8_0", "f16")}
    assert all(r["certified"] == 8 for r in report["deploy"])
    assert report["totals"]["certified"] == 8
    result = run_cli("verify", pb8, "--lora", deploy_run, "--out", tmp_path / "t", "--base", "training")
    report = json.loads((tmp_path / "t" / "report.json").read_text())  # asked for the float base: no table
    assert report["settings"]["base"]["kind"] != "deploy-q8_0" and "deploy" not in report


@pytest.mark.slow  # training to certified recall in both deployed forms, or exports of every form
def test_ask_with_a_run_and_adapter_over_a_quantised_base(deploy_run, pb8, tmp_path):
    """ask RUN uses the run's adapter over its base; ask ADAPTER --model BASE.gguf over a base quantised by
    llama.cpp itself (q8_0: the type the run was trained against)."""
    row = json.loads(pb8.read_text().splitlines()[0])
    key, value = row.get("query") or row.get("key"), row.get("target") or row.get("value")
    assert Path(json.loads((deploy_run / "summary.json").read_text())["deploy"]["base_gguf"]["q8_0"]).exists()
    theirs = tmp_path / "base.q8_0.gguf"
    llama_quantize(base_gguf(models.resolve("tiny")), theirs, 7)
    result = run_memcli("ask", deploy_run / "adapter.gguf", key, "--model", theirs, "--max-tokens", "16")
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[0].startswith(key + value)
    assert run_cli("ask", deploy_run, key).exit_code == 0
    bad = run_cli("ask", tmp_path / "missing", key)
    assert bad.exit_code == 2 and "does not exist" in bad.output


def test_deploy_study_summary_medians_and_means():
    """bench deploy's summary over seeds, against figures worked by hand from made-up rows."""
    from memcli.commands.bench.deploy_study import format_summary

    def row(method, variant, seed, steps, train_s, q4, certified=True):
        survival = [{"form": f, "type": "q4_k_m", "exact": e, "entries": 20} for f, e in zip(("merged", "adapter"), q4)]
        return {"method": method, "variant": variant, "seed": seed, "steps": steps, "train_s": train_s,
                "certified_in_training": certified, "survival": survival}

    rows = [row("sft", "plain", 0, 100, 50.0, (5, 6)), row("sft", "plain", 1, 200, 100.0, (7, 9)),
            row("sft", "deploy", 0, 150, 150.0, (20, 20)), row("sft", "deploy", 1, 200, 200.0, (19, 20), False)]
    lines = {tuple(c.strip() for c in line.strip("|").split("|"))[:2]: [c.strip() for c in line.strip("|").split("|")]
             for line in format_summary(rows).splitlines() if line.startswith("| sft")}
    # plain: median steps 150, means 6.0 and 7.5; deploy: ratios 1.5 and 1.0 (steps), 3.0 and 2.0 (time)
    assert lines[("sft", "plain")][2:] == ["2", "2/2", "150", "1.00x", "1.00x", "6.0", "7.5"]
    assert lines[("sft", "deploy")][2:] == ["2", "1/2", "175", "1.25x", "2.50x", "19.5", "20.0"]


def test_the_modelfile_pins_the_decoding_memcli_certifies(adapter, tmp_path):
    """ollama's Modelfile: FROM the base GGUF + ADAPTER, temperature 0, and the repeat penalty off (older ollama
    adds 1.1 by default, which certification under greedy decoding does not cover)."""
    from memcli.deploy.forms import write_modelfile

    out = tmp_path / "adapter.gguf"
    path = write_modelfile(out, merged=False, model="tiny")
    lines = [line for line in path.read_text().splitlines() if line and not line.startswith("#")]
    params = dict(line.split()[1:3] for line in lines if line.startswith("PARAMETER"))
    assert params == {"temperature": "0", "repeat_penalty": "1"}
    assert lines[-3:] == [f"ADAPTER {out.resolve()}", "PARAMETER temperature 0", "PARAMETER repeat_penalty 1"]
    assert any(line.startswith("FROM ") for line in lines)


def test_the_modelfile_carries_what_the_run_was_certified_for(tmp_path):
    """A run trained for ollama's sampler keeps ollama's penalty (1.1 over the last 64, the preset) or the one it
    was trained with; a chat run says to query through the chat API and carries its system prompt."""
    from memcli.deploy.forms import write_modelfile

    def params(settings):
        path = write_modelfile(tmp_path / "m.gguf", merged=True, model="tiny", settings=settings)
        lines = path.read_text().splitlines()
        return lines[0], dict(line.split()[1:3] for line in lines if line.startswith("PARAMETER")), lines

    _, p, _ = params({"sampler": "ollama"})
    assert p == {"temperature": "0", "repeat_penalty": "1.1", "repeat_last_n": "64"}
    _, p, _ = params({"sampler": "ollama", "repeat_penalty": 1.3, "repeat_last_n": 32})
    assert p == {"temperature": "0", "repeat_penalty": "1.3", "repeat_last_n": "32"}
    _, p, _ = params({"sampler": "llama-cpp-python"})  # certified for greedy too: ollama runs it penalty-free
    assert p == {"temperature": "0", "repeat_penalty": "1"}
    head, _, lines = params({"chat_template": True, "system_prompt": "Answer with the number."})
    assert "chat API" in head and 'SYSTEM """Answer with the number."""' in lines
    head, _, _ = params({})
    assert '"raw": true' in head


@pytest.mark.slow  # builds tiny's quantised bases
@pytest.mark.parametrize("types, kept", [("q8_0", False), ("q8_0,f16", True)])
def test_locality_of_a_run_on_a_quantised_base_runs_both_passes(pb8, tmp_path, monkeypatch, types, kept):
    """train's locality reads the base's side of the comparison from a cache that holds the float base's; a
    --deploy run whose torch weights are a quantised base's (no 16-bit type asked for) must compare against that
    base, so it runs both passes; with a 16-bit type it trains on the float weights and may read the cache."""
    from memcli.training import trainer as trainer_mod
    from memcli.training.config import TrainConfig

    asked = []
    real = trainer_mod.torch_locality

    def spy(*args, **kwargs):
        asked.append(kwargs.get("base_cache"))
        return real(*args, **kwargs)

    monkeypatch.setattr(trainer_mod, "torch_locality", spy)
    cfg = TrainConfig(corpus=str(pb8), model="tiny", deploy=types, max_steps=1, check_every=1000)
    summary = trainer_mod.Trainer(cfg, tmp_path / "run", log=lambda m: None).run()
    assert len(asked) == 1 and (asked[0] is not None) == kept
    assert summary["locality"]["tokens"] > 0
