"""Near ties scored as a runner decodes one request, with the runner's attention kernel.

llama.cpp's kernels depend on how many tokens one decode holds, and its flash-attention kernel rounds otherwise
than the plain one: on quantised weights the logits of memcli's packed pass and of a server answering one request
(its prompt in one decode, then one token per decode) differ. The expectation comes from llama-cpp-python's own
`Llama`, evaluating each entry as its server does, with flash attention off as its server has it.
"""

import ctypes
import json

import numpy as np
import pytest
from helpers import assert_refused, run_cli

from memcli.core import corpus, models
from memcli.gguf.base import base_gguf
from memcli.llama.sampler import PRESETS, sampler_from_options
from memcli.llama.scorer import LlamaBackend


@pytest.fixture(scope="module")
def q8_base(tmp_path_factory):
    """The tiny model's base quantised to Q8_0 by llama.cpp's quantiser (rows of 64: whole Q8_0 blocks)."""
    import llama_cpp

    dst = tmp_path_factory.mktemp("q8") / "tiny.q8_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = 7  # Q8_0
    src = base_gguf(models.resolve("tiny"))
    assert llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params)) == 0
    return dst


def one_request_margins(base, adapter, examples) -> np.ndarray:
    """Per answer token, target logit - best other logit, as llama-cpp-python evaluates one request at a time."""
    import llama_cpp
    from llama_cpp import Llama

    llm = Llama(str(base), lora_path=str(adapter) if adapter else None, n_ctx=256, verbose=False, n_threads=1,
                flash_attn=False)
    margins = []
    try:
        for ex in examples:
            llm.reset()
            llm.eval(list(ex.prompt_ids))
            for i, target in enumerate(ex.target_ids):
                last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the last decode's only output row
                row = np.ctypeslib.as_array(last, shape=(llm.n_vocab(),)).astype(np.float64)
                margins.append(row[target] - np.delete(row, target).max())
                if i + 1 < len(ex.target_ids):
                    llm.eval([target])
    finally:
        llm.close()
    return np.array(margins)


def memcli_margins(base, adapter, examples, **options) -> np.ndarray:
    with LlamaBackend(base, adapter, threads=1, **options) as backend:
        backend.open(examples, 2048)
        return np.concatenate([b.stats.margin for b in backend.score(examples, 2048)])


def test_near_ties_are_scored_as_one_request_is_decoded(pb8):
    """The default model as shipped (Q4_1): with every entry below the recheck margin, memcli's statistics are those
    of one request at a time (to float rounding); the packed pass alone is not, so the test can tell."""
    spec = models.resolve("smollm2-135m")
    examples = corpus.load_examples(pb8, models.load_tokenizer(spec))
    expected = one_request_margins(spec.gguf_path, None, examples)
    greedy_off = sampler_from_options("greedy", flash_attn="off")  # llama-cpp-python's kernel, no penalty
    served = memcli_margins(spec.gguf_path, None, examples, sampler=greedy_off, recheck_margin=float("inf"))
    packed = memcli_margins(spec.gguf_path, None, examples, sampler=greedy_off, recheck_margin=0.0)
    assert np.abs(served - expected).max() < 1e-4
    assert np.abs(packed - expected).max() > 0.05


def test_the_attention_kernel_is_the_runners(q8_base, tiny_gguf, pb8, tiny_tokenizer):
    """The flash-attention setting reaches llama.cpp: with it on, the same one-request scoring no longer matches
    `Llama` with it off; llama-cpp-python's preset has it off, as its server does."""
    examples = corpus.load_examples(pb8, tiny_tokenizer)
    expected = one_request_margins(q8_base, tiny_gguf, examples)
    on = memcli_margins(q8_base, tiny_gguf, examples, sampler=sampler_from_options("greedy", flash_attn="on"),
                        recheck_margin=float("inf"))
    assert np.abs(on - expected).max() > 1e-4
    assert PRESETS["llama-cpp-python"].flash_attn == "off"


@pytest.mark.parametrize("args,message", [
    (["--flash-attn", "maybe"], "--flash-attn must be one of auto, off, on"),
    (["--recheck-margin", "-1"], "--recheck-margin must be >= 0"),
])
def test_bad_served_shape_settings_are_refused(pb8, tmp_path, args, message):
    out = tmp_path / "v"
    assert_refused(run_cli("verify", pb8, "--model", "tiny", "--out", out, *args), message)
    assert not out.exists()


def test_verify_reports_the_entries_it_scored_again(tiny_run, pb8, tmp_path):
    """A run's verify with a recheck margin above every entry's: all scored again, the count in report.json."""
    out = tmp_path / "v"
    result = run_cli("verify", pb8, "--lora", tiny_run, "--out", out, "--recheck-margin", "1000")
    assert result.exit_code in (0, 1), result.output
    report = json.loads((out / "report.json").read_text())
    assert report["timings"]["rechecked"] == report["totals"]["entries"] == 8
    assert report["backend"]["recheck_margin"] == 1000
