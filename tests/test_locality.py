"""Locality (memcli.training.locality, memcli verify --locality, train's summary): base against tuned over a text.

Expectations come from hand-computed distributions, from a plain torch + PEFT computation written here (not
memcli's code), and from the other backend (llama.cpp against torch)."""

import json
import math

import numpy as np
import pytest
from helpers import assert_refused, run_cli, run_memcli

from memcli.core.scoring import kl_logits, kl_numpy, native_available

needs_native = pytest.mark.skipif(not native_available(), reason="native kernel not built")
IMPLS = ["numpy", pytest.param("native", marks=needs_native)]


# ------------------------------------------------------------------ the KL kernel, on distributions worked by hand


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_of_two_hand_computed_distributions(impl):
    # P = softmax([0, ln 3]) = [1/4, 3/4]; Q = softmax([0, 0]) = [1/2, 1/2]
    # KL(P || Q) = 1/4 ln(1/2) + 3/4 ln(3/2)
    want = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    # P = [1/2, 1/4, 1/4], Q = [1/4, 1/4, 1/2]: KL = 1/2 ln 2 + 0 + 1/4 ln(1/2) = 1/4 ln 2
    p = np.array([[0.0, math.log(3.0), -np.inf], [math.log(2.0), 0.0, 0.0]], np.float32)
    q = np.array([[0.0, 0.0, -np.inf], [0.0, 0.0, math.log(2.0)]], np.float32)
    kl = kl_logits(p, q, impl=impl)
    assert kl[0] == pytest.approx(want, abs=1e-6)
    assert kl[1] == pytest.approx(0.25 * math.log(2.0), abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_is_zero_for_equal_rows_and_for_a_constant_logit_shift(impl):
    rng = np.random.default_rng(0)
    p = rng.standard_normal((5, 1000)).astype(np.float32) * 3
    assert (kl_logits(p, p.copy(), impl=impl) == 0.0).all()  # exactly: the zero adapter's case
    np.testing.assert_allclose(kl_logits(p, p + np.float32(7.0), impl=impl), 0.0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_of_a_known_logit_shift_on_one_token(impl):
    # Two tokens, logits [0, 0] against [0, d]: P = [1/2, 1/2], Q = [1/(1+e^d), e^d/(1+e^d)]
    # KL = 1/2 ln((1+e^d)/2) + 1/2 ln((1+e^d)/(2 e^d))
    d = 1.5
    want = 0.5 * math.log((1 + math.exp(d)) / 2) + 0.5 * math.log((1 + math.exp(d)) / (2 * math.exp(d)))
    kl = kl_logits(np.zeros((1, 2), np.float32), np.array([[0.0, d]], np.float32), impl=impl)
    assert kl[0] == pytest.approx(want, abs=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_kl_masked_and_invalid_rows(impl):
    p = np.array([[0.0, 0.0], [0.0, -np.inf], [np.nan, 0.0], [-np.inf, -np.inf], [0.0, np.inf]], np.float32)
    q = np.array([[0.0, -np.inf], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]], np.float32)
    kl = kl_logits(p, q, impl=impl)
    assert kl[0] == np.inf  # Q masks a token P gives 1/2
    assert kl[1] == pytest.approx(math.log(2.0), abs=1e-6)  # P = [1, 0], Q = [1/2, 1/2]
    assert np.isnan(kl[2:]).all()


@needs_native
def test_native_kl_equals_the_reference_on_a_real_sized_block():
    rng = np.random.default_rng(1)
    p = rng.standard_normal((37, 4099)).astype(np.float32) * 4
    q = p + rng.standard_normal((37, 4099)).astype(np.float32) * 0.5
    p[3, 100:200] = -np.inf
    q[3, 100:150] = -np.inf
    np.testing.assert_allclose(kl_logits(p, q, impl="native", threads=2), kl_numpy(p, q), rtol=1e-4, atol=1e-6)


def test_totals_of_a_known_block():
    from memcli.training.locality import LocalityTotals

    # position 0: P = Q = softmax([0, ln 3]); position 1: P = [1/2, 1/2], Q = softmax([0, 1.5]) -> argmax 0 vs 1
    p = np.array([[0.0, math.log(3.0)], [0.0, 0.0]], np.float32)
    q = np.array([[0.0, math.log(3.0)], [0.0, 1.5]], np.float32)
    t = LocalityTotals()
    t.add(p, q, np.array([1, 0]))
    r = t.result("hand")
    kl1 = 0.5 * math.log((1 + math.exp(1.5)) / 2) + 0.5 * math.log((1 + math.exp(1.5)) / (2 * math.exp(1.5)))
    assert r["tokens"] == 2 and r["argmax_agreement"] == 0.5
    assert r["kl"] == pytest.approx(kl1 / 2, abs=1e-6)
    assert r["ce_base"] == pytest.approx((-math.log(0.75) - math.log(0.5)) / 2, abs=1e-6)
    assert r["ce_tuned"] == pytest.approx((-math.log(0.75) + math.log(1 + math.exp(1.5))) / 2, abs=1e-6)


# ------------------------------------------------------------------ end to end on the tiny model

TEXT = ("The lighthouse keeper climbed the stairs every evening to light the lamp. Ships far out at sea "
        "watched for its beam, and the fishermen of the village said that as long as the light turned, nobody "
        "would be lost on the rocks. In winter the storms came from the north and the waves broke over the "
        "harbour wall. ") * 6


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("loc") / "text.txt"
    path.write_text(TEXT)
    return path


@pytest.fixture(scope="module")
def zero_adapter(tmp_path_factory):
    """A PEFT adapter on tiny that changes nothing (LoRA's B is zero at initialisation), saved, and its GGUF."""
    from memcli.core import models
    from memcli.gguf.adapter import export_adapter
    from memcli.training import lora

    folder = tmp_path_factory.mktemp("zero")
    spec = models.resolve("tiny")
    model, _ = models.load_model(spec)
    peft = lora.add_lora(model, 4, None, 0.0, [1], ["gate_proj", "up_proj", "down_proj"], 0)
    peft.save_pretrained(folder / "adapter")
    export_adapter(folder / "adapter", folder / "adapter.gguf", base=spec)
    return folder


@pytest.fixture(scope="module")
def trained(pb8, tmp_path_factory):
    """A tiny run of a few steps with a high learning rate: an adapter that moves the model."""
    from memcli.training.config import TrainConfig
    from memcli.training.trainer import Trainer

    run = tmp_path_factory.mktemp("trained") / "run"
    Trainer(TrainConfig(corpus=str(pb8), model="tiny", max_steps=6, lr=0.05, check_every=1000), run,
            log=lambda m: None).run()
    return run


def independent_locality(peft_dir, text_path, window=128):
    """Plain torch + PEFT, written out here: the tiny base and base + adapter over the text's windows."""
    import torch
    from peft import PeftModel

    from memcli.core import models

    spec = models.resolve("tiny")
    base, tok = models.load_model(spec)
    ids = tok(text_path.read_text(), add_special_tokens=False)["input_ids"]
    windows = torch.tensor([ids[i: i + window] for i in range(0, len(ids) - window + 1, window)])
    with torch.no_grad():
        p = base(input_ids=windows).logits[:, :-1].float()
        tuned = PeftModel.from_pretrained(models.load_model(spec)[0], peft_dir).eval()
        q = tuned(input_ids=windows).logits[:, :-1].float()
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    nxt = windows[:, 1:]
    return {"argmax_agreement": (p.argmax(-1) == q.argmax(-1)).double().mean().item(),  # a count over tokens
            "kl": (lp.exp() * (lp - lq)).sum(-1).mean().item(),
            "ce_base": -lp.gather(-1, nxt[..., None]).mean().item(),
            "ce_tuned": -lq.gather(-1, nxt[..., None]).mean().item(), "tokens": nxt.numel()}


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["llama", "torch"])
def test_zero_adapter_agrees_everywhere_with_kl_zero(zero_adapter, pb8, text, tmp_path, backend):
    lora = zero_adapter / ("adapter.gguf" if backend == "llama" else "adapter")
    result = run_cli("verify", pb8, "--lora", lora, "--model", "tiny", "--out", tmp_path / "v", "--backend", backend,
                     "--min-exact", "0", "--locality", text)
    assert result.exit_code == 0, result.output
    loc = json.loads((tmp_path / "v" / "report.json").read_text())["locality"]
    assert loc["argmax_agreement"] == 1.0
    assert loc["kl"] == pytest.approx(0.0, abs=1e-9)
    assert loc["ce_base"] == pytest.approx(loc["ce_tuned"], abs=1e-9)
    assert loc["tokens"] > 0 and loc["tokens"] % 127 == 0
    assert "locality" in result.stdout


@pytest.mark.slow
def test_locality_without_text_uses_the_reference_as_a_user_types_it(zero_adapter, pb8, tmp_path):
    """`--locality` with no TEXT, followed by another option, as a user types it (the memcli command, a process)."""
    done = run_memcli("verify", pb8, "--lora", zero_adapter / "adapter.gguf", "--model", "tiny", "--locality",
                      "--out", tmp_path / "v", "--min-exact", "0")
    assert done.returncode == 0, done.stderr
    loc = json.loads((tmp_path / "v" / "report.json").read_text())["locality"]
    assert loc["text"].startswith("reference") and loc["tokens"] == 24 * 127
    assert loc["argmax_agreement"] == 1.0 and loc["kl"] == pytest.approx(0.0, abs=1e-9)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "llama"])
def test_trained_adapter_locality_matches_plain_torch_and_peft(trained, pb8, text, tmp_path, backend):
    want = independent_locality(trained / "adapter", text)
    assert want["kl"] > 1e-3  # the adapter does move the model: the comparison is not trivially 0
    result = run_cli("verify", pb8, "--lora", trained, "--out", tmp_path / "v", "--backend", backend,
                     "--min-exact", "0", "--locality", text)
    assert result.exit_code == 0, result.output
    got = json.loads((tmp_path / "v" / "report.json").read_text())["locality"]
    assert got["tokens"] == want["tokens"]
    tol = 1e-4 if backend == "torch" else 2e-3  # llama.cpp: F32 GGUF of the same weights, its own kernels
    assert got["argmax_agreement"] == pytest.approx(want["argmax_agreement"], abs=0.01 if backend == "llama" else 0)
    for key in ("kl", "ce_base", "ce_tuned"):
        assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key


@pytest.mark.slow
def test_train_records_locality_on_the_reference(trained):
    summary = json.loads((trained / "summary.json").read_text())
    loc = summary["locality"]
    assert loc["tokens"] > 1000 and 0 <= loc["argmax_agreement"] <= 1 and loc["kl"] > 0
    assert summary["locality_error"] is None


@pytest.mark.slow
def test_reference_is_made_once_and_reused(monkeypatch):
    from memcli.core import models
    from memcli.training import locality

    spec = models.resolve("tiny")
    first = locality.reference_windows(spec, "measure")
    monkeypatch.setattr(locality, "generate_reference", lambda *a, **k: pytest.fail("generated again"))
    assert locality.reference_windows(spec, "measure") == first
    preserve = locality.reference_windows(spec, "preserve")
    assert len(first) == len(preserve) == len(locality.REFERENCE_PROMPTS) // 2
    assert all(len(w) == locality.WINDOW for w in first + preserve) and first != preserve


def test_the_default_models_reference_ships_and_is_its_own(monkeypatch, tmp_path):
    """With an empty cache the default model's reference is read from the file memcli ships, not generated (a
    newcomer's first train measures locality at once), and that file is the default model's: its name carries the
    fingerprint of the weights and the recipe, its prompts are the reference prompts, its windows full, its
    tokens the prompts' own tokenisation followed by the model's continuation."""
    from memcli.core import models
    from memcli.training import locality

    spec = models.resolve("smollm2-135m")
    tokenizer = models.load_tokenizer(spec)  # from the usual cache
    monkeypatch.setenv("MEMCLI_CACHE", str(tmp_path))
    monkeypatch.setattr(locality, "generate_reference", lambda *a, **k: pytest.fail("generated"))
    windows = locality.reference_windows(spec, "measure") + locality.reference_windows(spec, "preserve")
    shipped = json.loads(models.shipped_file(f"locality/{locality.reference_path(spec).name}").read_text())
    assert shipped["prompts"] == list(locality.REFERENCE_PROMPTS) and shipped["model"] == "smollm2-135m"
    assert len(windows) == len(locality.REFERENCE_PROMPTS) and all(len(w) == locality.WINDOW for w in windows)
    for prompt, window in zip(locality.REFERENCE_PROMPTS, shipped["windows"]):
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        assert window[: len(ids)] == ids
    assert not any((tmp_path / "locality").glob("*"))  # nothing written to the cache


@pytest.mark.slow
def test_the_base_side_is_run_once_then_read_with_the_same_figures(trained, text, tmp_path):
    """train's locality keeps the base's side of the comparison (`BaseSide`): the first measurement runs both
    models and saves it, later ones run only the tuned model and read it; both give the figures of plain torch +
    PEFT. A damaged file is computed again."""
    from peft import PeftModel

    from memcli.core import models
    from memcli.training.locality import text_windows, torch_locality

    want = independent_locality(trained / "adapter", text)
    base, tok = models.load_model(models.resolve("tiny"))
    model = PeftModel.from_pretrained(base, trained / "adapter")
    windows, cache = text_windows(text, tok), tmp_path / "side.npz"

    def check(got, tol):
        assert got["tokens"] == want["tokens"] and got["argmax_agreement"] == want["argmax_agreement"]
        for key in ("kl", "ce_base", "ce_tuned"):
            assert got[key] == pytest.approx(want[key], rel=tol, abs=tol), key

    check(torch_locality(model, windows, "cpu", base_cache=cache), 1e-4)
    assert cache.is_file()
    real = model.disable_adapter
    model.disable_adapter = lambda: pytest.fail("the base ran again")
    check(torch_locality(model, windows, "cpu", base_cache=cache), 2e-4)  # its expected rows kept in float16
    model.disable_adapter = real
    cache.write_bytes(b"not an npz")
    check(torch_locality(model, windows, "cpu", base_cache=cache), 1e-4)
    model.disable_adapter = lambda: pytest.fail("the base ran again")
    check(torch_locality(model, windows, "cpu", base_cache=cache), 2e-4)


def test_the_default_models_base_side_ships_for_its_reference(monkeypatch, tmp_path):
    """A newcomer's first train reads the default model's base side from what memcli ships: the file named for
    the default model's weights, its measure windows and train's dtype is there, with a row per position."""
    from memcli.core import models
    from memcli.training import locality

    monkeypatch.setenv("MEMCLI_CACHE", str(tmp_path))
    spec = models.resolve("smollm2-135m")
    windows = locality.reference_windows(spec, "measure")
    path = models.shipped_file(f"locality/{locality.base_side_path(spec, windows, 'torch.float32').name}")
    assert path is not None
    side = locality.BaseSide.load(path, sum(len(w) - 1 for w in windows), 576)  # d of SmolLM2-135M
    assert side is not None and side.expected_row.dtype == np.float16
    assert np.all(side.negentropy <= 0) and np.all(side.logprob <= 0)


@pytest.mark.slow
def test_the_default_models_shipped_base_side_gives_the_two_pass_figures(monkeypatch, tmp_path):
    """On the default model, an adapter that moves it (LoRA's B set at random): locality read against the
    shipped base side equals the two passes."""
    import torch

    from memcli.core import models
    from memcli.training import locality, lora

    spec = models.resolve("smollm2-135m")
    model, _ = models.load_model(spec)  # from the usual cache
    monkeypatch.setenv("MEMCLI_CACHE", str(tmp_path))
    model = lora.add_lora(model, 8, None, 0.0, [15], ["gate_proj", "up_proj", "down_proj"], 0)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 2.0)
    windows = locality.reference_windows(spec, "measure")
    want = locality.torch_locality(model, windows, first_layer=15)
    assert want["kl"] > 1e-2
    cache = locality.base_side_path(spec, windows, "torch.float32")
    model.disable_adapter = lambda: pytest.fail("the base ran")
    got = locality.torch_locality(model, windows, first_layer=15, base_cache=cache)
    assert not cache.exists()  # read from what memcli ships, nothing written
    assert got["tokens"] == want["tokens"] and got["argmax_agreement"] == want["argmax_agreement"]
    for key in ("kl", "ce_base", "ce_tuned"):
        assert got[key] == pytest.approx(want[key], rel=2e-4, abs=2e-4), key


# ------------------------------------------------------------------ bad input: one line, exit 2, no report folder


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing", "empty", "short", "binary", "not-utf8"])
def test_bad_locality_text_exits_2(trained, pb8, tmp_path, case):
    path = tmp_path / "text.txt"
    needle = {"missing": "no such file", "empty": "is empty", "short": "shorter than one window",
              "binary": "binary", "not-utf8": "not UTF-8"}[case]
    if case == "empty":
        path.write_text("  \n")
    elif case == "short":
        path.write_text("A few words only.")
    elif case == "binary":
        path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)) + b"\0")
    elif case == "not-utf8":
        path.write_bytes(b"caf\xe9 au lait " * 100)
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--lora", trained, "--out", out, "--locality", path)
    assert_refused(result, "--locality", needle)
    assert not out.exists()


def test_locality_without_an_adapter_or_base_exits_2(pb8, tmp_path, text):
    result = run_cli("verify", pb8, "--model", "tiny", "--out", tmp_path / "v", "--locality", text)
    assert_refused(result, "--locality compares a tuned model with its base")
    assert not (tmp_path / "v").exists()


@pytest.mark.slow
def test_merged_model_against_its_base_equals_base_plus_adapter(trained, pb8, text, tmp_path):
    """--model MERGED.gguf --locality-base BASE.gguf (a merged model, as `export --merge` makes) gives the figures
    of the same adapter applied at run time: here the merge is PEFT's merge_and_unload, exported by export-base."""
    from peft import PeftModel

    from memcli.core import models
    from memcli.gguf.base import base_gguf, export_base

    spec = models.resolve("tiny")
    base, tok = models.load_model(spec)
    merged = PeftModel.from_pretrained(base, trained / "adapter").merge_and_unload()
    merged.save_pretrained(tmp_path / "merged-hf")
    tok.save_pretrained(tmp_path / "merged-hf")
    export_base(tmp_path / "merged-hf", tmp_path / "merged.gguf", "f32")
    runtime = run_cli("verify", pb8, "--lora", trained, "--out", tmp_path / "a", "--min-exact", "0",
                      "--locality", text)
    assert runtime.exit_code == 0, runtime.output
    result = run_cli("verify", pb8, "--model", tmp_path / "merged.gguf", "--out", tmp_path / "m", "--min-exact", "0",
                     "--locality", text, "--locality-base", base_gguf(spec))
    assert result.exit_code == 0, result.output
    want = json.loads((tmp_path / "a" / "report.json").read_text())["locality"]
    got = json.loads((tmp_path / "m" / "report.json").read_text())["locality"]
    assert got["tokens"] == want["tokens"] and want["kl"] > 1e-3
    assert got["argmax_agreement"] == pytest.approx(want["argmax_agreement"], abs=0.01)
    for key in ("kl", "ce_base", "ce_tuned"):
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4), key


@pytest.mark.slow
def test_locality_from_the_frozen_prefix_equals_plain_torch_and_peft(trained, text):
    """train measures locality starting both passes at the first adapted layer (the layers below run once): the
    same figures as two whole passes of plain torch + PEFT."""
    from peft import PeftModel

    from memcli.core import models
    from memcli.training.locality import text_windows, torch_locality

    want = independent_locality(trained / "adapter", text)
    base, tok = models.load_model(models.resolve("tiny"))
    model = PeftModel.from_pretrained(base, trained / "adapter")
    first = json.loads((trained / "summary.json").read_text())["layers"][0]
    assert first > 0  # the default placement: there are layers below the adapter to share
    got = torch_locality(model, text_windows(text, tok), "cpu", first_layer=first)
    assert got["tokens"] == want["tokens"]
    assert got["argmax_agreement"] == pytest.approx(want["argmax_agreement"], abs=0)
    for key in ("kl", "ce_base", "ce_tuned"):
        assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key
