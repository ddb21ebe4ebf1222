"""Corpora: reading every supported format and the one tokenisation every stage shares.

A corpus is a list of (key, value) entries. Accepted, as users bring them:
- JSONL with one object per line holding one of the field pairs in FIELD_PAIRS;
- a plain .txt file: one value (the whole file) under the key given with --key (default: empty).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

# (key field, value field), in the order they are looked for.
FIELD_PAIRS = (("query", "target"), ("question", "matching"), ("prompt", "completion"), ("key", "value"))
SYSTEM_PROMPT = "You are a helpful assistant."


@dataclass(frozen=True)
class Entry:
    key: str
    value: str
    line: int  # 1-based line of the corpus file it came from (1 for .txt)


@dataclass(frozen=True)
class Example:
    """One tokenised entry: the prompt conditions, the target ids carry the labels."""

    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    line: int

    @property
    def input_ids(self) -> list[int]:
        return [*self.prompt_ids, *self.target_ids]

    def __len__(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def read_corpus(path: str | Path, key: str = "", allow_conflicting_keys: bool = False) -> list[Entry]:
    """The entries of a corpus file. The same key twice with different values can never be recalled (greedy
    decoding gives one answer per prompt), so it is refused, naming both lines, unless allow_conflicting_keys;
    the same key with the same value again is fine."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.suffix == ".txt":
        entries = [Entry(key, text, 1)] if text.strip() else []
    else:
        entries = [_parse_line(path, n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not entries:
        raise UserError(f"corpus {path} is empty")
    if not allow_conflicting_keys:
        check_conflicting_keys(entries, path)
    return entries


def check_conflicting_keys(entries: list[Entry], path: str | Path) -> None:
    """Refuse the same key with two different values (the first such pair, by line)."""
    first: dict[str, Entry] = {}
    for e in entries:
        seen = first.setdefault(e.key, e)
        if seen.value != e.value:
            raise UserError(f"{path}:{seen.line} and {path}:{e.line}: the key {e.key!r} has two different values, "
                            "which greedy decoding can never both recall; remove one, or pass "
                            "--allow-conflicting-keys to train (and verify) anyway")


def _parse_line(path: Path, n: int, line: str) -> Entry:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    for k, v in FIELD_PAIRS:
        if k in obj and v in obj:
            if not isinstance(obj[k], str) or not isinstance(obj[v], str):
                raise UserError(f"{path}:{n}: fields '{k}' and '{v}' must be strings")
            if not obj[v]:
                raise UserError(f"{path}:{n}: field '{v}' is empty")
            return Entry(obj[k], obj[v], n)
    wanted = " or ".join(f'"{k}"+"{v}"' for k, v in FIELD_PAIRS)
    raise UserError(f"{path}:{n}: missing fields: expected {wanted}, found {sorted(obj)}")


def tokenize(entries: list[Entry], tokenizer, chat_template: bool = False, eos: bool = False,
             system_prompt: str = SYSTEM_PROMPT) -> list[Example]:
    """Prompt ids then value ids; labels go on the value ids (plus EOS when eos=True).

    Raw (default): the key is tokenised as the tokenizer does by default (BOS where the model uses one), the
    value without special tokens. With chat_template the key becomes the user turn of the model's chat template
    (with the system prompt, generation prompt added) and the value is the assistant's reply.
    """
    if eos and tokenizer.eos_token_id is None:
        raise UserError("--eos: the model's tokenizer has no EOS token")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template: the model's tokenizer has no chat template")
    examples = []
    for e in entries:
        if chat_template:
            messages = [{"role": "system", "content": system_prompt}, {"role": "user", "content": e.key}]
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
            if isinstance(prompt, dict) or hasattr(prompt, "input_ids"):
                prompt = prompt["input_ids"]
        else:
            prompt = tokenizer(e.key).input_ids if e.key else []
        target = tokenizer(e.value, add_special_tokens=False).input_ids
        if eos:
            target = [*target, tokenizer.eos_token_id]
        if not prompt:  # the first value token needs something to be predicted from
            start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            prompt = [start]
        examples.append(Example(tuple(prompt), tuple(target), e.line))
    return examples


def select_prefix(examples: list[Example], answer_tokens: int | None) -> list[Example]:
    """The first l answer tokens: whole entries while their answer tokens sum to at most l (many entries), or
    the first l target tokens of the value (one entry). None keeps everything."""
    if answer_tokens is None:
        return examples
    if answer_tokens < 1:
        raise UserError(f"--answer-tokens must be at least 1, got {answer_tokens}")
    if len(examples) == 1:
        ex = examples[0]
        return [Example(ex.prompt_ids, ex.target_ids[:answer_tokens], ex.line)]
    chosen, total = [], 0
    for ex in examples:
        if total + len(ex.target_ids) > answer_tokens:
            break
        chosen.append(ex)
        total += len(ex.target_ids)
    if not chosen:
        raise UserError(
            f"--answer-tokens {answer_tokens} is smaller than the first entry's {len(examples[0].target_ids)} tokens"
        )
    return chosen


def answer_tokens(examples: list[Example]) -> int:
    return sum(len(ex.target_ids) for ex in examples)


def check_context(examples: list[Example], n_ctx: int, path: str | Path) -> None:
    for ex in examples:
        if len(ex) > n_ctx:
            raise UserError(
                f"{path}:{ex.line}: the entry is {len(ex)} tokens, longer than the model's context of {n_ctx} "
                "(use --answer-tokens to memorise a prefix)"
            )


def prepare(entries: list[Entry], tokenizer, *, chat_template=False, eos=False, answer_tokens=None, n_ctx=None,
            path="corpus") -> list[Example]:
    """Tokenise, select the prefix and check the context: the one tokenisation train and verify share."""
    examples = select_prefix(tokenize(entries, tokenizer, chat_template, eos), answer_tokens)
    if n_ctx is not None:
        check_context(examples, n_ctx, path)
    return examples


def load_examples(path, tokenizer, *, key="", allow_conflicting_keys=False, **options) -> list[Example]:
    """read_corpus then prepare."""
    return prepare(read_corpus(path, key, allow_conflicting_keys), tokenizer, path=path, **options)
