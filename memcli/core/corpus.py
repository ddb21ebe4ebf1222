"""Corpora: reading every supported format and the one tokenisation every stage shares.

A corpus is a list of (key, value) entries. Accepted, as users bring them:
- JSONL with one object per line holding one of the field pairs in FIELD_PAIRS;
- a plain .txt file: one value (the whole file) under the key given with --key (default: empty).
"""

from __future__ import annotations

import codecs
import json
from array import array
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memcli.core.errors import UserError

# (key field, value field), in the order they are looked for.
FIELD_PAIRS = (("query", "target"), ("question", "matching"), ("prompt", "completion"), ("key", "value"))
LEGACY_SYSTEM_PROMPT = "You are a helpful assistant."  # what --chat-template sent before --system-prompt existed
CHUNK = 4096  # entries read and tokenised at a time when a corpus is streamed


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
    entries = list(iter_entries(path, key))
    if not entries:
        raise UserError(f"corpus {path} is empty")
    if not allow_conflicting_keys:
        check_conflicting_keys(entries, path)
    return entries


def iter_entries(path: str | Path, key: str = "") -> Iterator[Entry]:
    """The entries of a corpus file, one at a time (a JSONL corpus is read line by line: memory stays flat)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"corpus {path} does not exist")
    if path.suffix == ".txt":
        data = path.read_bytes()
        bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0  # Windows editors write one
        try:
            text = data[bom:].decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"corpus {path} is not UTF-8 text ({e.reason} at byte {bom + e.start})") from None
        if text.strip():
            yield Entry(key, text, 1)
        return
    offset = 0
    with open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            bom = len(codecs.BOM_UTF8) if n == 1 and raw.startswith(codecs.BOM_UTF8) else 0
            try:
                line = raw[bom:].decode("utf-8")
            except UnicodeDecodeError as e:
                at = offset + bom + e.start
                raise UserError(f"corpus {path} is not UTF-8 text ({e.reason} at byte {at})") from None
            offset += len(raw)
            if line.strip():
                yield _parse_line(path, n, line)


@dataclass(frozen=True)
class CorpusScan:
    """What one streaming pass over a corpus file established before any model loads: every line parses, no
    key has two values (unless allowed), and how many entries there are."""

    path: Path
    key: str
    entries: int


def scan_corpus(path: str | Path, key: str = "", allow_conflicting_keys: bool = False) -> CorpusScan:
    """read_corpus's checks in one streaming pass; memory grows by 24 bytes per entry (the conflict digests)."""
    digests = _Digests()
    for e in iter_entries(path, key):
        digests.add(e)
    if not digests.count:
        raise UserError(f"corpus {path} is empty")
    if not allow_conflicting_keys:
        digests.check(path, lambda: iter_entries(path, key))
    return CorpusScan(Path(path), key, digests.count)


class _Digests:
    """64-bit digests of each entry's key and value (Python's string hash, stable within a process) in compact
    arrays: 16 bytes per entry, plus 8 for the sort when checked."""

    def __init__(self):
        self.keys, self.values, self.count = array("q"), array("q"), 0

    def add(self, e: Entry) -> None:
        self.keys.append(hash(e.key))
        self.values.append(hash(e.value))
        self.count += 1

    def candidate(self) -> tuple[int, int] | None:
        """(first, other) entry indices: the earliest entry whose key was seen before with another value, and
        that key's first entry (digests only)."""
        if self.count < 2:
            return None
        keys, values = np.frombuffer(self.keys, np.int64), np.frombuffer(self.values, np.int64)
        order = np.argsort(keys, kind="stable")  # within a key, entry order
        k, v = keys[order], values[order]
        starts = np.r_[True, k[1:] != k[:-1]]
        first = np.maximum.accumulate(np.where(starts, np.arange(self.count), 0))
        bad = np.flatnonzero(v != v[first])
        if not len(bad):
            return None
        j = bad[np.argmin(order[bad])]
        return int(order[first[j]]), int(order[j])

    def check(self, path, reread) -> None:
        found = self.candidate()
        if found is None:
            return
        first, other = found
        pair = [e for i, e in enumerate(reread()) if i in (first, other)]
        if len(pair) == 2 and pair[0].key == pair[1].key and pair[0].value != pair[1].value:
            _conflict(path, *pair)
        check_conflicting_keys(reread(), path)  # a 64-bit digest collision (never seen): the exact check


def check_conflicting_keys(entries: Iterable[Entry], path: str | Path) -> None:
    """Refuse the same key with two different values (the first such pair, by line). Exact, with a dict of
    every key: `scan_corpus` uses digests instead and comes here only to rule out a digest collision."""
    first: dict[str, Entry] = {}
    for e in entries:
        seen = first.setdefault(e.key, e)
        if seen.value != e.value:
            _conflict(path, seen, e)


def _conflict(path, seen: Entry, e: Entry) -> None:
    raise UserError(f"{path}:{seen.line} and {path}:{e.line}: the key {e.key!r} has two different values, "
                    "which greedy decoding can never both recall; remove one, or pass "
                    "--allow-conflicting-keys to train (and verify) anyway")


def json_object(path: Path, n: int, line: str) -> dict:
    """Line n of a JSONL file as the object it must be (UserError naming the line otherwise)."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{n}: malformed JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}:{n}: expected a JSON object, got {type(obj).__name__}")
    return obj


def _parse_line(path: Path, n: int, line: str) -> Entry:
    obj = json_object(path, n, line)
    for k, v in FIELD_PAIRS:
        if k in obj and v in obj:
            if not isinstance(obj[k], str) or not isinstance(obj[v], str):
                raise UserError(f"{path}:{n}: fields '{k}' and '{v}' must be strings")
            if not obj[v]:
                raise UserError(f"{path}:{n}: field '{v}' is empty")
            return Entry(obj[k], obj[v], n)
    wanted = " or ".join(f'"{k}"+"{v}"' for k, v in FIELD_PAIRS)
    raise UserError(f"{path}:{n}: missing fields: expected {wanted}, found {sorted(obj)}")


def chat_prompt(tokenizer, key: str, system_prompt: str | None = None) -> str:
    """The text a chat request for `key` is rendered to, as runners render it (llama-cpp-python's server, ollama,
    llama-server: the model's own template with the generation prompt): the key as the user's message, after
    `system_prompt` as a system message, or with none (the template's own default applies, as for a client that
    sends no system message)."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt is not None else []
    return tokenizer.apply_chat_template([*system, {"role": "user", "content": key}], add_generation_prompt=True,
                                         tokenize=False)


def system_prompt_of(settings: dict) -> str | None:
    """The system prompt a run rendered its chat keys with: its setting; a chat run made before the setting
    existed sent LEGACY_SYSTEM_PROMPT; otherwise none."""
    if "system_prompt" in settings:
        return settings["system_prompt"]
    return LEGACY_SYSTEM_PROMPT if settings.get("chat_template") else None


def end_of_turn(tokenizer) -> int:
    """The token that ends an assistant's reply in the chat template (what a runner stops at: <|im_end|>,
    <|eot_id|>, <end_of_turn>, ...), else EOS."""
    marker = "MEMCLI-VALUE"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "k"}, {"role": "assistant", "content": marker}],
                                         tokenize=False)
    after = text[text.rindex(marker) + len(marker):] if marker in text else ""
    ids = tokenizer(after, add_special_tokens=False).input_ids if after.strip() else []
    special = set(getattr(tokenizer, "all_special_ids", []))
    return ids[0] if ids and ids[0] in special else tokenizer.eos_token_id


def tokenize(entries: list[Entry], tokenizer, chat_template: bool = False, eos: bool = False,
             system_prompt: str | None = None) -> list[Example]:
    """Prompt ids then value ids; labels go on the value ids (plus the end token when eos=True).

    Raw (default): the key is tokenised as the tokenizer does by default (BOS where the model uses one), the
    value without special tokens, EOS after it with eos. With chat_template the key becomes the user turn of the
    model's chat template as a runner renders a chat request (`chat_prompt`), the value is the assistant's reply
    and eos ends it with the template's end-of-turn token, where a runner stops.
    """
    if eos and tokenizer.eos_token_id is None:
        raise UserError("--eos: the model's tokenizer has no EOS token")
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise UserError("--chat-template: the model's tokenizer has no chat template")
    entries = list(entries)
    if chat_template:  # rendered one by one, tokenised in one call as apply_chat_template(tokenize=True) does
        texts = [chat_prompt(tokenizer, e.key, system_prompt) for e in entries]
        keyed, special = list(range(len(entries))), {"add_special_tokens": False}
    else:
        keyed, special = [i for i, e in enumerate(entries) if e.key], {}
        texts = [e.key for e in entries]
    prompts = [[] for _ in entries]
    for i, ids in zip(keyed, _ids(tokenizer, [texts[i] for i in keyed], **special)):
        prompts[i] = ids
    # A value's ids are those it has after its prompt in the text a runtime tokenises (prompt text + value):
    # a SentencePiece tokenizer starts a value tokenised alone with a "▁" that the joined text lacks. Where the
    # joined ids begin with the prompt's ids, the rest are the value's; otherwise (and without a prompt) the
    # value's own ids.
    targets: list[list[int] | None] = [None] * len(entries)
    for i, joined in zip(keyed, _ids(tokenizer, [texts[i] + entries[i].value for i in keyed], **special)):
        n = len(prompts[i])
        if len(joined) > n and joined[:n] == prompts[i]:
            targets[i] = joined[n:]
    alone = [i for i, t in enumerate(targets) if t is None]
    for i, ids in zip(alone, _ids(tokenizer, [entries[i].value for i in alone], add_special_tokens=False)):
        targets[i] = ids
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    stop = end_of_turn(tokenizer) if chat_template and eos else tokenizer.eos_token_id
    examples = []
    for e, prompt, target in zip(entries, prompts, targets):
        if eos:
            target = [*target, stop]
        if not prompt:  # the first value token needs something to be predicted from
            prompt = [start]
        examples.append(Example(tuple(prompt), tuple(target), e.line))
    return examples


def _ids(tokenizer, texts: list[str], **kwargs) -> list[list[int]]:
    """The ids of each text: one batched call (a fast tokenizer gives each text the ids a call on it alone
    gives)."""
    return tokenizer(texts, **kwargs).input_ids if texts else []


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


def iter_prepared(scan: CorpusScan, tokenizer, *, chat_template=False, eos=False, answer_tokens=None, n_ctx=None,
                  chunk: int = CHUNK, system_prompt: str | None = None) -> Iterator[tuple[list[Entry], list[Example]]]:
    """`prepare` streamed: (entries, examples) in chunks of `chunk` entries, read, tokenised, selected and
    checked chunk by chunk, so memory does not grow with the corpus. The same ids `prepare` gives."""
    if answer_tokens is not None and answer_tokens < 1:
        raise UserError(f"--answer-tokens must be at least 1, got {answer_tokens}")
    total, buffer = 0, []

    def flush(batch):
        nonlocal total
        examples = tokenize(batch, tokenizer, chat_template, eos, system_prompt)
        if answer_tokens is not None and scan.entries == 1:
            examples = select_prefix(examples, answer_tokens)
        elif answer_tokens is not None:
            if total == 0 and len(examples[0].target_ids) > answer_tokens:
                select_prefix(examples, answer_tokens)  # raises, naming the first entry's length
            keep = 0
            for ex in examples:
                if total + len(ex.target_ids) > answer_tokens:
                    break
                total += len(ex.target_ids)
                keep += 1
            examples = examples[:keep]
        if n_ctx is not None:
            check_context(examples, n_ctx, scan.path)
        return batch[: len(examples)], examples

    for e in iter_entries(scan.path, scan.key):
        buffer.append(e)
        if len(buffer) == chunk:
            entries, examples = flush(buffer)
            if entries:
                yield entries, examples
            if len(examples) < len(buffer):  # --answer-tokens reached
                return
            buffer = []
    if buffer:
        entries, examples = flush(buffer)
        if entries:
            yield entries, examples


def prepare(entries: list[Entry], tokenizer, *, chat_template=False, eos=False, answer_tokens=None, n_ctx=None,
            path="corpus", system_prompt: str | None = None) -> list[Example]:
    """Tokenise, select the prefix and check the context: the one tokenisation train and verify share."""
    examples = select_prefix(tokenize(entries, tokenizer, chat_template, eos, system_prompt), answer_tokens)
    if n_ctx is not None:
        check_context(examples, n_ctx, path)
    return examples


def load_examples(path, tokenizer, *, key="", allow_conflicting_keys=False, **options) -> list[Example]:
    """read_corpus then prepare."""
    return prepare(read_corpus(path, key, allow_conflicting_keys), tokenizer, path=path, **options)
