"""The runner's sampler in the certificate: llama.cpp's penalty arithmetic, each runner's window, and the verdict
under a sampler against what llama-cpp-python itself generates with it.

Expectations come from outside memcli: llama.cpp's own penalties sampler (through llama-cpp-python's C API) on
the same logits, windows worked out by hand, and llama-cpp-python's `Llama.create_completion` generating greedily
with its repeat penalty.
"""

import ctypes
import dataclasses
import json

import numpy as np
import pytest
import yaml
from helpers import assert_refused, run_cli

from memcli.core import models
from memcli.core.corpus import Example
from memcli.core.verdicts import verdicts
from memcli.gguf.base import base_gguf
from memcli.llama.sampler import PRESETS, Sampler, sampler_from_options
from memcli.llama.scorer import LlamaBackend


def llama_cpp_penalised(logits: np.ndarray, history: list[int], s: Sampler) -> np.ndarray:
    """llama.cpp's penalties sampler applied to one logits row after accepting `history` (oldest first)."""
    import llama_cpp

    n = len(logits)
    smpl = llama_cpp.llama_sampler_init_penalties(n, s.repeat_last_n, s.repeat_penalty, s.frequency_penalty,
                                                  s.presence_penalty)
    try:
        for t in history:
            llama_cpp.llama_sampler_accept(smpl, t)
        data = (llama_cpp.llama_token_data * n)()
        for i, x in enumerate(logits.tolist()):
            data[i].id, data[i].logit, data[i].p = i, x, 0.0
        arr = llama_cpp.llama_token_data_array(data, n, -1, False)
        llama_cpp.llama_sampler_apply(smpl, ctypes.byref(arr))
        return np.array([data[i].logit for i in range(n)], np.float32)
    finally:
        llama_cpp.llama_sampler_free(smpl)


@pytest.mark.parametrize("sampler", [
    Sampler("a", repeat_penalty=1.1, repeat_last_n=64),
    Sampler("b", repeat_penalty=1.3, repeat_last_n=5, frequency_penalty=0.4, presence_penalty=0.25),
    Sampler("c", repeat_penalty=0.9, repeat_last_n=3, frequency_penalty=-0.3),
], ids=["default-1.1", "all-three", "short-window"])
def test_penalty_arithmetic_is_llama_cpps_bit_for_bit(sampler):
    rng = np.random.default_rng(0)
    vocab = 97
    prompt = rng.integers(0, vocab, 9).tolist()
    target = rng.integers(0, 12, 14).tolist()  # small ids: repeats, as digits repeat in a phone number
    ex = Example(tuple(prompt), tuple(target), 1)
    logits = rng.normal(0, 3, (len(target), vocab)).astype(np.float32)
    logits[:, 5] = 0.0  # llama.cpp multiplies a logit of 0 (<= 0), it does not divide it
    for in_prompt in (True, False):
        s = Sampler(**{**sampler.describe(), "prompt_in_window": in_prompt})
        ours = logits.copy()
        rows, toks, counts = s.counts(*s.window_pairs([ex]), 0, len(target), vocab)
        s.apply(ours, rows, toks, counts)
        for j in range(len(target)):
            history = prompt + target[:j] if in_prompt else target[:j]
            theirs = llama_cpp_penalised(logits[j], history, s)
            assert np.array_equal(ours[j], theirs), (in_prompt, j)
        assert not np.array_equal(ours, logits)


def test_windows_worked_by_hand():
    ex = Example((1, 2, 3), (3, 4, 3), 1)
    def windows(s):
        rows, toks = s.window_pairs([ex, Example((7,), (8,), 2)])
        return [sorted(toks[rows == r].tolist()) for r in range(4)]
    assert windows(Sampler(repeat_penalty=1.1, repeat_last_n=3)) == [[1, 2, 3], [2, 3, 3], [3, 3, 4], [7]]
    assert windows(Sampler(repeat_penalty=1.1, repeat_last_n=3, prompt_in_window=False)) == [[], [3], [3, 4], []]
    assert windows(Sampler(repeat_penalty=1.1, repeat_last_n=1)) == [[3], [3], [4], [7]]


@pytest.mark.slow  # llama.cpp generation on the tiny model
def test_a_teacher_forced_pass_under_the_sampler_decides_what_llama_cpp_python_generates(tiny_gguf, pb8):
    """llama-cpp-python's own greedy generation with penalties, from the keys of a briefly trained tiny run (it
    answers digits, which repeat) and four digits of its own, fed back as the target, is exact under the same
    sampler with llama-cpp-python's window (the tokens generated so far) at every position, and not with the
    prompt counted as llama.cpp's server counts it; where plain greedy decoding continues differently, the verdict
    without the sampler says so."""
    from llama_cpp import Llama

    base = base_gguf(models.resolve("tiny"))
    penalties = {"repeat_penalty": 1.6, "frequency_penalty": 0.3, "presence_penalty": 0.2}
    sampler = Sampler("test", repeat_last_n=64, prompt_in_window=False, **penalties)
    llm = Llama(str(base), lora_path=str(tiny_gguf), n_ctx=256, verbose=False, n_threads=1)
    keys = [json.loads(line)["query"] for line in pb8.read_text().splitlines()]
    examples, differs = [], 0
    try:
        for i, prompt in enumerate(keys):
            ids = llm.tokenize(prompt.encode(), add_bos=True, special=True)
            gen = llm.generate(ids, temp=0.0, reset=True)
            ids += [next(gen) for _ in range(4)]  # digits in the prompt: counted by llama.cpp's server, not here
            runs = []
            for kwargs in (penalties, {}):
                gen = llm.generate(ids, temp=0.0, reset=True, **kwargs)
                runs.append([next(gen) for _ in range(24)])
            differs += runs[0] != runs[1]
            examples.append(Example(tuple(ids), tuple(runs[0]), i + 1))
    finally:
        llm.close()
    assert differs >= 1  # the penalties changed at least one greedy continuation: the test can tell

    def exact(s):
        with LlamaBackend(base, tiny_gguf, sampler=s, threads=1) as backend:
            backend.open(examples, 2048)
            return [v.exact for b in backend.score(examples, 2048)
                    for v in verdicts(b.stats, b.targets, b.lengths, b.indices)]

    assert exact(sampler) == [True] * len(examples)
    assert not all(exact(dataclasses.replace(sampler, prompt_in_window=True)))  # the window matters
    assert exact(PRESETS["greedy"]).count(False) == differs


@pytest.mark.parametrize("kwargs,message", [
    ({"name": "vllm"}, "--sampler must be one of greedy, llama-cpp-python, llama-server, ollama, lm-studio"),
    ({"repeat_penalty": 0.0}, "--repeat-penalty must be a number above 0"),
    ({"repeat_penalty": float("nan")}, "--repeat-penalty must be a number above 0"),
    ({"repeat_last_n": -1}, "--repeat-last-n must be at least 0"),
    ({"frequency_penalty": float("inf")}, "--frequency-penalty must be a finite number"),
    ({"presence_penalty": float("nan")}, "--presence-penalty must be a finite number"),
    ({"flash_attn": "yes"}, "--flash-attn must be one of auto, off, on"),
])
def test_bad_sampler_settings_are_refused(kwargs, message):
    from memcli.core.errors import UserError

    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        sampler_from_options(**kwargs)


def test_preset_with_overrides():
    s = sampler_from_options("ollama", repeat_last_n=8, presence_penalty=0.5)
    assert (s.repeat_penalty, s.repeat_last_n, s.presence_penalty, s.prompt_in_window) == (1.1, 8, 0.5, True)
    assert not sampler_from_options("llama-server").active  # llama.cpp's server defaults to 1.0: plain greedy


@pytest.mark.parametrize("args,message", [
    (["--sampler", "vllm"], "--sampler must be one of"),
    (["--repeat-penalty", "0"], "--repeat-penalty must be a number above 0"),
    (["--repeat-last-n", "-1"], "--repeat-last-n must be at least 0"),
    (["--frequency-penalty", "nan"], "--frequency-penalty must be a finite number"),
    (["--sampler", "ollama", "--backend", "torch", "--generate", "2"], "--generate with --sampler runs in llama.cpp"),
])
def test_verify_refuses_bad_sampler_settings_in_one_line(pb8, tmp_path, args, message):
    out = tmp_path / "v"
    assert_refused(run_cli("verify", pb8, "--model", "tiny", "--out", out, *args), message)
    assert not out.exists()


def test_verify_under_a_sampler_reports_it_and_generation_agrees(tiny_run, pb8, tmp_path):
    """verify --sampler: the report names the sampler, and real greedy generation with the same penalties (the
    scorer's own decode loop) agrees with the teacher-forced verdicts on every entry."""
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--lora", tiny_run, "--out", out, "--sampler", "llama-cpp-python",
                     "--repeat-penalty", "1.5", "--generate", "8", "--threads", "1", "--min-exact", "0")
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    s = report["settings"]["sampler"]
    assert (s["repeat_penalty"], s["repeat_last_n"], s["prompt_in_window"]) == (1.5, 64, False)
    assert s["name"].startswith("llama-cpp-python")
    assert "verdicts under the sampler llama-cpp-python" in result.stdout
    assert report["generation"]["entries"] == 8 and report["generation"]["disagreements"] == []
    plain = run_cli("verify", pb8, "--lora", tiny_run, "--out", tmp_path / "plain", "--threads", "1",
                    "--min-exact", "0")
    assert plain.exit_code == 0, plain.output
    greedy = json.loads((tmp_path / "plain" / "report.json").read_text())["totals"]
    assert greedy["exact"] != report["totals"]["exact"]  # the penalty changed verdicts: generation had to follow


def test_the_training_objective_sees_the_runners_logits(tiny_tokenizer, pb8):
    """forward.answer_ce with a sampler: each answer token's CE is the larger of plain greedy's and the penalised
    one, the penalised logits computed here by the arithmetic checked against llama.cpp above (numpy), from the
    same model's logits."""
    import torch

    from memcli.core.corpus import load_examples
    from memcli.training import forward

    model, _ = models.load_model(models.resolve("tiny"))
    examples = load_examples(pb8, tiny_tokenizer)[:3]
    examples = [Example(ex.prompt_ids + ex.target_ids[:4], ex.target_ids[4:] * 2, ex.line) for ex in examples]
    sampler = Sampler("x", repeat_penalty=1.7, repeat_last_n=12, frequency_penalty=0.3, presence_penalty=0.1)
    batch = forward.collate(examples, 0, "cpu", sampler=sampler)
    with torch.no_grad():
        ce, correct, margin = forward.answer_ce(model, batch, sampler)
        logits = forward.answer_logits(model, batch)[batch.mask].numpy()
    targets = batch.targets[batch.mask].numpy()
    penalised = logits.copy()
    sampler.penalise(penalised, examples)
    assert not np.allclose(penalised, logits)

    def token_ce(rows):
        rows = rows.astype(np.float64)
        top = rows.max(1, keepdims=True)
        return np.log(np.exp(rows - top).sum(1)) + top[:, 0] - rows[np.arange(len(rows)), targets]

    want = np.maximum(token_ce(logits), token_ce(penalised))
    assert np.allclose(ce[batch.mask].numpy(), want, atol=1e-4)
    assert (token_ce(penalised) > token_ce(logits) + 1e-3).any()  # the runner's side decided some tokens


@pytest.mark.slow  # training to certified recall
def test_train_for_a_sampler_certifies_under_it_and_under_greedy(pb8, tmp_path):
    """train --until-recall --sampler: certified under the runner's penalties and under plain greedy; verify
    defaults to the run's sampler, and llama.cpp agrees under both."""
    run = tmp_path / "run"
    result = run_cli("train", pb8, "--out", run, "--model", "tiny", "--until-recall", "--sampler", "llama-cpp-python",
                     "--max-steps", "600")
    assert result.exit_code == 0, result.output
    summary = json.loads((run / "summary.json").read_text())
    assert summary["all_certified"]
    assert yaml.safe_load((run / "config.yaml").read_text())["settings"]["sampler"] == "llama-cpp-python"
    for args, name in (([], "llama-cpp-python"), (["--sampler", "greedy"], "greedy")):
        out = tmp_path / name
        v = run_cli("verify", pb8, "--lora", run, "--out", out, "--threads", "1", *args)
        assert v.exit_code == 0, v.output
        report = json.loads((out / "report.json").read_text())
        assert report["settings"]["sampler"]["name"].startswith(name)
        assert report["totals"]["exact"] == 8
