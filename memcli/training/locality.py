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
totals, the torch pass (the adapter switched off for the base: no second copy of the weights) and the base's side
of it kept for later runs (`BaseSide`: train then runs the tuned model alone). The llama.cpp pass is
`memcli.commands.verify.base_vs_tuned`.

The default reference text is no one's prose: the base model's own sampled continuations of short, varied
prompts, generated once per base model and cached, so that locality measures "what the model did before". Its
windows alternate between two halves: the even ones are measured, the odd ones are the default replay text of
`memcli train --preserve` (so the figures `train` records are not measured on the text it was kept close on).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import os
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

def _weights(spec) -> str:
    """The model's weights, as a cheap fingerprint of its files (a generated model: its registry entry)."""
    if spec.kind in ("wheel", "gguf"):
        return models._fingerprint(spec.path)
    if spec.kind == "hf":
        files = sorted(spec.path.glob("*.safetensors")) or sorted(spec.path.glob("*.bin"))
        return "|".join(models._fingerprint(f) for f in files) + (spec.path / "config.json").read_text()
    return json.dumps(spec.info, sort_keys=True) + str(models.CACHE_VERSION)


def _identity(spec) -> str:
    """What the reference depends on: the model's weights and how the text is made."""
    recipe = json.dumps([REFERENCE_VERSION, WINDOW, REFERENCE_PROMPTS, SAMPLING, REFERENCE_SEED])
    return hashlib.sha256((_weights(spec) + recipe).encode()).hexdigest()[:16]


def _file_name(spec) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(spec.name).name)[:60]


def reference_path(spec) -> Path:
    return cache_dir() / "locality" / f"{_file_name(spec)}-{_identity(spec)}.json"


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
    for source in _cached_or_shipped(path):
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


def _cached_or_shipped(path: Path) -> list[Path]:
    """Where a file of `path`'s name may already be: the cache, then what memcli ships for its named models."""
    return [p for p in (path, models.shipped_file(f"locality/{path.name}")) if p is not None and p.exists()]


# --- the base's side, computed once ---------------------------------------------------------------------------

BASE_SIDE_VERSION = 1  # bump when BaseSide's fields or their arithmetic change


@dataclass
class BaseSide:
    """The base's side of every compared position of a text, enough to compare any tuned model that shares the
    base's output layer W (an adapter below it) without running the base again. With p the base's next-token
    distribution and h the tuned model's last state (its logits z = W h, log-normaliser lse):

        KL(p || tuned) = sum_v p_v log p_v - sum_v p_v (W h)_v + lse = negentropy - expected_row . h + lse

    where expected_row = sum_v p_v W_v. The base's greedy token and the text's log-probability give agreement and
    CE. A property of the base and the text alone: computed once, cached, and shipped for the default model."""

    argmax: np.ndarray  # int64 [n]
    logprob: np.ndarray  # float64 [n]: log p(next token of the text)
    negentropy: np.ndarray  # float64 [n]: sum_v p_v log p_v
    expected_row: np.ndarray  # float16 [n, d]: sum_v p_v W_v (half the file; KL within 2e-5 nats of two passes)

    @classmethod
    def of(cls, logits, weight, targets: np.ndarray, threads: int = 0) -> BaseSide:
        """From the base's logits rows [n, V] (torch) and its output layer's weight [V, d]. In float64, a slice
        of the vocabulary at a time: KL is a difference of larger terms (in float32 the mean KL of the default
        model moved by 3e-4 nats), and a whole float64 copy of a large model's output layer would not fit."""
        import torch

        stats = score_logits(logits, targets, threads=threads)
        logp = torch.log_softmax(logits.double(), dim=-1)
        p = logp.exp()
        negentropy = (p * logp).sum(-1)
        expected = torch.zeros((len(p), weight.shape[1]), dtype=torch.float64, device=p.device)
        for s in range(0, weight.shape[0], 8192):
            expected += p[:, s:s + 8192] @ weight[s:s + 8192].double()
        return cls(stats.argmax, stats.logprob, negentropy.cpu().numpy(), expected.to(torch.float16).cpu().numpy())

    @classmethod
    def join(cls, parts: list[BaseSide]) -> BaseSide:
        return cls(*(np.concatenate([getattr(b, f) for b in parts]) for f in ("argmax", "logprob", "negentropy",
                                                                            "expected_row")))

    def rows(self, start: int, stop: int) -> BaseSide:
        return BaseSide(self.argmax[start:stop], self.logprob[start:stop], self.negentropy[start:stop],
                        self.expected_row[start:stop])

    def save(self, path: Path) -> None:
        """Written whole or not at all (a temporary file renamed into place)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, argmax=self.argmax, logprob=self.logprob, negentropy=self.negentropy,
                     expected_row=self.expected_row)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, positions: int, width: int) -> BaseSide | None:
        """The saved side, or None if it is damaged or not of `positions` rows of `width`."""
        try:
            with np.load(path) as f:
                side = cls(f["argmax"], f["logprob"], f["negentropy"], f["expected_row"])
        except (OSError, ValueError, KeyError):
            return None
        sizes = {len(side.argmax), len(side.logprob), len(side.negentropy), len(side.expected_row)}
        return side if sizes == {positions} and side.expected_row.shape[1:] == (width,) else None


def base_side_path(spec, windows: list[list[int]], dtype: str) -> Path:
    """Where the base side of `spec` over `windows` is kept: named by the weights, the text and the dtype."""
    key = json.dumps([_weights(spec), windows, dtype, BASE_SIDE_VERSION])
    return cache_dir() / "locality" / f"{_file_name(spec)}-base-{hashlib.sha256(key.encode()).hexdigest()[:16]}.npz"


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
        self._count(base.argmax, base.logprob, tuned, kl_logits(base_logits, tuned_logits, threads=threads))

    def add_against(self, base: BaseSide, tuned_logits, tuned_hidden, targets, threads: int = 0) -> None:
        """One block compared with the base's saved side: the tuned logits rows [n, V] and last states [n, d]."""
        tuned = score_logits(tuned_logits, targets, threads=threads)
        lse = tuned.target_logit - tuned.logprob
        dot = np.einsum("nd,nd->n", base.expected_row.astype(np.float64), tuned_hidden.double().cpu().numpy())
        self._count(base.argmax, base.logprob, tuned, base.negentropy - dot + lse)

    def _count(self, base_argmax, base_logprob, tuned, kl) -> None:
        ok = (np.isfinite(base_logprob) & np.isfinite(tuned.logprob) & np.isfinite(kl) & (base_argmax >= 0)
              & (tuned.argmax >= 0))
        self.non_finite += int((~ok).sum())
        self.tokens += int(ok.sum())
        self.agree += int((base_argmax[ok] == tuned.argmax[ok]).sum())
        self.kl += float(kl[ok].sum())
        self.ce_base -= float(base_logprob[ok].sum())
        self.ce_tuned -= float(tuned.logprob[ok].sum())

    def result(self, text: str) -> dict:
        n = self.tokens
        return {"argmax_agreement": self.agree / n if n else None, "kl": self.kl / n if n else None,
                "ce_base": self.ce_base / n if n else None, "ce_tuned": self.ce_tuned / n if n else None,
                "tokens": n, "non_finite": self.non_finite, "window": WINDOW, "text": text}


def torch_locality(model, windows: list[list[int]], device: str = "cpu", text: str = "reference",
                   windows_per_batch: int = 4, threads: int = 0, first_layer: int = 0,
                   base_cache: Path | None = None) -> dict:
    """Base (the same PEFT model with its adapter switched off) against tuned, teacher-forced over the windows,
    in torch; the model's training mode is restored after. With `first_layer` (the lowest adapted layer, for a
    model whose pass can start there: forward.FrozenPrefix.agrees) the layers below it, the same in both models,
    run once for the two passes. With `base_cache` (`base_side_path`) and an output layer the adapter leaves
    alone, the base's side is read from there (or from what memcli ships) instead of run, else run and saved
    there: the same figures, from one pass instead of two."""
    import torch

    # lazy: verify's llama.cpp path imports this module
    from memcli.training.forward import FrozenPrefix, answer_hidden, collate, output_layer

    examples = as_examples(windows)
    head = output_layer(model)
    positions = sum(len(w) - 1 for w in windows)
    shared_head = base_cache is not None and type(head) is torch.nn.Linear and head.bias is None
    saved = next((side for path in (_cached_or_shipped(base_cache) if shared_head else [])
                  if (side := BaseSide.load(path, positions, head.in_features)) is not None), None)
    collected = [] if shared_head and saved is None else None
    prefix = FrozenPrefix(model, examples, first_layer, 0, device) if first_layer > 0 else None
    totals = LocalityTotals()
    done = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), windows_per_batch):
                idx = list(range(start, min(start + windows_per_batch, len(examples))))
                batch = collate([examples[i] for i in idx], 0, device, prefix, idx)
                targets = batch.targets[batch.mask].cpu().numpy()
                hidden = answer_hidden(model, batch)[batch.mask]
                tuned = head(hidden).float()
                if saved is not None:
                    totals.add_against(saved.rows(done, done + len(targets)), tuned, hidden, targets, threads)
                else:
                    with model.disable_adapter():
                        base = head(answer_hidden(model, batch)[batch.mask]).float()
                    totals.add(base, tuned, targets, threads)
                    if collected is not None:
                        collected.append(BaseSide.of(base, head.weight, targets, threads))
                done += len(targets)
    finally:
        model.train(was_training)
    if collected:
        BaseSide.join(collected).save(base_cache)
    return totals.result(text)
