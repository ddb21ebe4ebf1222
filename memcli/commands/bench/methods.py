"""`memcli bench methods`: training objectives compared at equal rank, seed, batches and budget (the paper's
comparison of objectives, at small scale).

Three regimes, each a generated corpus trained once per (variant, seed[, rank]):
- easy: a small PhoneBook at a rank that holds it; trained until recall is certified (checked every few steps):
  steps and wall time to certified recall;
- starved: a PhoneBook too big for a low rank, a fixed budget of epochs: exact match, token accuracy, L_final;
- long: one random-token value, ranks given, a fixed budget of steps at batch 1: the same measures per rank.
A variant is a method with optional settings, e.g. "memft-ot train_threshold=0.9 dropout=0". Every run also
reports the capacity it reached: bits of the exactly recalled information per trainable parameter (a PhoneBook
number's first digit is one of 6-9 and nine digits are free: log2(4e9) = 31.9 bits; a random token carries
log2(vocabulary) bits, counted over the greedy-correct prefix of the value).

Rows go to OUT/results.jsonl as they finish (a rerun skips the rows already there), so the study can stop and
resume; OUT/methods.png plots exact match and token accuracy per variant and cell.
"""

from __future__ import annotations

import json
import math
import shlex
import statistics
from dataclasses import dataclass
from pathlib import Path

from memcli.core import models
from memcli.core.datagen import generate_phonebook, generate_random_tokens, write_jsonl
from memcli.core.errors import UserError
from memcli.training.config import TrainConfig, parse_assignments
from memcli.training.trainer import Trainer

PHONEBOOK_BITS = math.log2(4e9)  # per exactly recalled PhoneBook number: first digit 6-9, nine free digits
# What the study sets for every run (the cell, the budget, the bookkeeping): a variant may change anything else.
STUDY_SETTINGS = ("corpus", "model", "rank", "seed", "epochs", "max_steps", "batch_size", "until_recall",
                  "check_every", "checkpoint_every", "gguf")


@dataclass
class Regime:
    name: str  # easy | starved | long
    entries: int = 20  # PhoneBook entries (easy, starved)
    tokens: int = 256  # value length (long)
    ranks: tuple[int, ...] = (8,)
    epochs: int = 200  # budget (starved; easy's cap)
    steps: int = 200  # budget (long)
    batch_size: int = 16
    check_every: int = 5  # easy: how often certification is checked


def parse_variant(text: str) -> tuple[str, dict]:
    """"memft-ot train_threshold=0.9 dropout=0" -> ("memft-ot train_threshold=0.9 dropout=0", settings)."""
    words = shlex.split(text)
    if not words:
        raise UserError("--variant: empty")
    settings = {"method": words[0]} | parse_assignments(words[1:], f"--variant '{text}'", STUDY_SETTINGS)
    TrainConfig(**settings).validate()
    return " ".join(words), settings


def _corpus(regime: Regime, seed: int, folder: Path, tokenizer) -> Path:
    path = folder / f"{regime.name}-s{seed}.jsonl"
    if not path.exists():
        if regime.name == "long":  # random tokens of the model's own vocabulary
            write_jsonl(path, [generate_random_tokens(regime.tokens, seed, tokenizer)])
        else:
            write_jsonl(path, generate_phonebook(regime.entries, seed))
    return path


def bits_per_parameter(summary: dict, regime: Regime, vocab: int) -> float:
    if regime.name == "long":
        bits = summary["token_accuracy"] * summary["answer_tokens"] * math.log2(vocab)
    else:
        bits = summary["exact_match"] * summary["entries"] * PHONEBOOK_BITS
    return bits / summary["params"]


def first_exact_step(run: Path) -> int | None:
    """The first clean check at which any entry was recalled exactly: steps to certified recall split into the
    approach (most tokens still under p = 0.5, where MemFT's weights are nearly SFT's) and the tail."""
    for line in (run / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if row.get("exact_match", 0) > 0:
            return row["step"]
    return None


def run_one(regime: Regime, variant: str, settings: dict, seed: int, rank: int, model: str, folder: Path,
            tokenizer) -> dict:
    corpus = _corpus(regime, seed, folder, tokenizer)
    budget = {"max_steps": regime.steps, "batch_size": 1} if regime.name == "long" else {
        "epochs": regime.epochs, "batch_size": regime.batch_size}
    easy = regime.name == "easy"
    cfg = TrainConfig(corpus=str(corpus), model=model, rank=rank, seed=seed, gguf="off", checkpoint_every=10**9,
                      until_recall=easy, check_every=regime.check_every if easy else 10**9, **budget,
                      **settings)
    run = folder / "runs" / f"{regime.name}-r{rank}-s{seed}-{variant.replace(' ', '_')}"
    s = Trainer(cfg, run, force=True, log=lambda m: None).run()
    return {"regime": regime.name, "variant": variant, "seed": seed, "rank": rank, "entries": s["entries"],
            "answer_tokens": s["answer_tokens"], "params": s["params"], "steps": s["steps"],
            "first_exact_step": first_exact_step(run) if easy else None,
            "certified_at_step": s["certified_at_step"], "wall_s": s["wall_seconds"],
            "exact_match": s["exact_match"], "token_accuracy": s["token_accuracy"], "certified": s["certified"],
            "l_init": s["l_init"], "l_final": s["l_final"],
            "bits_per_param": bits_per_parameter(s, regime, len(tokenizer)),
            "agreement": (s.get("locality") or {}).get("argmax_agreement"),
            "kl": (s.get("locality") or {}).get("kl")}


def run_study(regimes: list[Regime], variants: list[str], seeds: list[int], out: Path, model: str | None = None,
              on_row=lambda row: None) -> list[dict]:
    parsed = [parse_variant(v) for v in variants]
    model = model or models.DEFAULT_MODEL
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    rows = [json.loads(line) for line in results.read_text().splitlines()] if results.exists() else []
    done = {(r["regime"], r["variant"], r["seed"], r["rank"]) for r in rows}
    tokenizer = models.load_tokenizer(models.resolve(model))
    for regime in regimes:
        for rank in regime.ranks:
            for seed in seeds:
                for variant, settings in parsed:  # innermost: every variant sees the same corpus, back to back
                    if (regime.name, variant, seed, rank) in done:
                        continue
                    row = run_one(regime, variant, settings, seed, rank, model, out, tokenizer)
                    with results.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    rows.append(row)
                    on_row(row)
    return rows


def _median_if_all(values) -> float | None:
    """The median, or None when any run has no value (a seed that never certified has no step to count)."""
    values = list(values)
    return None if any(v is None for v in values) else statistics.median(values)


def table_rows(rows: list[dict]) -> list[dict]:
    """Medians over seeds per (regime, rank, variant), and in how many seeds each variant matched or beat the
    first variant (the baseline, normally sft) on both exact match and token accuracy."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["regime"], r["rank"], r["variant"]), []).append(r)
    out = []
    for (regime, rank, variant), rs in groups.items():
        base = {r["seed"]: r for r in groups.get((regime, rank, rows[0]["variant"]), [])}
        wins = sum(1 for r in rs if r["seed"] in base and r["exact_match"] >= base[r["seed"]]["exact_match"]
                   and r["token_accuracy"] >= base[r["seed"]]["token_accuracy"])
        out.append({"regime": regime, "rank": rank, "variant": variant, "seeds": len(rs),
                    "exact_match": statistics.median(r["exact_match"] for r in rs),
                    "token_accuracy": statistics.median(r["token_accuracy"] for r in rs),
                    "l_final": statistics.median(r["l_final"] for r in rs),
                    "steps_to_certified": _median_if_all(r["certified_at_step"] for r in rs),
                    "first_exact_step": _median_if_all(r.get("first_exact_step") for r in rs),
                    "wall_s": statistics.median(r["wall_s"] for r in rs),
                    "bits_per_param": statistics.median(r["bits_per_param"] for r in rs),
                    "agreement": _median_if_all(r.get("agreement") for r in rs),
                    "kl": _median_if_all(r.get("kl") for r in rs),
                    "matches_baseline": f"{wins}/{len(rs)}"})
    return out


def plot(rows: list[dict], path: Path) -> Path:
    """Two panels, exact match and greedy token accuracy (medians over seeds), one bar per variant and cell."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = table_rows(rows)
    cells = sorted({(r["regime"], r["rank"]) for r in summary})
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    fig, axes = plt.subplots(2, 1, sharex=True, figsize=(max(6, 1.2 * len(cells) * len(variants) / 2), 6))
    width = 0.8 / len(variants)
    for ax, key, label in zip(axes, ("exact_match", "token_accuracy"), ("exact match", "token accuracy")):
        for j, variant in enumerate(variants):
            values = [next((r[key] for r in summary if (r["regime"], r["rank"], r["variant"]) == (*cell, variant)),
                           math.nan) for cell in cells]  # a variant not run in a cell: no bar
            ax.bar([i + j * width for i in range(len(cells))], values, width, label=variant)
        ax.set_ylabel(f"{label}\n(median over seeds)")
        ax.set_ylim(0, 1)
    axes[1].set_xticks([i + 0.4 - width / 2 for i in range(len(cells))], [f"{g} r{r}" for g, r in cells])
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
