"""Verdicts: from per-token statistics (`memcli.core.scoring.TokenStats`) to what each entry's recall is. The one
verdict function that training's clean pass (`memcli.training.forward.evaluate`), `memcli verify` and the agreement
check share, and the result types the backends produce (docs/method.md §2).

Per entry (`EntryVerdict`):
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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterable

import numpy as np

from memcli.core.scoring import TokenStats

DEFAULT_RISK_MARGIN = 1.0
KEEP_LINES = 20  # failing / at-risk entries named in a report and on the terminal


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
class Generated:
    """Real greedy generation of one entry, stopped at its first divergence from the target."""

    index: int
    tokens: list[int]  # generated ids: the matching prefix, then the wrong token if there was one
    first_divergence: int | None  # None: all answer tokens reproduced
    margins: list[float] = field(default_factory=list)  # per step: target logit - best other logit


def passes(exact_match_rate: float, min_exact: float) -> bool:
    """The pass rule of `--min-exact`: the share of entries recalled exactly is at least the one required."""
    return exact_match_rate >= min_exact


@dataclass
class RecallTotals:
    """Running totals over entries' verdicts, in constant memory: a pass's row of a report or deploy table."""

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
    min_margin: float = math.inf  # the smallest margin of any answer token (negative: a greedy error)
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
        self.min_margin = min(self.min_margin, v.min_margin) if not math.isnan(v.min_margin) else math.nan
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
            "min_margin_exact": _finite(self.min_margin_exact), "min_margin": _finite(self.min_margin),
            "failing_lines": self.failing_lines, "at_risk_lines": self.at_risk_lines,
            "non_finite_entries": self.non_finite, "non_finite_lines": self.non_finite_lines,
        }


def _finite(x: float):
    return None if x is None or not math.isfinite(x) else x




def _finite(x: float):
    return None if x is None or not math.isfinite(x) else x


def score_stream(backend, pairs: Iterable[tuple[object, object]], batch_tokens: int,
                 risk_margin: float = DEFAULT_RISK_MARGIN, on_entry: Callable | None = None) -> RecallTotals:
    """The teacher-forced pass: (payload, Example) pairs, pulled as the backend's batches need them (a stream;
    each pair is held only until its verdict), scored by `backend.score` (llama.cpp or torch), one verdict per
    entry into the totals. `on_entry(verdict, payload, example, stats, offset)` sees each entry with its batch's
    statistics (its answer tokens are rows offset .. offset + verdict.answer_tokens)."""
    window: dict[int, tuple[object, object]] = {}

    def feed():
        for i, (payload, example) in enumerate(pairs):
            window[i] = (payload, example)
            yield example

    totals = RecallTotals()
    for batch in backend.score(feed(), batch_tokens):
        offset = 0
        for v in verdicts(batch.stats, batch.targets, batch.lengths, batch.indices, risk_margin):
            payload, example = window.pop(v.index)
            totals.add(v, example.line)
            if on_entry is not None:
                on_entry(v, payload, example, batch.stats, offset)
            offset += v.answer_tokens
    return totals
