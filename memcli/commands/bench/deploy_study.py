"""`memcli bench deploy`: does recall survive the files users ship, and what does `train --deploy` cost?

For each (method, variant, seed) on one generated PhoneBook: train until certified (variant `plain`: the weights
training uses; `deploy`: `--deploy TYPE`; `margin=M`: `--margin M`), then make both deployment forms of every
type asked for (merged and quantised; the adapter over the quantised base) and score them in llama.cpp. One JSON
row per run (appended to OUT/results.jsonl as each finishes, so an interrupted study keeps what it measured):
steps, wall time and s/step against the plain run of the same method and seed, and exact/certified per form and
type.
"""

from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

from memcli.core import models, runs
from memcli.core.errors import UserError
from memcli.deploy.certify import certify, in_memory
from memcli.training.config import TrainConfig
from memcli.training.trainer import Trainer


def variant_settings(variant: str, quant: str) -> dict:
    """The train settings a variant names: plain, deploy (--deploy quant) or margin=M (--margin M)."""
    if variant == "plain":
        return {}
    if variant == "deploy":
        return {"deploy": quant}
    if variant.startswith("margin="):
        try:
            return {"margin": float(variant.split("=", 1)[1])}
        except ValueError:
            pass
    raise UserError(f"--variant must be plain, deploy or margin=M, got '{variant}'")


def run_study(out: Path, corpus: Path, model: str, methods: list[str], variants: list[str], seeds: list[int],
              quant: str, types: list[str], check_every: int, max_steps: int, log=print) -> list[dict]:
    """Every (seed, method, variant) run, skipping those OUT/results.jsonl already holds."""
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {(r["seed"], r["method"], r["variant"]): r for r in map(json.loads, results.read_text().splitlines())
            } if results.exists() else {}
    spec = models.resolve(model)
    for seed in seeds:
        for method in methods:
            for variant in variants:
                key = (seed, method, variant)
                if key in done:
                    continue
                cfg = TrainConfig(corpus=str(corpus), model=model, method=method, seed=seed, until_recall=True,
                                  check_every=check_every, max_steps=max_steps, checkpoint_every=10**9,
                                  **variant_settings(variant, quant))
                cfg.validate()
                folder = out / "runs" / f"{method}-{variant}-seed{seed}"
                log(f"train {folder.name}")
                t0 = time.perf_counter()
                trainer = Trainer(cfg, folder, force=True, log=lambda m: None)
                summary = trainer.run()
                wall = time.perf_counter() - t0
                survival = []
                with tempfile.TemporaryDirectory(prefix=".survival-", dir=out) as work:
                    for r in certify(runs.adapter_dir(folder), spec, types, in_memory(trainer.examples), Path(work)):
                        survival.append({k: r[k] for k in ("form", "type", "entries", "exact", "certified",
                                                           "at_risk", "min_margin", "bytes")})
                row = {"seed": seed, "method": method, "variant": variant, "steps": summary["steps"],
                       "certified_in_training": summary["all_certified"], "wall_s": round(wall, 1),
                       "train_s": summary["wall_seconds"], "s_per_step": round(summary["wall_seconds"]
                                                                              / max(summary["steps"], 1), 3),
                       "survival": survival, "deploy": summary.get("deploy")}
                done[key] = row
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(format_row(row))
    return [done[(s, m, v)] for s in seeds for m in methods for v in variants]


def format_row(row: dict) -> str:
    forms = " ".join(f"{r['form'][0]}:{r['type']} {r['exact']}/{r['entries']}" for r in row["survival"])
    return (f"{row['method']:9} {row['variant']:9} seed {row['seed']}: {row['steps']} steps, {row['train_s']:.0f} s "
            f"({row['s_per_step']:.2f} s/step) | {forms}")


def format_table(rows: list[dict]) -> str:
    """Markdown: one line per run with its cost against the plain run of the same method and seed, and the exact
    recall of every form and type."""
    plain = {(r["method"], r["seed"]): r for r in rows if r["variant"] == "plain"}
    types = list(dict.fromkeys(s["type"] for r in rows for s in r["survival"]))
    head = ["method", "variant", "seed", "steps", "train s", "vs plain (steps / time)"]
    head += [f"{form} {t}" for t in types for form in ("merged", "adapter")]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        p = plain.get((r["method"], r["seed"]))
        ratio = (f"{r['steps'] / p['steps']:.2f}x / {r['train_s'] / p['train_s']:.2f}x" if p and p["steps"]
                 else "-")
        cells = {(s["form"], s["type"]): f"{s['exact']}/{s['entries']}" for s in r["survival"]}
        lines.append("| " + " | ".join([r["method"], r["variant"], str(r["seed"]), str(r["steps"]),
                                        f"{r['train_s']:.0f}", ratio]
                                       + [cells.get((form, t), "-") for t in types for form in ("merged", "adapter")])
                     + " |")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """Markdown: one line per (method, variant) over its seeds: median steps, the median per-seed ratio of steps
    and training time to the plain run of the same method and seed, and the mean exact recall of every form and
    type."""
    plain = {(r["method"], r["seed"]): r for r in rows if r["variant"] == "plain"}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["method"], r["variant"]), []).append(r)
    types = list(dict.fromkeys(s["type"] for r in rows for s in r["survival"]))
    entries = max((s["entries"] for r in rows for s in r["survival"]), default=0)
    head = ["method", "variant", "seeds", "certified", "median steps", "vs plain: steps", "vs plain: train time"]
    head += [f"{form} {t}" for t in types for form in ("merged", "adapter")]
    lines = [f"(mean exact of {entries} entries over the seeds; ratios: median over seeds of the run against the "
             "plain run of its method and seed)", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (method, variant), group in groups.items():
        pairs = [(r, plain[(method, r["seed"])]) for r in group if (method, r["seed"]) in plain]
        steps = [r["steps"] / p["steps"] for r, p in pairs if p["steps"]]
        times = [r["train_s"] / p["train_s"] for r, p in pairs if p["train_s"]]
        cells = []
        for t in types:
            for form in ("merged", "adapter"):
                got = [s["exact"] for r in group for s in r["survival"] if (s["form"], s["type"]) == (form, t)]
                cells.append(f"{statistics.mean(got):.1f}" if got else "-")
        certified = sum(bool(r["certified_in_training"]) for r in group)
        lines.append("| " + " | ".join([method, variant, str(len(group)), f"{certified}/{len(group)}",
                                        f"{statistics.median(r['steps'] for r in group):g}",
                                        f"{statistics.median(steps):.2f}x" if steps else "-",
                                        f"{statistics.median(times):.2f}x" if times else "-"] + cells) + " |")
    return "\n".join(lines)
