"""Token checks that every scorer shares: a verdict holds only for the ids it was computed on (docs/method.md §2).

- `check_vocabulary`: every input id (prompt included) inside the model's vocabulary (both backends);
- `tokenization_mismatches`: entries that llama.cpp's own tokenizer splits differently from the ids verified.

(That the base is the one an adapter was trained for is memcli.gguf.fingerprint.check_base.)
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from memcli.core.corpus import chat_prompt
from memcli.core.errors import UserError


def check_vocabulary(examples, n_vocab: int, model: str) -> None:
    """Refuse token ids (prompt or target) outside the model's vocabulary: the tokenizer is not this model's.
    Vectorised over the examples given (a chunk of a streamed corpus); the offending entry is looked up only
    when there is one."""
    examples = list(examples)
    ids = np.fromiter(itertools.chain.from_iterable(ex.input_ids for ex in examples), np.int64)
    if not len(ids) or (ids.min() >= 0 and ids.max() < n_vocab):
        return
    for ex in examples:
        bad = next((t for t in ex.input_ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise UserError(f"corpus line {ex.line}: token id {bad} is outside the vocabulary of {model} ({n_vocab} "
                            "tokens): the tokenizer does not belong to this model")


def _prompt_texts(entries, tokenizer, chat_template: bool, system_prompt: str | None) -> list[str | None]:
    """The text llama.cpp would be prompted with for each entry (None: no key, the prompt is a lone BOS)."""
    return [chat_prompt(tokenizer, e.key, system_prompt) if chat_template else (e.key or None) for e in entries]


def tokenization_mismatches(tokenize: Callable[[str, bool, bool], list[int]], examples, entries, tokenizer,
                            chat_template: bool, eos: bool, prefix_only: bool = False,
                            system_prompt: str | None = None) -> list[int]:
    """Indices of entries that llama.cpp's own tokenizer (`tokenize(text, add_special, parse_special)`) would
    tokenise differently from the ids verified: prompt text + value text against prompt ids + target ids.
    prefix_only: the targets are a prefix of the value (--answer-tokens on one long value)."""
    bad = []
    prompts = _prompt_texts(entries, tokenizer, chat_template, system_prompt)
    for i, (ex, e, prompt) in enumerate(zip(examples, entries, prompts)):
        target = list(ex.target_ids[:-1] if eos else ex.target_ids)
        if prompt is None:
            expected, text, add_special = target, e.value, False
        else:
            expected, text, add_special = [*ex.prompt_ids, *target], prompt + e.value, not chat_template
        ids = tokenize(text, add_special, chat_template)
        if ids[: len(expected)] != expected or (not prefix_only and len(ids) != len(expected)):
            bad.append(i)
    return bad
