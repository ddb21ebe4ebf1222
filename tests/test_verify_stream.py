"""`memcli verify` at scale, on the tiny model: a corpus streamed in chunks gives the report a whole corpus gives,
batches are planned as the stream is pulled, and a prompt prefix the entries share is decoded once without
changing verdicts or probabilities."""


import numpy as np
import pytest
from helpers import collect

from memcli.core import corpus, models
from memcli.core.batching import iter_groups, plan_batches


def test_groups_are_planned_as_the_stream_is_pulled():
    lengths = [3, 5, 2, 7, 1, 4, 4, 9]
    pulled = []

    def stream():
        for n in lengths:
            pulled.append(n)
            yield n

    groups = iter_groups(stream(), int, 8)
    start, first = next(groups)
    assert (start, first) == (0, [3, 5]) and pulled == [3, 5, 2]  # one item beyond the group, no more
    rest = [(s, s + len(g)) for s, g in groups]
    assert [(0, 2), *rest] == plan_batches(lengths, 8) == [(0, 2), (2, 3), (3, 5), (5, 7), (7, 8)]


@pytest.fixture(scope="module")
def chat_examples(pb8, tiny_tokenizer):
    return corpus.load_examples(pb8, tiny_tokenizer, chat_template=True)


@pytest.mark.slow  # a chat-template corpus in llama.cpp, twice
def test_a_shared_prompt_prefix_changes_no_verdict_or_probability(tiny_gguf, chat_examples):  # noqa: F811
    from memcli.gguf.base import base_gguf
    from memcli.llama.scorer import LlamaBackend

    results, shared = {}, {}
    # (share, batch tokens): packed, one entry per batch (llama.cpp's own batch-size noise), packed and shared
    for share, batch_tokens in ((False, 2048), (False, 60), (True, 2048)):
        backend = LlamaBackend(base_gguf(models.resolve("tiny")), tiny_gguf, threads=1, kv_type="f32",
                               share_prefix=share)
        try:
            results[share, batch_tokens] = collect(backend, chat_examples, batch_tokens)
            shared[share, batch_tokens] = backend.timings.get("shared_prefix_tokens", 0)
        finally:
            backend.close()
    # the system prompt and the user turn's opening, decoded once instead of 8 times
    prefix = next(i for i, (a, b) in enumerate(zip(chat_examples[0].prompt_ids, chat_examples[1].prompt_ids))
                  if a != b)
    assert prefix >= 10 and shared[True, 2048] == prefix * (len(chat_examples) - 1)
    assert shared[False, 2048] == shared[False, 60] == 0
    reference = results[False, 2048]

    def deviation(key):
        return max(np.abs(results[key][i][1] - p).max() for i, (_, p) in reference.items())

    for i, (v, p) in reference.items():
        w = results[True, 2048][i][0]
        assert (v.exact, v.certified, v.first_failure, v.sub_threshold, v.predicted) == \
            (w.exact, w.certified, w.first_failure, w.sub_threshold, w.predicted)
    # with the adapter, llama.cpp's logits move by ~5e-4 in p with the batch's size alone (a float32 base
    # without adapter: ~1e-6); sharing the prefix moves them no more than that
    assert deviation((True, 2048)) <= max(1e-4, 2 * deviation((False, 60))) < 3e-3
