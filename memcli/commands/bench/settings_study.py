"""`memcli bench settings`: how soon does recall certify under other training settings?

Every (corpus, variant, seed) run trains with `--until-recall` from train's defaults plus the variant's settings
(`"fast: lr=0.02 dropout=0"`), and appends one JSON row to OUT/results.jsonl as it finishes, so an interrupted
study keeps what it measured and a rerun skips what is there: whether it certified, its steps, the entries it
trained on (steps x the entries a step sees, a partial last batch as it is: a change of batch size counts
fairly), its training time, and the certified fraction at every check (the curve the plot draws). The summary
compares each variant with the baseline variant on the same corpus and seed: the median over seeds of the ratio of
entries trained on and of training time.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import shutil
import statistics
import tempfile
from pathlib import Path

from memcli.core import runs
from memcli.core.errors import UserError
from memcli.training.config import TrainConfig, parse_assignments
from memcli.training.trainer import Trainer

# What the study sets for every run: a variant may change anything else.
STUDY_SETTINGS = ("corpus", "model", "seed", "until_recall", "checkpoint_every", "gguf")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    settings: dict  # the train settings it changes

    @classmethod
    def parse(cls, text: str) -> "Variant":
        """'NAME: setting=value setting=value' (or 'NAME' alone: train's defaults)."""
        name, _, rest = text.partition(":")
        name = name.strip()
        if not name or any(c in name for c in "/= "):
            raise UserError(f"--variant '{text}': give it as 'NAME: setting=value ...' (a name without /, = or "
                            "spaces)")
        return cls(name, parse_assignments(shlex.split(rest), f"--variant '{text}'", STUDY_SETTINGS))

    def config(self, corpus: Path, model: str, seed: int) -> TrainConfig:
        """The variant's training settings on this corpus and seed, checked. The budget is train's (--epochs or
        --max-steps, the variant's or the default): a schedule that decays to the budget depends on it."""
        cfg = TrainConfig(**(self.settings | {"corpus": str(corpus), "model": model, "seed": seed,
                                              "until_recall": True, "checkpoint_every": 10**9, "gguf": "off"}))
        try:
            cfg.validate()
        except UserError as e:
            raise UserError(f"--variant {self.name}: {e}") from None
        return cfg


def read_rows(results: Path) -> dict[tuple, dict]:
    if not results.exists():
        return {}
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
    return {(r["corpus"], r["variant"], r["seed"]): r for r in rows}


def curve(run: Path) -> list[tuple[int, float]]:
    """(step, certified fraction) at every clean check of a run."""
    points = []
    for line in (run / runs.METRICS).read_text().splitlines():
        row = json.loads(line)
        if "certified" in row:
            points.append((row["step"], row["certified"]))
    return points


def run_study(out: Path, corpora: dict[str, Path], variants: list[Variant], seeds: list[int], model: str,
              keep_runs: bool = False, log=print) -> list[dict]:
    """Every (corpus, seed, variant) run that OUT/results.jsonl does not hold yet; returns all rows asked for."""
    for v in variants:  # every variant's settings checked before any training
        for path in corpora.values():
            v.config(path, model, seeds[0])
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = read_rows(results)
    for corpus_name, path in corpora.items():
        for seed in seeds:
            for v in variants:
                key = (corpus_name, v.name, seed)
                if key in done:
                    continue
                cfg = v.config(path, model, seed)
                runs_dir = out / "runs" if keep_runs else Path(tempfile.mkdtemp(prefix=".run-", dir=out))
                folder = runs_dir / f"{corpus_name}-{v.name}-seed{seed}"
                try:
                    summary = Trainer(cfg, folder, force=True, log=lambda m: None).run()
                    points = curve(folder)
                finally:
                    if not keep_runs:
                        shutil.rmtree(runs_dir, ignore_errors=True)
                row = {"corpus": corpus_name, "variant": v.name, "seed": seed, "settings": v.settings,
                       "certified": summary["all_certified"], "steps": summary["steps"],
                       "examples": summary["examples"], "entries": summary["entries"],
                       "answer_tokens": summary["answer_tokens"], "train_s": summary["wall_seconds"],
                       "exact_match": summary["exact_match"], "certified_fraction": summary["certified"],
                       "curve": points}
                done[key] = row
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(format_row(row))
    return [done[(c, v.name, s)] for c in corpora for s in seeds for v in variants if (c, v.name, s) in done]


def format_row(row: dict) -> str:
    state = "certified" if row["certified"] else f"NOT certified ({row['certified_fraction']:.0%})"
    return (f"{row['corpus']} {row['variant']} seed {row['seed']}: {state} at step {row['steps']}, "
            f"{row['examples']} entries trained on, {row['train_s']:.1f} s")


def format_summary(rows: list[dict], baseline: str) -> str:
    """Markdown: per corpus and variant, runs certified, median steps, entries and training time, and the median
    over seeds of the ratio to the baseline variant's run on the same corpus and seed."""
    base = {(r["corpus"], r["seed"]): r for r in rows if r["variant"] == baseline}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["corpus"], r["variant"]), []).append(r)
    head = ["corpus", "variant", "certified", "median steps", "median entries trained on", "median train s",
            f"entries vs {baseline}", f"time vs {baseline}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (corpus_name, variant), group in groups.items():
        pairs = [(r, base[(corpus_name, r["seed"])]) for r in group if (corpus_name, r["seed"]) in base]
        examples = [r["examples"] / b["examples"] for r, b in pairs if b["examples"]]
        times = [r["train_s"] / b["train_s"] for r, b in pairs if b["train_s"]]
        certified = sum(bool(r["certified"]) for r in group)
        lines.append("| " + " | ".join([
            corpus_name, variant, f"{certified}/{len(group)}", f"{statistics.median(r['steps'] for r in group):g}",
            f"{statistics.median(r['examples'] for r in group):g}",
            f"{statistics.median(r['train_s'] for r in group):.1f}",
            f"{statistics.median(examples):.2f}x" if examples else "-",
            f"{statistics.median(times):.2f}x" if times else "-"]) + " |")
    return "\n".join(lines)


def plot_curves(rows: list[dict], variants: list[str], path: Path) -> Path:
    """Certified fraction against entries trained on, one panel per corpus, one colour per variant (every seed
    drawn), written atomically to `path` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    corpora = list(dict.fromkeys(r["corpus"] for r in rows))
    fig, axes = plt.subplots(1, len(corpora), figsize=(4.2 * len(corpora), 3.4), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, corpus_name in zip(axes[0], corpora):
        for i, variant in enumerate(variants):
            for j, r in enumerate(r for r in rows if r["corpus"] == corpus_name and r["variant"] == variant):
                per_step = r["examples"] / max(r["steps"], 1)
                xs = [step * per_step for step, _ in r["curve"]]
                ax.plot(xs, [c for _, c in r["curve"]], color=colours[i % len(colours)], alpha=0.8,
                        label=variant if j == 0 else None)
        ax.set_title(corpus_name)
        ax.set_xlabel("entries trained on")
        ax.set_ylabel("certified fraction")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=8)
    fig.tight_layout()
    runs.atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110), "--plot")
    plt.close(fig)
    return path
