"""Functions the tests share (fixtures are in conftest.py): memcli run in-process and as a separate process, the
one way a refusal looks, and the torch references the export tests compare llama.cpp with."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from memcli.core import models
from memcli.core.verdicts import verdicts

DATA = Path(__file__).resolve().parent / "data"  # small copies of the shared formats, always present
SEVEN = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")  # every LoRA-able linear


def run_cli(*args):
    """memcli in-process (fast); returns click's Result with exit_code, stdout and stderr."""
    from memcli.cli.app import app  # the whole command line, imported by the tests that use it

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def run_memcli(*args, timeout=600) -> subprocess.CompletedProcess:
    """memcli as a user runs it: a separate process."""
    return subprocess.run([sys.executable, "-m", "memcli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def start_memcli(*args, **env) -> subprocess.Popen:
    """memcli started as a separate process and left running (stdout and stderr piped as text); `env` adds
    environment variables."""
    def default_sigint():  # a test run started in the background inherits SIGINT ignored; a user's shell does not
        signal.signal(signal.SIGINT, signal.SIG_DFL)

    return subprocess.Popen([sys.executable, "-m", "memcli", *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, **env}, preexec_fn=default_sigint)


def assert_refused(result, *needles):
    """Exit code 2, exactly one error line, mentioning every needle (whitespace-normalised), no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.output)
    assert result.stderr.count("error:") == 1, result.stderr
    assert "Traceback" not in result.output
    error = " ".join(result.stderr[result.stderr.index("error:"):].split())
    for needle in needles:
        assert needle in error, (needle, error)


ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # two trainings at once on a 2-core machine
# A tiny run stopped short of recall on pb8 (some entries exact, some not): train's reference recipe, pinned so
# that a change of train's defaults does not move it.
PARTLY_TRAINED = dict(max_steps=40, lr=0.02, check_every=1000, dropout=0.1, batch_size=16, tail_threshold=0.5)


def wait_for(ready, proc, timeout=300):
    """Poll until ready() while proc runs; fail (with its stderr) if it ends first."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"memcli ended (exit {proc.returncode}) before the moment the test waits for:\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail("timed out")
        time.sleep(0.02)


def phonebook_ids(tokenizer, n=5) -> list[list[int]]:
    rows = [json.loads(line) for line in (DATA / "phonebook_llama_PB1000_head20.jsonl").read_text().splitlines()]
    return [tokenizer(r["query"]).input_ids + tokenizer(" " + r["target"], add_special_tokens=False).input_ids
            for r in rows[:n]]


def log_softmax(x) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def next_token_logprobs(logits, seq) -> np.ndarray:
    """log p(seq[t+1] | seq[:t+1]) for every position."""
    lp = log_softmax(logits)
    return lp[np.arange(len(seq) - 1), seq[1:]]


def max_diff(llama_logits, torch_logprobs, seqs) -> float:
    return max(float(np.abs(next_token_logprobs(a, s) - b).max())
               for a, b, s in zip(llama_logits, torch_logprobs, seqs))


def lora_target(layers, modules) -> str:
    return r".*\.layers\.({})\.(self_attn|mlp)\.({})".format("|".join(map(str, layers)), "|".join(modules))


def make_adapter(spec, out: Path, seqs, seed=0, std=0.3, **lora_kwargs):
    """A PEFT adapter on `spec` with seeded random non-zero A and B, saved to `out`; returns the torch next-token
    log-probabilities of `seqs` with the adapter and without it."""
    from peft import LoraConfig, get_peft_model

    model, _ = models.load_model(spec)
    lora_kwargs.setdefault("target_modules", lora_target((1, 2), SEVEN))
    peft_model = get_peft_model(model, LoraConfig(lora_dropout=0.0, **lora_kwargs))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    peft_model.eval()
    peft_model.save_pretrained(out)
    with torch.no_grad():
        adapted = [next_token_logprobs(peft_model(torch.tensor([s])).logits[0], s) for s in seqs]
        with peft_model.disable_adapter():
            plain = [next_token_logprobs(peft_model(torch.tensor([s])).logits[0], s) for s in seqs]
    return adapted, plain


def collect(backend, examples, batch_tokens):
    """{entry index: (verdict, probabilities)} from a backend's teacher-forced pass."""
    backend.open(examples, batch_tokens)
    result = {}
    for b in backend.score(examples, batch_tokens):
        offset = 0
        for v in verdicts(b.stats, b.targets, b.lengths, b.indices):
            result[v.index] = (v, b.stats.prob[offset: offset + v.answer_tokens].copy())
            offset += v.answer_tokens
    return result
