"""Generated PhoneBooks of any size for the benchmarks, written in slices (never held whole)."""

from __future__ import annotations

import json
from pathlib import Path

from memcli.core import corpus
from memcli.core.datagen import generate_phonebook

CAPACITY = 46_600  # distinct names the PhoneBook generator has


def write_phonebook(path: Path, entries: int, seed: int = 1) -> None:
    """A generated PhoneBook of `entries` entries. Beyond the generator's capacity (46,600 names) the names
    repeat with a round number in the key ("Ada Lovelace 2:"), so keys stay unique."""
    import random

    rows = generate_phonebook(min(entries, CAPACITY), seed=seed)
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, entries, 10_000):
            out = []
            for i in range(start, min(start + 10_000, entries)):
                row = rows[i % len(rows)]
                if i >= len(rows):
                    row = {"query": f"{row['query'][:-1]} {i // len(rows) + 1}:",
                           "target": str(rng.randint(6, 9)) + "".join(str(rng.randint(0, 9)) for _ in range(9))}
                out.append(json.dumps(row) + "\n")
            f.write("".join(out))


def phonebook_examples(entries: int, tokenizer, chat_template: bool = False) -> list:
    """A generated PhoneBook of `entries` entries, tokenised as `train` and `verify` read it."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "pb.jsonl"
        write_phonebook(path, entries)
        return corpus.load_examples(path, tokenizer, chat_template=chat_template)
