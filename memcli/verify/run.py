"""`memcli verify`: certify greedy verbatim recall from one teacher-forced pass (PAPER.md section 3).

Greedy decoding reproduces a value exactly if and only if, fed the correct prefix, the model's argmax is the
target at every answer position: before the first wrong argmax, greedy decoding has produced exactly the target
prefix, so its inputs are the teacher-forced inputs. One batched forward pass over key+value therefore decides
recall, and the first position where the argmax is wrong is where greedy decoding first goes wrong.

Per entry (`EntryVerdict`, computed by `verdicts` from the per-token statistics of `memcli.scoring`):
- exact: every teacher-forced argmax equals the target. Ties: at an exact logit tie the argmax is the lowest
  token id (the kernel's rule, numpy's and torch's argmax, llama.cpp's greedy sampler), so a target tied with a
  lower id counts as wrong, tied with a higher id as right: the verdict is what a greedy decoder with that rule
  does. Such an entry's margin is 0, so it is always reported at risk.
- certified: every target probability p > 0.5 (strictly; p = 0.5 is not certified). Certified implies exact.
- first failure: the first position whose argmax is wrong (None when exact); token accuracy = first failure / l
  (1 when exact): the share of the value greedy decoding gets right before it derails.
- min p, min margin (target logit minus the best other logit; > 0 wins outright, 0 ties), the sub-threshold
  positions (p <= 0.5), the wrong-argmax positions and the low-margin positions (margin < risk_margin).
- at risk: exact, but with a margin under `risk_margin` (default 1.0 logit) or some p <= 0.5: entries that a
  quantised base or another runtime may lose. llama.cpp itself moves logits with the number of tokens in a
  decode (on the Q4_1 default model, margins of a packed pass and of one-entry decodes differ by 0.07 logits on
  average, up to ~0.5), so a margin under ~0.5 is not a stable verdict even within one runtime.

Totals (`Totals`): exact-match rate, certified rate, token accuracy (greedy-correct tokens over all answer
tokens), mean answer CE, at-risk count. The report folder (`ReportWriter`), written under a temporary name and
renamed when complete: report.json (totals, settings, backend, timings), entries.jsonl (one line per entry,
streamed), target_probability.png.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .errors import UserError
from .scoring import TokenStats

BACKENDS = ("llama", "torch")
DEFAULT_RISK_MARGIN = 1.0
PLOT_NAME = "target_probability.png"
KEEP_LINES = 20  # failing / at-risk entries named in report.json and on the terminal


# --------------------------------------------------------------------------------------------------------------
# Verdicts: pure functions of per-token statistics
# --------------------------------------------------------------------------------------------------------------

@dataclass
class ScoredBatch:
    """What a backend produces for a group of entries: their per-token statistics, concatenated in entry order
    (answer positions in order within an entry)."""

    indices: np.ndarray  # [k] entry indices into the verified examples
    lengths: np.ndarray  # [k] answer tokens of each entry
    targets: np.ndarray  # [sum(lengths)] target token ids
    stats: TokenStats  # [sum(lengths)] rows


@dataclass
class EntryVerdict:
    index: int
    answer_tokens: int
    exact: bool
    certified: bool
    at_risk: bool
    first_failure: int | None  # first position whose teacher-forced argmax is wrong
    token_accuracy: float  # greedy-correct tokens / answer tokens
    min_p: float
    min_p_position: int
    min_margin: float
    min_margin_position: int
    ce: float  # mean answer-token cross-entropy (nats)
    sub_threshold: list[int]  # positions with p <= 0.5
    wrong_argmax: list[int]  # positions whose teacher-forced argmax is not the target
    low_margin: list[int]  # positions whose margin is below the risk margin (wrong ones included)
    predicted: int | None  # the greedy token at the first failure

    @property
    def greedy_correct(self) -> int:
        return self.answer_tokens if self.first_failure is None else self.first_failure


def verdicts(stats: TokenStats, targets, lengths, indices=None,
             risk_margin: float = DEFAULT_RISK_MARGIN) -> list[EntryVerdict]:
    """Verdicts of consecutive entries whose rows are concatenated in `stats` (lengths[i] rows each, >= 1).

    Vectorised over the whole block (segment reductions); only the assembly of each verdict is per entry.
    A row without a distribution (NaN probability: the logits held NaN or +inf) counts as wrong and
    sub-threshold."""
    targets = np.asarray(targets, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(targets) != len(stats) or int(lengths.sum()) != len(stats):
        raise ValueError(f"{len(stats)} rows of statistics, {len(targets)} targets, lengths sum {lengths.sum()}")
    if (lengths < 1).any():
        raise ValueError("every entry needs at least one answer token")
    indices = np.arange(len(lengths)) if indices is None else np.asarray(indices)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    prob = stats.prob
    wrong = stats.argmax != targets
    sub = ~(prob > 0.5)  # NaN counts as sub-threshold
    n_sub = np.add.reduceat(sub.astype(np.int64), starts)
    # For the argmin positions NaN must win: NaN probability / margin is the worst case.
    p_key = np.where(np.isnan(prob), -np.inf, prob)
    m_key = np.where(np.isnan(stats.margin), -np.inf, stats.margin)
    min_p = np.minimum.reduceat(p_key, starts)
    min_margin = np.minimum.reduceat(m_key, starts)
    ce_sum = np.add.reduceat(-stats.logprob, starts)
    wrong_pos = np.flatnonzero(wrong)
    sub_pos = np.flatnonzero(sub)
    low_pos = np.flatnonzero(~(stats.margin >= risk_margin))
    entry_of = np.repeat(np.arange(len(lengths)), lengths)
    wrong_split = np.split(wrong_pos, np.searchsorted(wrong_pos, starts[1:]))
    sub_split = np.split(sub_pos, np.searchsorted(sub_pos, starts[1:]))
    low_split = np.split(low_pos, np.searchsorted(low_pos, starts[1:]))
    # argmin within each segment: the first row reaching the segment minimum
    p_at_min = np.flatnonzero(p_key == min_p[entry_of])
    m_at_min = np.flatnonzero(m_key == min_margin[entry_of])
    p_first = p_at_min[np.searchsorted(p_at_min, starts)]
    m_first = m_at_min[np.searchsorted(m_at_min, starts)]

    out = []
    for k in range(len(lengths)):
        s, n = int(starts[k]), int(lengths[k])
        w = wrong_split[k]
        first = int(w[0]) - s if len(w) else None
        certified = bool(n_sub[k] == 0)
        exact = first is None
        mm = float(min_margin[k])
        out.append(EntryVerdict(
            index=int(indices[k]), answer_tokens=n, exact=exact, certified=certified,
            at_risk=exact and (not certified or not mm >= risk_margin),
            first_failure=first, token_accuracy=(n if first is None else first) / n,
            min_p=float(prob[p_first[k]]), min_p_position=int(p_first[k]) - s,
            min_margin=float(stats.margin[m_first[k]]), min_margin_position=int(m_first[k]) - s,
            ce=float(ce_sum[k]) / n,
            sub_threshold=(sub_split[k] - s).tolist(), wrong_argmax=(w - s).tolist(),
            low_margin=(low_split[k] - s).tolist(),
            predicted=None if first is None else int(stats.argmax[s + first]),
        ))
    return out


def entry_verdict(stats: TokenStats, targets, risk_margin: float = DEFAULT_RISK_MARGIN) -> EntryVerdict:
    """The verdict of one entry from its answer tokens' statistics."""
    return verdicts(stats, targets, [len(stats)], risk_margin=risk_margin)[0]


@dataclass
class Totals:
    """Running totals over entries, in constant memory."""

    entries: int = 0
    answer_tokens: int = 0
    exact: int = 0
    certified: int = 0
    at_risk: int = 0
    greedy_correct: int = 0
    above_threshold: int = 0  # answer tokens with p > 0.5
    ce_sum: float = 0.0
    min_p: float = math.inf
    min_margin_exact: float = math.inf  # the smallest margin among exact entries
    failing_lines: list[int] = field(default_factory=list)
    at_risk_lines: list[int] = field(default_factory=list)
    non_finite: int = 0  # entries with a NaN or infinite statistic (min p, min margin, CE): null in the report
    non_finite_lines: list[int] = field(default_factory=list)

    def add(self, v: EntryVerdict, line: int) -> None:
        self.entries += 1
        if not all(math.isfinite(x) for x in (v.min_p, v.min_margin, v.ce)):
            self.non_finite += 1
            if len(self.non_finite_lines) < KEEP_LINES:
                self.non_finite_lines.append(line)
        self.answer_tokens += v.answer_tokens
        self.exact += v.exact
        self.certified += v.certified
        self.at_risk += v.at_risk
        self.greedy_correct += v.greedy_correct
        self.above_threshold += v.answer_tokens - len(v.sub_threshold)
        self.ce_sum += v.ce * v.answer_tokens
        self.min_p = min(self.min_p, v.min_p) if not math.isnan(v.min_p) else math.nan
        if v.exact:
            self.min_margin_exact = min(self.min_margin_exact, v.min_margin)
        if not v.exact and len(self.failing_lines) < KEEP_LINES:
            self.failing_lines.append(line)
        if v.at_risk and len(self.at_risk_lines) < KEEP_LINES:
            self.at_risk_lines.append(line)

    def summary(self) -> dict:
        n, t = max(self.entries, 1), max(self.answer_tokens, 1)
        return {
            "entries": self.entries, "answer_tokens": self.answer_tokens,
            "exact": self.exact, "exact_match_rate": self.exact / n,
            "certified": self.certified, "certified_rate": self.certified / n,
            "token_accuracy": self.greedy_correct / t,
            "mean_ce": self.ce_sum / t,
            "above_threshold": self.above_threshold / t,
            "at_risk": self.at_risk,
            "min_p": _finite(self.min_p),
            "min_margin_exact": _finite(self.min_margin_exact),
            "failing_lines": self.failing_lines, "at_risk_lines": self.at_risk_lines,
            "non_finite_entries": self.non_finite, "non_finite_lines": self.non_finite_lines,
        }


def _finite(x: float):
    return None if x is None or not math.isfinite(x) else x


def json_safe(obj):
    """obj with every NaN or infinite float (numpy's too) replaced by None, so that it is valid JSON."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    return obj


def _round(x: float, digits: int = 6):
    return None if x is None or not math.isfinite(x) else round(x, digits)


# --------------------------------------------------------------------------------------------------------------
# Greedy generation against the teacher-forced verdict
# --------------------------------------------------------------------------------------------------------------

@dataclass
class Generated:
    """Real greedy generation of one entry, stopped at its first divergence from the target."""

    index: int
    tokens: list[int]  # generated ids: the matching prefix, then the wrong token if there was one
    first_divergence: int | None  # None: all answer tokens reproduced
    margins: list[float] = field(default_factory=list)  # per step: target logit - best other logit


def compare_generation(generated: list[Generated], teacher_forced: dict[int, tuple[EntryVerdict, np.ndarray]],
                       lines: list[int], near: float = DEFAULT_RISK_MARGIN) -> dict:
    """Agreement of generation with the teacher-forced verdicts: same exactness and the same first failure.

    teacher_forced: entry index -> (verdict, per-position margins). Each disagreement names the position where
    the two first differ and both margins there (teacher-forced, generated). `tie`: one of them is exactly 0
    (the lowest-id rule decided). `near_tie`: both are within `near` (the risk margin) of 0. llama.cpp's logits
    depend on how many tokens a decode holds (its CPU kernels change with the batch size): on the Q4_1 default
    model the margins of a packed pass and of one-entry decodes differ by 0.07 logits on average, up to ~0.5, so
    a batched teacher-forced pass and one-token-at-a-time generation can split such a close call; that is what
    the at-risk flag is for. Anything else is `unexplained`."""
    disagreements = []
    for g in generated:
        v, margins = teacher_forced[g.index]
        if g.first_divergence == v.first_failure:
            continue
        pos = min(p for p in (g.first_divergence, v.first_failure) if p is not None)
        tf = float(margins[pos])
        gen = float(g.margins[pos]) if pos < len(g.margins) else math.nan
        tie = tf == 0.0 or gen == 0.0
        disagreements.append({
            "line": lines[g.index], "teacher_forced_first_failure": v.first_failure,
            "generated_first_divergence": g.first_divergence, "position": pos,
            "teacher_forced_margin": _round(tf), "generated_margin": _round(gen),
            "tie": tie, "near_tie": not tie and abs(tf) < near and abs(gen) < near,
        })
    return {"entries": len(generated), "agree": len(generated) - len(disagreements),
            "disagreements": disagreements,
            "ties": sum(d["tie"] for d in disagreements),
            "near_ties": sum(d["near_tie"] for d in disagreements),
            "unexplained": sum(not (d["tie"] or d["near_tie"]) for d in disagreements)}


def generation_sample(n: int, k: int) -> list[int]:
    """K entry indices spread evenly over n entries (all of them when k >= n)."""
    if k <= 0:
        return []
    if k >= n:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, k).round().astype(int).tolist()))


# --------------------------------------------------------------------------------------------------------------
# The per-position probability picture
# --------------------------------------------------------------------------------------------------------------

class ProbabilityPlot:
    """Accumulates what the PNG needs in bounded memory: the full per-position probabilities of the first
    `keep` entries (for a heat map of long values) and, for every entry, a histogram of p per position index
    (for the distribution of many short ones)."""

    BINS = 40

    def __init__(self, keep: int = 64, max_positions: int = 512, keep_tokens: int = 200_000):
        self.keep, self.keep_tokens = keep, keep_tokens
        self.kept: list[np.ndarray] = []
        self.kept_tokens = 0
        self.max_positions = max_positions
        self.hist = np.zeros((max_positions, self.BINS), dtype=np.int64)
        self.min_p = []  # per-entry min p, subsampled beyond 200k entries
        self.entries = 0
        self.longest = 0

    def add(self, prob: np.ndarray) -> None:
        self.entries += 1
        self.longest = max(self.longest, len(prob))
        p = np.nan_to_num(prob, nan=0.0)
        if len(self.kept) < self.keep and self.kept_tokens + len(p) <= self.keep_tokens:
            self.kept.append(p.astype(np.float32))
            self.kept_tokens += len(p)
        n = min(len(p), self.max_positions)
        bins = np.minimum((p[:n] * self.BINS).astype(np.int64), self.BINS - 1)
        np.add.at(self.hist, (np.arange(n), bins), 1)
        if len(self.min_p) < 200_000:
            self.min_p.append(float(p.min()))

    def write(self, path: Path, title: str) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        long_values = self.longest > 64 and len(self.kept) == self.entries
        if long_values:
            fig = self._heat_map(plt, title)
        else:
            fig = self._distribution(plt, title)
        fig.savefig(path, dpi=110)
        plt.close(fig)

    def _heat_map(self, plt, title):
        if len(self.kept) == 1:  # one long value: wrap its positions into rows
            p = self.kept[0]
            width = next((w for w in (10, 20, 25, 50) if w >= math.sqrt(4 * len(p))), 100)
            rows = math.ceil(len(p) / width)
            grid = np.full(rows * width, np.nan, dtype=np.float32)
            grid[: len(p)] = p
            grid = grid.reshape(rows, width)
            ylabel, xlabel = f"answer position (rows of {width})", "+ offset in the row"
        else:
            width = max(len(p) for p in self.kept)
            grid = np.full((len(self.kept), width), np.nan, dtype=np.float32)
            for i, p in enumerate(self.kept):
                grid[i, : len(p)] = p
            ylabel, xlabel = "entry", "answer position"
        fig, ax = plt.subplots(figsize=(10, max(3.0, min(12.0, 0.25 * grid.shape[0] + 2))))
        cmap = plt.get_cmap("RdYlGn").with_extremes(bad="white")
        im = ax.imshow(grid, aspect="auto", cmap=cmap, vmin=0, vmax=1, interpolation="nearest")
        stubborn = np.argwhere(grid <= 0.5)
        if 0 < len(stubborn) <= 500:
            ax.scatter(stubborn[:, 1], stubborn[:, 0], s=6, marker="x", c="black", linewidths=0.6,
                       label="p <= 0.5")
            ax.legend(loc="upper right", fontsize=8)
        from matplotlib.ticker import FuncFormatter, MaxNLocator

        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        if len(self.kept) == 1:
            ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{int(y) * width}"))
        fig.colorbar(im, ax=ax, label="target probability p")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        return fig

    def _distribution(self, plt, title):
        n_pos = min(self.longest, self.max_positions)
        hist = self.hist[:n_pos].astype(np.float64)
        hist /= np.maximum(hist.sum(axis=1, keepdims=True), 1)
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
        im = a1.imshow(hist.T, origin="lower", aspect="auto", cmap="viridis", extent=(-0.5, n_pos - 0.5, 0, 1),
                       interpolation="nearest")
        a1.axhline(0.5, color="red", lw=0.8, ls="--")
        a1.set_xlabel("answer position")
        a1.set_ylabel("target probability p")
        a1.set_title("share of entries by p, per position", fontsize=10)
        fig.colorbar(im, ax=a1)
        a2.hist(self.min_p, bins=50, range=(0, 1), color="tab:blue")
        a2.axvline(0.5, color="red", lw=0.8, ls="--")
        if self.entries > 100:
            a2.set_yscale("log")
        a2.set_xlabel("smallest target probability of the entry")
        a2.set_ylabel("entries")
        a2.set_title(f"{self.entries} entries", fontsize=10)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig


# --------------------------------------------------------------------------------------------------------------
# The report folder, written atomically
# --------------------------------------------------------------------------------------------------------------

def check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file, or a non-empty folder that is not an earlier verify report."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise UserError(f"--out {out} is a non-empty folder that is not a verify report; refusing to replace it")


class ReportWriter:
    """Writes into a hidden temporary folder beside `out`; `commit` renames it to `out` (replacing an earlier
    report), `abort` removes it. entries.jsonl is streamed: one line per entry, nothing kept."""

    def __init__(self, out: Path):
        self.out = Path(out)
        check_out_dir(self.out)
        self.tmp = None
        try:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.", suffix=".tmp", dir=self.out.parent))
            self.entries = open(self.tmp / "entries.jsonl", "w", encoding="utf-8")
        except OSError as e:
            if self.tmp is not None:
                shutil.rmtree(self.tmp, ignore_errors=True)
            raise UserError(f"--out {self.out}: cannot create the report folder ({e.strerror or e})") from None

    def entry(self, row: dict) -> None:
        try:
            self.entries.write(json.dumps(json_safe(row), ensure_ascii=False, allow_nan=False) + "\n")
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write the report ({e.strerror or e})") from None

    def commit(self, report: dict, plot: ProbabilityPlot | None, title: str) -> None:
        text = json.dumps(json_safe(report), indent=2, ensure_ascii=False, allow_nan=False) + "\n"
        try:
            self.entries.close()
            if plot is not None and plot.entries:
                plot.write(self.tmp / PLOT_NAME, title)
            (self.tmp / "report.json").write_text(text)
            old = None
            if self.out.exists():
                old = self.out.with_name(f".{self.out.name}.{os.getpid()}.old")
                os.replace(self.out, old)
            try:
                os.replace(self.tmp, self.out)
            except OSError:
                if old is not None:  # put the earlier report back
                    os.replace(old, self.out)
                raise
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write the report ({e.strerror or e})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if not self.entries.closed:
            self.entries.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def entry_row(v: EntryVerdict, line: int, key: str, tokenizer=None, target_ids=None) -> dict:
    """The entries.jsonl line of one verdict."""
    row = {"line": line, "key": key, "exact": v.exact, "certified": v.certified, "at_risk": v.at_risk,
           "answer_tokens": v.answer_tokens, "first_failure": v.first_failure,
           "token_accuracy": round(v.token_accuracy, 6), "min_p": _round(v.min_p),
           "min_p_position": v.min_p_position, "min_margin": _round(v.min_margin, 4),
           "min_margin_position": v.min_margin_position, "mean_ce": _round(v.ce),
           "sub_threshold": v.sub_threshold, "wrong_argmax": v.wrong_argmax, "low_margin": v.low_margin}
    if v.first_failure is not None and target_ids is not None:
        expected = int(target_ids[v.first_failure])
        row["at_failure"] = {"expected": expected, "greedy": v.predicted}
        if tokenizer is not None:
            row["at_failure"].update(expected_text=tokenizer.decode([expected]),
                                     # no token at all (-1) where the logits held no distribution (NaN)
                                     greedy_text=tokenizer.decode([v.predicted]) if v.predicted >= 0 else None)
    return row


# --------------------------------------------------------------------------------------------------------------
# What --lora names
# --------------------------------------------------------------------------------------------------------------

@dataclass
class AdapterSource:
    """The adapter a user named, in the forms it exists in."""

    given: Path | None
    run_dir: Path | None = None  # a memcli run folder (config.yaml + adapter/)
    peft_dir: Path | None = None  # PEFT adapter folder (for the torch backend; exported for llama.cpp)
    gguf: Path | None = None  # llama.cpp adapter (for the llama backend)
    settings: dict = field(default_factory=dict)  # the run's settings (corpus options, model)


def _run_settings(run_dir: Path) -> dict:
    import yaml

    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise UserError(f"run config {run_dir / 'config.yaml'} cannot be read ({e})") from None
    settings = config.get("settings") if isinstance(config, dict) else None
    if not isinstance(settings, dict):
        raise UserError(f"run config {run_dir / 'config.yaml'} has no settings")
    return settings


def _is_run(path: Path) -> bool:
    return (path / "config.yaml").is_file() and (path / "adapter").is_dir()


def resolve_adapter(lora: str | os.PathLike | None) -> AdapterSource:
    if lora is None:
        return AdapterSource(None)
    path = Path(lora)
    if not path.exists():
        raise UserError(f"--lora {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"--lora {path}: expected a run folder, a PEFT adapter folder or an adapter .gguf")
        src = AdapterSource(path, gguf=path)
        if _is_run(path.parent):  # RUN/adapter.gguf: the run's settings and PEFT adapter come along
            src.run_dir, src.peft_dir = path.parent, path.parent / "adapter"
            src.settings = _run_settings(path.parent)
        return src
    if _is_run(path):
        if not (path / "adapter" / "adapter_config.json").exists():
            raise UserError(f"run folder {path} has no finished adapter (adapter/adapter_config.json is missing)")
        gguf = path / "adapter.gguf"
        return AdapterSource(path, run_dir=path, peft_dir=path / "adapter", gguf=gguf if gguf.exists() else None,
                             settings=_run_settings(path))
    if (path / "adapter_config.json").exists():
        src = AdapterSource(path, peft_dir=path)
        if _is_run(path.parent) and path.parent / "adapter" == path:
            src.run_dir, src.settings = path.parent, _run_settings(path.parent)
            gguf = path.parent / "adapter.gguf"
            src.gguf = gguf if gguf.exists() else None
        return src
    raise UserError(f"--lora {path} is not a memcli run folder, a PEFT adapter folder or an adapter .gguf")


def _gguf_is_stale(src: AdapterSource) -> bool:
    """RUN/adapter.gguf older than RUN/adapter/ (training resumed after the export)."""
    if src.gguf is None or src.peft_dir is None or src.gguf == src.given:
        return False
    return any(p.stat().st_mtime > src.gguf.stat().st_mtime for p in src.peft_dir.glob("adapter_model.*"))


def _peft_base_model(peft_dir: Path) -> str | None:
    """The model a bare PEFT folder names (base_model_name_or_path), when memcli can resolve it."""
    from . import models

    try:
        recorded = json.loads((peft_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if not recorded:
        return None
    if recorded in models.registry():
        return recorded
    from .export import _model_name_for  # memcli's cache folder of a named model -> its name

    return _model_name_for(recorded) or (recorded if Path(recorded).is_dir() else None)


def _peft_recorded_base(peft_dir: Path) -> str | None:
    """base_model_name_or_path as a PEFT folder's adapter_config.json records it (None when absent)."""
    try:
        recorded = json.loads((peft_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(recorded) if recorded else None


def base_fingerprint(spec):
    """The fingerprint (memcli.export.Fingerprint) of a model as a base: from its GGUF when it comes as one (no
    dequantising), else from its HF folder. The two agree for the same base."""
    from . import models
    from .export import gguf_fingerprint, hf_fingerprint

    return gguf_fingerprint(spec.gguf_path) if spec.gguf_path is not None else hf_fingerprint(models.hf_dir(spec))


def recorded_base(src: AdapterSource, peft_base: str | None, spec):
    """(fingerprint, model name) of the base the adapter was trained for, when something records one that may
    differ from `spec`: the fingerprint in the adapter GGUF, else the run's model or the PEFT folder's base
    (fingerprinted now). None when nothing does, or when the record names `spec` itself."""
    from . import models
    from .export import Fingerprint, adapter_info

    if src.gguf is not None:
        try:
            info = adapter_info(src.gguf)
        except UserError:  # an unreadable GGUF beside the PEFT adapter: fall back to the recorded model name
            info = {"fingerprint": None}
        if info["fingerprint"]:
            return Fingerprint(info["fingerprint"], info["weights"]), info["model"] or "another model"
    name = src.settings.get("model") or peft_base
    if not name:
        return None
    trained = models.resolve(name)
    if trained.name == spec.name:
        return None
    return base_fingerprint(trained), name


def check_base(recorded, spec, adapter) -> None:
    """Refuse a base other than the one the adapter was trained for (the torch backend's counterpart of
    memcli.export.check_pair). recorded: recorded_base's answer."""
    if recorded is None:
        return
    ours, trained_for = recorded
    theirs = base_fingerprint(spec)
    if not ours.matches(theirs):
        raise UserError(f"adapter {adapter} was trained for {trained_for}, base {spec.name} is another model "
                        f"(fingerprint {ours} vs {theirs})")


def check_vocabulary(examples, n_vocab: int, model: str) -> None:
    """Refuse token ids (prompt or target) outside the model's vocabulary: the tokenizer is not this model's."""
    for ex in examples:
        ids = ex.input_ids
        bad = next((t for t in ids if not 0 <= t < n_vocab), None)
        if bad is not None:
            raise UserError(f"corpus line {ex.line}: token id {bad} is outside the vocabulary of {model} ({n_vocab} "
                            "tokens): the tokenizer does not belong to this model")


# --------------------------------------------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------------------------------------------

@dataclass
class VerifyOptions:
    backend: str = "llama"
    n_gpu_layers: int | None = None  # llama: None = all when llama.cpp has GPU offload, else 0
    threads: int | None = None
    batch_tokens: int = 2048
    generate: int = 0
    min_exact: float = 1.0
    answer_tokens: int | None = None
    chat_template: bool | None = None  # None: the run's setting, else False
    eos: bool | None = None
    key: str | None = None
    risk_margin: float = DEFAULT_RISK_MARGIN
    kv_type: str = "f16"  # llama.cpp KV cache type: f16 (llama.cpp's default) or f32
    device: str = "auto"  # torch backend
    plot: bool = True
    allow_conflicting_keys: bool | None = None  # None: the run's setting, else False

    def validate(self) -> None:
        checks = [
            (self.backend in BACKENDS, f"--backend must be one of {', '.join(BACKENDS)}, got '{self.backend}'"),
            (self.batch_tokens >= 1, f"--batch-tokens must be at least 1, got {self.batch_tokens}"),
            (self.generate >= 0, f"--generate must be at least 0, got {self.generate}"),
            (0.0 <= self.min_exact <= 1.0, f"--min-exact must be between 0 and 1, got {self.min_exact}"),
            (self.threads is None or self.threads >= 1, f"--threads must be at least 1, got {self.threads}"),
            (self.risk_margin >= 0, f"--risk-margin must be >= 0, got {self.risk_margin}"),
            (self.kv_type in ("f16", "f32"), f"--kv-type must be f16 or f32, got '{self.kv_type}'"),
            (self.answer_tokens is None or self.answer_tokens >= 1,
             f"--answer-tokens must be at least 1, got {self.answer_tokens}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UserError(message)


def _prompt_texts(entries, tokenizer, chat_template: bool) -> list[str | None]:
    """The text llama.cpp would be prompted with for each entry (None: no key, the prompt is a lone BOS)."""
    from .corpus import SYSTEM_PROMPT

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


def verify(corpus_path: str | os.PathLike, out: str | os.PathLike, *, lora: str | os.PathLike | None = None,
           model: str | None = None, options: VerifyOptions | None = None,
           progress: Callable[[int, int], None] | None = None, log: Callable[[str], None] = print) -> dict:
    """Verify greedy verbatim recall of every entry of a corpus; write the report folder `out`; return the
    report (report.json's content). Bad input raises UserError before anything is written."""
    from . import corpus, models

    t_start = time.perf_counter()
    opts = options or VerifyOptions()
    opts.validate()
    out = Path(out)
    check_out_dir(out)
    src = resolve_adapter(lora)
    s = src.settings
    chat_template = opts.chat_template if opts.chat_template is not None else bool(s.get("chat_template", False))
    eos = opts.eos if opts.eos is not None else bool(s.get("eos", False))
    key = opts.key if opts.key is not None else s.get("key", "") or ""
    answer_tokens = opts.answer_tokens if opts.answer_tokens is not None else s.get("answer_tokens")

    allow_conflicts = (opts.allow_conflicting_keys if opts.allow_conflicting_keys is not None
                       else bool(s.get("allow_conflicting_keys", False)))
    # format errors first, before any model loads
    entries = corpus.read_corpus(corpus_path, key, allow_conflicting_keys=allow_conflicts)

    # The base: --model, else the run's model, else the model the adapter GGUF names, else the default (never
    # for a bare PEFT folder: its base is the one it names, or --model).
    adapter_model = peft_base = None
    if src.gguf is not None and not s:
        from .export import adapter_info

        adapter_model = adapter_info(src.gguf).get("model")
        if adapter_model is not None and adapter_model not in models.registry():
            adapter_model = None
    if src.peft_dir is not None and not s:
        peft_base = _peft_base_model(src.peft_dir)
        if peft_base is None and model is None:
            named = _peft_recorded_base(src.peft_dir)
            raise UserError(f"--lora {src.given}: the base model its adapter_config.json names "
                            f"({named!r}) is not a memcli model name or a local model folder; pass --model"
                            if named else f"--lora {src.given}: its adapter_config.json does not name the base "
                            "model (no base_model_name_or_path); pass --model")
        if model is None:
            adapter_model = peft_base
    model_name = model or s.get("model") or adapter_model or models.DEFAULT_MODEL
    spec = models.resolve(model_name)
    # The tokenizer of the shared tokenisation: the training model's (a quantised GGUF of the same base shares it).
    token_spec = spec
    if spec.kind == "gguf" and (s.get("model") or adapter_model):
        token_spec = models.resolve(s.get("model") or adapter_model)
    tokenizer = models.load_tokenizer(token_spec)
    examples = corpus.prepare(entries, tokenizer, chat_template=chat_template, eos=eos, answer_tokens=answer_tokens,
                              path=corpus_path)
    entries = entries[: len(examples)]
    lines = [ex.line for ex in examples]

    backend, temp_dir, settings_extra = None, None, {}
    writer = None
    try:
        if opts.backend == "llama":
            from .export import base_gguf, check_pair, export_adapter
            from .llama_backend import LlamaBackend

            if src.given is not None and src.gguf is None and src.run_dir is None:
                # a bare PEFT folder is exported onto this base, so check_pair below cannot tell: check here
                check_base(recorded_base(src, peft_base, spec), spec, src.given)
            base = spec.gguf_path if spec.gguf_path is not None else base_gguf(spec)
            adapter = src.gguf
            if src.given is not None and (adapter is None or _gguf_is_stale(src)):
                temp_dir = tempfile.mkdtemp(prefix="memcli-verify-")
                adapter = Path(temp_dir) / "adapter.gguf"
                why = "is older than its adapter/" if src.gguf is not None else "has none"
                log(f"exporting the adapter to GGUF for llama.cpp ({src.run_dir or src.peft_dir} {why})")
                export_adapter(src.run_dir or src.peft_dir, adapter,
                               base=None if (src.run_dir or model is None) else spec)
            if adapter is not None:
                check_pair(adapter, base)
            backend = LlamaBackend(base, adapter, n_gpu_layers=opts.n_gpu_layers, threads=opts.threads,
                                   kv_type=opts.kv_type, log=log)
            settings_extra = {"base_gguf": str(base), "adapter_gguf": str(src.gguf or adapter) if adapter else None}
        else:
            from .torch_backend import TorchBackend

            peft_dir = src.peft_dir
            if src.given is not None and peft_dir is None:
                raise UserError(f"--backend torch needs the PEFT adapter: {src.given} is a GGUF with no memcli run "
                                "folder beside it; give the run folder or the PEFT adapter folder as --lora")
            expect = recorded_base(src, peft_base, spec) if src.given is not None else None
            backend = TorchBackend(spec, peft_dir, device=opts.device, threads=opts.threads, expect_base=expect)
            settings_extra = {"peft_adapter": str(peft_dir) if peft_dir else None}
        corpus.check_context(examples, backend.n_ctx_train, corpus_path)
        backend.open(examples, opts.batch_tokens)

        tokenizer_check = None
        if opts.backend == "llama":
            bad = tokenization_mismatches(backend.tokenize, examples, entries, tokenizer, chat_template, eos,
                                          prefix_only=answer_tokens is not None and len(examples) == 1)
            tokenizer_check = {"mismatches": len(bad), "lines": [lines[i] for i in bad[:KEEP_LINES]]}
            if bad:
                log(f"warning: llama.cpp's own tokenizer splits {len(bad)} of {len(examples)} entries differently "
                    f"from the ids verified (first: {corpus_path}:{lines[bad[0]]}); the verdicts hold for the ids "
                    "training used")
        t_setup = time.perf_counter() - t_start

        # --- the teacher-forced pass: stream batches into verdicts and entries.jsonl --------------------
        writer = ReportWriter(out)
        totals = Totals()
        plot = ProbabilityPlot() if opts.plot else None
        wanted = set(generation_sample(len(examples), opts.generate))
        kept: dict[int, tuple[EntryVerdict, np.ndarray]] = {}  # the entries --generate will run
        t_pass = time.perf_counter()
        t_verdict = 0.0
        done = 0
        for batch in backend.score(examples, opts.batch_tokens):
            t0 = time.perf_counter()
            vs = verdicts(batch.stats, batch.targets, batch.lengths, batch.indices, opts.risk_margin)
            offset = 0
            for v in vs:
                i = v.index
                writer.entry(entry_row(v, lines[i], entries[i].key, tokenizer, examples[i].target_ids))
                totals.add(v, lines[i])
                if plot is not None:
                    plot.add(batch.stats.prob[offset: offset + v.answer_tokens])
                if i in wanted:
                    kept[i] = (v, batch.stats.margin[offset: offset + v.answer_tokens].copy())
                offset += v.answer_tokens
            done += len(vs)
            t_verdict += time.perf_counter() - t0
            if progress is not None:
                progress(done, len(examples))
        t_pass = time.perf_counter() - t_pass
        timing = dict(backend.timings)  # the teacher-forced pass alone (generation below adds its own decodes)

        generation = None
        if wanted:
            t0 = time.perf_counter()
            generated = backend.generate(examples, sorted(wanted))
            generation = compare_generation(generated, kept, lines, near=opts.risk_margin)
            generation["seconds"] = round(time.perf_counter() - t0, 3)
            if generation["disagreements"]:
                log(f"warning: greedy generation disagrees with the teacher-forced first failure on "
                    f"{len(generation['disagreements'])} of {len(generated)} entries: {generation['ties']} at an "
                    f"exact logit tie, {generation['near_ties']} at a near tie (|margin| < {opts.risk_margin} "
                    f"in both), {generation['unexplained']} otherwise")

        summary = totals.summary()
        decode = timing.get("decode_s", 0.0)
        timing.update(setup_s=round(t_setup, 3), pass_s=round(t_pass, 3), verdict_s=round(t_verdict, 3),
                      total_s=round(time.perf_counter() - t_start, 3),
                      entries_per_s=round(len(examples) / t_pass, 2) if t_pass else None,
                      answer_tokens_per_s=round(totals.answer_tokens / t_pass, 1) if t_pass else None,
                      overhead_vs_decode=round((t_pass - decode) / decode, 4) if decode else None)
        passed = summary["exact_match_rate"] >= opts.min_exact
        report = {
            "passed": passed,
            "totals": summary,
            "settings": {"corpus": str(corpus_path), "lora": str(lora) if lora is not None else None,
                         "model": spec.name, "backend": opts.backend, "batch_tokens": opts.batch_tokens,
                         "threads": opts.threads, "n_gpu_layers": opts.n_gpu_layers, "generate": opts.generate,
                         "min_exact": opts.min_exact, "risk_margin": opts.risk_margin, "kv_type": opts.kv_type,
                         "chat_template": chat_template, "eos": eos, "key": key, "answer_tokens": answer_tokens,
                         **settings_extra},
            "backend": backend.describe(),
            "tokenizer_check": tokenizer_check,
            "generation": generation,
            "timings": {k: (round(v, 4) if isinstance(v, float) else v) for k, v in timing.items()},
        }
        title = (f"{Path(corpus_path).name}: exact {summary['exact']}/{summary['entries']}, certified "
                 f"{summary['certified']}, at risk {summary['at_risk']} ({opts.backend})")
        writer.commit(report, plot, title)
        writer = None
        return json_safe(report)  # as report.json holds it: NaN and infinities are None
    finally:
        if writer is not None:
            writer.abort()
        if backend is not None:
            backend.close()
        if temp_dir is not None:
            shutil.rmtree(temp_dir, ignore_errors=True)


def iter_entries(out: str | os.PathLike) -> Iterator[dict]:
    """The rows of a report's entries.jsonl, one at a time."""
    with open(Path(out) / "entries.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


__all__ = ["ScoredBatch", "EntryVerdict", "Totals", "Generated", "VerifyOptions", "verdicts", "entry_verdict",
           "compare_generation", "generation_sample", "verify", "iter_entries", "resolve_adapter"]
