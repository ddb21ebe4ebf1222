"""Locality: what memorising cost the model everywhere else (docs/locality.md).

The base model and the tuned one (base + adapter, or a merged model) are run teacher-forced over the same text,
cut into windows of WINDOW tokens; at every position that predicts a next token the two logits rows are compared:

- `argmax_agreement`: the share of positions where both would pick the same greedy next token (EasyEdit's
  locality measure; ties go to the lowest token id, as llama.cpp's greedy sampler picks);
- `kl`: the mean KL(base || tuned) in nats per token (what `llama-perplexity --kl-divergence` reports);
- `ce_base`, `ce_tuned`: the mean cross-entropy of the text's own next tokens under each;
- `tokens`: the positions compared.

The rows are reduced by the native kernel (`memcli.core.scoring.score_logits` for argmax and CE, `kl_logits` for the
KL). This module owns the text (a file, checked and cut into windows, or the default reference), the running
totals, and the torch pass (the adapter switched off for the base: no second copy of the weights). The llama.cpp
pass is `memcli.commands.verify.base_vs_tuned`.

The default reference text is no one's prose: the base model's own sampled continuations of short, varied
prompts, generated once per base model and cached, so that locality measures "what the model did before". Its
windows alternate between two halves: the even ones are measured, the odd ones are the default replay text of
`memcli train --preserve` (so the figures `train` records are not measured on the text it was kept close on).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from memcli.core import models
from memcli.core.corpus import Example
from memcli.core.errors import UserError
from memcli.core.models import cache_dir
from memcli.core.runs import write_json
from memcli.core.scoring import kl_logits, score_logits

WINDOW = 128  # tokens per window; each window's first token predicts nothing, the other 127 are compared
REFERENCE_VERSION = 1  # bump when the prompts or the sampling below change
# Short, varied openings (stories, instructions, code, facts, letters, dialogue...): the base model writes the rest.
REFERENCE_PROMPTS = (
    "Once upon a time", "The best way to learn a new language is", "def parse_config(path):",
    "Dear Sir or Madam,", "In 1850, the city of", "The recipe calls for", "Q: Why is the sky blue?\nA:",
    "The main causes of inflation are", "import numpy as np\n", "She opened the door and", "Step 1:",
    "The theory of evolution", "Here is a short poem about the sea:\n", "The meeting was scheduled for",
    "To install the package, run", "My favourite book is", "The mitochondria is", "Breaking news:",
    "The following table shows", "In conclusion,", "How do I reset my password?", "The train left the station",
    "SELECT name, age FROM", "Photosynthesis converts", "The football match ended", "A good night's sleep",
    "The history of the Roman Empire", "Thank you for your email.", "The algorithm works as follows:",
    "It was a cold winter morning", "User: Can you help me write a cover letter?\nAssistant:",
    "The weather forecast for tomorrow", "Chapter 1\n\n", "The company reported quarterly earnings",
    "for i in range(10):", "Water boils at", "The museum's new exhibition", "Tips for saving money:",
    "The children played in the garden", "According to the study,", "The pilot announced that",
    "function add(a, b) {", "The ancient Egyptians built", "If you are feeling stressed,",
    "The election results showed", "My grandmother used to say", "The robot looked at", "Volcanoes form when",
)
SAMPLING = {"temperature": 0.8, "top_k": 50}  # softmax(logits / temperature) over the top_k tokens
REFERENCE_SEED = 0
PARTS = ("measure", "preserve")


# --- the text ------------------------------------------------------------------------------------------------

def read_text(path, what: str = "--locality") -> str:
    """A UTF-8 text file's content, or UserError in one line: missing, empty, binary or not UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path}: no such file" if not path.exists() else f"{what} {path} is not a file")
    try:
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"{what} {path}: cannot be read ({e.strerror or e})") from None
    if not data.strip():
        raise UserError(f"{what} {path} is empty")
    if b"\0" in data:
        raise UserError(f"{what} {path} is binary (it holds NUL bytes), not text")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"{what} {path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    control = sum(1 for c in text if unicodedata.category(c) in ("Cc", "Cs", "Co") and c not in "\n\r\t\f\v")
    if control > 0.01 * len(text):
        raise UserError(f"{what} {path} does not look like text ({control} control characters in {len(text)})")
    return text


def text_windows(path, tokenizer, window: int = WINDOW, what: str = "--locality") -> list[list[int]]:
    """The text's token ids (no special tokens added) in consecutive windows of `window` tokens (a remainder
    shorter than a window is left out); UserError when the text holds less than one window."""
    text = read_text(path, what)
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if len(ids) < window:
        raise UserError(f"{what} {path}: {len(ids)} tokens, shorter than one window of {window} tokens")
    return [list(ids[i: i + window]) for i in range(0, len(ids) - window + 1, window)]


def as_examples(windows: list[list[int]]):
    """Each window as an Example whose first token is the prompt and whose other tokens are the targets, so the
    verify backends' teacher-forced passes give the logits of every position that predicts a next token."""
    return [Example((w[0],), tuple(w[1:]), i) for i, w in enumerate(windows)]


# --- the default reference: the base model's own continuations ---------------------------------------------

def _identity(spec) -> str:
    """What the reference depends on: the model's weights (a cheap fingerprint of the file) and how it is made."""
    if spec.kind in ("wheel", "gguf"):
        weights = models._fingerprint(spec.path)
    elif spec.kind == "hf":
        files = sorted(spec.path.glob("*.safetensors")) or sorted(spec.path.glob("*.bin"))
        weights = "|".join(models._fingerprint(f) for f in files) + (spec.path / "config.json").read_text()
    else:  # a generated model: its registry entry defines it
        weights = json.dumps(spec.info, sort_keys=True) + str(models.CACHE_VERSION)
    recipe = json.dumps([REFERENCE_VERSION, WINDOW, REFERENCE_PROMPTS, SAMPLING, REFERENCE_SEED])
    return hashlib.sha256((weights + recipe).encode()).hexdigest()[:16]


def reference_path(spec) -> Path:
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.name).name)[:60]
    return cache_dir() / "locality" / f"{name}-{_identity(spec)}.json"


def generate_reference(model, tokenizer, device: str = "cpu") -> list[list[int]]:
    """One window of WINDOW tokens per prompt: the prompt and the model's sampled continuation (sampled, not
    greedy: a small model's greedy text loops, and a loop is easy to agree on; EOS is never drawn, so every
    continuation fills its window). All prompts are generated together, left-padded, with the KV cache."""
    import torch

    encoded = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in REFERENCE_PROMPTS]
    width = max(len(e) for e in encoded)
    ids = torch.zeros((len(encoded), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(encoded):
        ids[i, width - len(e):], mask[i, width - len(e):] = torch.tensor(e), 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    g = torch.Generator().manual_seed(REFERENCE_SEED)
    eos = tokenizer.eos_token_id
    drawn = []
    # transformers renames past_key_values to cache (5.x); use whichever this version's forward takes
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        for step in range(WINDOW):
            logits = out.logits[:, -1].float().cpu() / SAMPLING["temperature"]
            if eos is not None:
                logits[:, eos] = -float("inf")
            top = logits.topk(SAMPLING["top_k"], dim=-1)
            choice = torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)
            token = top.indices.gather(-1, choice).to(device)
            drawn.append(token)
            if step + 1 == WINDOW:
                break
            mask = torch.cat([mask, torch.ones_like(token)], dim=1)
            positions = positions[:, -1:] + 1
            past = out.cache if hasattr(out, "cache") else out.past_key_values
            out = model(input_ids=token, attention_mask=mask, position_ids=positions, use_cache=True,
                        **{cache_arg: past})
    model.train(was_training)
    continuation = torch.cat(drawn, dim=1).cpu().tolist()
    return [(e + c)[:WINDOW] for e, c in zip(encoded, continuation)]


def reference_windows(spec, part: str = "measure", log=None, loaded=None) -> list[list[int]]:
    """The default reference of a base model (shipped for the default model; else generated on first use, then
    read from the cache): its `measure` windows (even) or its `preserve` windows (odd). The file's name carries
    the model's weights and the recipe (`_identity`), so a shipped or cached reference serves only what it was
    made from. loaded: (model, tokenizer) of that base already in memory (a
    PEFT model generates with its adapter switched off), else the base is loaded for it."""
    if part not in PARTS:
        raise ValueError(f"part must be one of {PARTS}, got {part!r}")
    path = reference_path(spec)
    windows = None
    for source in (path, models.shipped_file(f"locality/{path.name}")):  # the cache, then what memcli ships
        if source is not None and source.exists():
            try:
                windows = json.loads(source.read_text())["windows"]
                break
            except (OSError, ValueError, KeyError, TypeError):
                windows = None  # a damaged cache entry is made again
    if windows is None:
        if log is not None:
            log(f"locality: generating the reference text of {spec.name} (its own continuations of "
                f"{len(REFERENCE_PROMPTS)} prompts, once; cached in {path.parent})")
        if loaded is None:
            windows = generate_reference(*models.load_model(spec))
        elif hasattr(loaded[0], "disable_adapter"):
            with loaded[0].disable_adapter():
                windows = generate_reference(*loaded, device=loaded[0].device.type)
        else:
            windows = generate_reference(*loaded, device=loaded[0].device.type)
        write_json(path, {"model": spec.name, "window": WINDOW, "prompts": list(REFERENCE_PROMPTS),
                          "sampling": SAMPLING, "seed": REFERENCE_SEED, "windows": windows}, what="locality cache")
    return windows[0::2] if part == "measure" else windows[1::2]


# --- the comparison ------------------------------------------------------------------------------------------

@dataclass
class LocalityTotals:
    """Running sums over compared positions; `result` gives report.json's `locality`."""

    tokens: int = 0
    agree: int = 0
    kl: float = 0.0
    ce_base: float = 0.0
    ce_tuned: float = 0.0
    non_finite: int = 0  # positions left out: a NaN/inf logits row on either side

    def add(self, base_logits, tuned_logits, targets, threads: int = 0) -> None:
        """One block: base and tuned logits rows [n, V] of the same positions, the text's next tokens [n]."""
        base = score_logits(base_logits, targets, threads=threads)
        tuned = score_logits(tuned_logits, targets, threads=threads)
        kl = kl_logits(base_logits, tuned_logits, threads=threads)
        ok = (np.isfinite(base.logprob) & np.isfinite(tuned.logprob) & np.isfinite(kl) & (base.argmax >= 0)
              & (tuned.argmax >= 0))
        self.non_finite += int((~ok).sum())
        self.tokens += int(ok.sum())
        self.agree += int((base.argmax[ok] == tuned.argmax[ok]).sum())
        self.kl += float(kl[ok].sum())
        self.ce_base -= float(base.logprob[ok].sum())
        self.ce_tuned -= float(tuned.logprob[ok].sum())

    def result(self, text: str) -> dict:
        n = self.tokens
        return {"argmax_agreement": self.agree / n if n else None, "kl": self.kl / n if n else None,
                "ce_base": self.ce_base / n if n else None, "ce_tuned": self.ce_tuned / n if n else None,
                "tokens": n, "non_finite": self.non_finite, "window": WINDOW, "text": text}


def torch_locality(model, windows: list[list[int]], device: str = "cpu", text: str = "reference",
                   windows_per_batch: int = 4, threads: int = 0, first_layer: int = 0) -> dict:
    """Base (the same PEFT model with its adapter switched off) against tuned, teacher-forced over the windows,
    in torch; the model's training mode is restored after. With `first_layer` (the lowest adapted layer, for a
    model whose pass can start there: forward.FrozenPrefix.agrees) the layers below it, the same in both models,
    run once for the two passes."""
    import torch

    # lazy: verify's llama.cpp path imports this module
    from memcli.training.forward import FrozenPrefix, answer_logits, collate

    examples = as_examples(windows)
    prefix = FrozenPrefix(model, examples, first_layer, 0, device) if first_layer > 0 else None
    totals = LocalityTotals()
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), windows_per_batch):
                idx = list(range(start, min(start + windows_per_batch, len(examples))))
                batch = collate([examples[i] for i in idx], 0, device, prefix, idx)
                with model.disable_adapter():
                    base = answer_logits(model, batch)[batch.mask]
                tuned = answer_logits(model, batch)[batch.mask]
                totals.add(base, tuned, batch.targets[batch.mask].cpu().numpy(), threads)
    finally:
        model.train(was_training)
    return totals.result(text)
