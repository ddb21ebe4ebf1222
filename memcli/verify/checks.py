"""Input checks of `memcli verify` that the orchestration and the backends share: a verdict holds only for the
ids it was computed on, with the base the adapter was trained for (docs/method.md §2).

- `check_vocabulary`: every input id (prompt included) inside the model's vocabulary (both backends);
- `base_fingerprint` / `check_base`: the base is the model the adapter records (the torch backend's counterpart
  of the GGUF pairing check that the llama backend gets from `check_pair`);
- `tokenization_mismatches`: entries that llama.cpp's own tokenizer splits differently from the ids verified.

Nothing here imports the orchestration (run.py) or a backend.
"""

from __future__ import annotations

import itertools
from typing import Callable

import numpy as np

from ..errors import UserError


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


def base_fingerprint(spec):
    """The fingerprint (memcli.gguf.fingerprint.Fingerprint) of a model as a base: from its GGUF when it comes as
    one (no dequantising), else from its HF folder. The two agree for the same base."""
    from .. import models
    from ..gguf.fingerprint import gguf_fingerprint, hf_fingerprint

    return gguf_fingerprint(spec.gguf_path) if spec.gguf_path is not None else hf_fingerprint(models.hf_dir(spec))


def check_base(recorded, spec, adapter) -> None:
    """Refuse a base other than the one the adapter was trained for (the torch backend's counterpart of
    memcli.gguf.adapter.check_pair). recorded: `memcli.verify.sources.recorded_base`'s answer, None to skip."""
    if recorded is None:
        return
    ours, trained_for = recorded
    theirs = base_fingerprint(spec)
    if not ours.matches(theirs):
        raise UserError(f"adapter {adapter} was trained for {trained_for}, base {spec.name} is another model "
                        f"(fingerprint {ours} vs {theirs})")


def _prompt_texts(entries, tokenizer, chat_template: bool) -> list[str | None]:
    """The text llama.cpp would be prompted with for each entry (None: no key, the prompt is a lone BOS)."""
    from ..corpus import SYSTEM_PROMPT

    texts = []
    for e in entries:
        if chat_template:
            messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": e.key}]
            texts.append(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        else:
            texts.append(e.key or None)
    return texts


def tokenization_mismatches(tokenize: Callable[[str, bool, bool], list[int]], examples, entries, tokenizer,
                            chat_template: bool, eos: bool, prefix_only: bool = False) -> list[int]:
    """Indices of entries that llama.cpp's own tokenizer (`tokenize(text, add_special, parse_special)`) would
    tokenise differently from the ids verified: prompt text + value text against prompt ids + target ids.
    prefix_only: the targets are a prefix of the value (--answer-tokens on one long value)."""
    bad = []
    for i, (ex, e, prompt) in enumerate(zip(examples, entries, _prompt_texts(entries, tokenizer, chat_template))):
        target = list(ex.target_ids[:-1] if eos else ex.target_ids)
        if prompt is None:
            expected, text, add_special = target, e.value, False
        else:
            expected, text, add_special = [*ex.prompt_ids, *target], prompt + e.value, not chat_template
        ids = tokenize(text, add_special, chat_template)
        if ids[: len(expected)] != expected or (not prefix_only and len(ids) != len(expected)):
            bad.append(i)
    return bad
