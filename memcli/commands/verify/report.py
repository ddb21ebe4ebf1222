"""The report of `memcli verify`: the entries.jsonl rows, the per-position probability picture and the report
folder, written whole or not at all (docs/method.md §2 defines what is reported; the running totals are
memcli.core.verdicts.RecallTotals). The report folder (`ReportWriter`) is written under a
hidden temporary name beside --out and renamed into place when complete, replacing an earlier report (which is
put back if the rename fails): report.json (totals, settings, backend, timings), entries.jsonl (one line per
entry, streamed: nothing is kept in memory) and target_probability.png. NaN and infinities become null
(`memcli.core.runs.json_safe`), so both files are strict JSON.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from array import array
from pathlib import Path
from typing import Iterator

import numpy as np

from memcli.core.errors import UserError
from memcli.core.runs import json_safe
from memcli.core.verdicts import EntryVerdict

PLOT_NAME = "target_probability.png"


def rounded(x: float, digits: int = 6):
    """x rounded for the report; None when it is NaN or infinite."""
    return None if x is None or not math.isfinite(x) else round(x, digits)


# --- the per-position probability picture -------------------------------------------------------------------

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
        self.min_p = array("f")  # per-entry min p (4 bytes each), for the first 200k entries
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
            self.min_p.append(float(p.min()) if len(p) else 0.0)

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
        a2.hist(np.frombuffer(self.min_p, np.float32), bins=50, range=(0, 1), color="tab:blue")
        a2.axvline(0.5, color="red", lw=0.8, ls="--")
        if self.entries > 100:
            a2.set_yscale("log")
        a2.set_xlabel("smallest target probability of the entry")
        a2.set_ylabel("entries")
        a2.set_title(f"{self.entries} entries", fontsize=10)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        return fig


# --- the report folder ---------------------------------------------------------------------------------------

def check_out_dir(out: Path) -> None:
    """Refuse an --out that is a file, or a non-empty folder that is not an earlier verify report."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "report.json").exists():
        raise UserError(f"--out {out} is a non-empty folder that is not a verify report; refusing to replace it")


class ReportWriter:
    """Writes into a hidden temporary folder beside `out`; `commit` renames it to `out` (replacing an earlier
    report, which is put back if the rename fails), `abort` removes it. entries.jsonl is streamed: one line per
    entry, nothing kept. (Not `runs.atomic_dir`: the folder stays open over the whole pass, and an earlier report
    must survive a failed rename.) Any OSError on the output is one UserError naming --out."""

    def __init__(self, out: Path):
        self.out = Path(out)
        check_out_dir(self.out)
        self.tmp = None
        self.committed = False
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
            (self.tmp / "report.json").write_text(text, encoding="utf-8")
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
            self.committed = True
        except OSError as e:
            raise UserError(f"--out {self.out}: cannot write the report ({e.strerror or e})") from None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        """Remove the temporary folder (nothing once committed)."""
        if self.committed:
            return
        if not self.entries.closed:
            self.entries.close()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> ReportWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.abort()


def entry_row(v: EntryVerdict, line: int, key: str, tokenizer=None, target_ids=None) -> dict:
    """The entries.jsonl line of one verdict."""
    row = {"line": line, "key": key, "exact": v.exact, "certified": v.certified, "at_risk": v.at_risk,
           "answer_tokens": v.answer_tokens, "first_failure": v.first_failure,
           "token_accuracy": round(v.token_accuracy, 6), "min_p": rounded(v.min_p),
           "min_p_position": v.min_p_position, "min_margin": rounded(v.min_margin, 4),
           "min_margin_position": v.min_margin_position, "mean_ce": rounded(v.ce),
           "sub_threshold": v.sub_threshold, "wrong_argmax": v.wrong_argmax, "low_margin": v.low_margin}
    if v.first_failure is not None and target_ids is not None:
        expected = int(target_ids[v.first_failure])
        row["at_failure"] = {"expected": expected, "greedy": v.predicted}
        if tokenizer is not None:
            row["at_failure"].update(expected_text=tokenizer.decode([expected]),
                                     # no token at all (-1) where the logits held no distribution (NaN)
                                     greedy_text=tokenizer.decode([v.predicted]) if v.predicted >= 0 else None)
    return row


def iter_entries(out: str | os.PathLike) -> Iterator[dict]:
    """The rows of a report's entries.jsonl, one at a time."""
    with open(Path(out) / "entries.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)
