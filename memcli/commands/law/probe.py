"""`memcli plan --probe`: the memory law of the user's own corpus, for any model memcli trains.

Where no shipped law fits (another base model, a kind of corpus no law covers), a small sweep on nested prefixes of
the corpus itself (a few ranks, a few lengths well below the corpus's) is trained in train's own protocol (its
defaults, until recall is certified or the budget ends), the law is fitted on it, and the plan extrapolates it to
the whole corpus: cheap small runs predict the expensive one (docs/method.md §5). The probe is an ordinary sweep
folder, so a rerun continues it, and `memcli fit` / `memcli plan --law` read it like any other.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from memcli.commands.law.fit import fit_and_save
from memcli.commands.law.points import PROBE_RANKS, PROBE_SHARES, LawError, load_points, shared_settings
from memcli.core.errors import UserError
from memcli.training.config import TrainConfig
from memcli.training.sweep import cell_name, run_sweep

MIN_UNSATURATED = 6  # runs that did not certify, for a law of four coefficients with a bootstrap


@dataclass
class Probe:
    """What the probe trained and what it cost."""

    law: Path | None  # the law fitted on its runs (OUT/law.json); None with whole_rank
    folder: Path
    ranks: list[int]
    lengths: list[int]  # answer tokens of each nested prefix
    runs: int
    train_seconds: float  # the runs' training time, summed
    examples: int  # entries trained on, summed over the runs
    whole_rank: int | None = None  # the smallest rank that certified the whole corpus, when the probe got there
    settings: dict | None = None  # with whole_rank: that run's training settings

    def cost_sentence(self, corpus_tokens: int, settings: dict, entries: int) -> str:
        """The probe's cost beside the budget of the training it plans (which stops sooner once certified)."""
        if settings.get("max_steps"):
            budget = f"{settings['max_steps']:,} steps of {settings['batch_size']}"
        else:
            budget = f"{settings['epochs']} epochs of {entries:,} entries = {settings['epochs'] * entries:,}"
        return (f"The probe trained {self.runs} runs (ranks {', '.join(map(str, self.ranks))}; prefixes of "
                f"{', '.join(f'{n:,}' for n in self.lengths)} of the corpus's {corpus_tokens:,} answer tokens) in "
                f"{self.train_seconds:,.0f} s, on {self.examples:,} entries in all; the training it plans may use "
                f"up to {budget} entries, and stops once every entry is certified.")


def probe_lengths(corpus_tokens: int, first_entry_tokens: int, shares: Sequence[float]) -> list[int]:
    """The nested prefixes' answer tokens: each share of the corpus's, at least its first entry's, all distinct and
    shorter than the corpus (otherwise there is nothing to extrapolate to)."""
    if not shares or any(not 0 < s < 1 for s in shares):
        raise UserError(f"--probe-shares must lie between 0 and 1 (exclusive), got {','.join(map(str, shares))}")
    lengths = sorted({max(first_entry_tokens, round(corpus_tokens * s)) for s in shares})
    if len(lengths) < 2 or lengths[-1] >= corpus_tokens:
        raise UserError(f"the corpus has {corpus_tokens} answer tokens (its first entry {first_entry_tokens}): too "
                        "few for a probe on shorter prefixes of it (at least two distinct lengths below the whole); "
                        "train it directly, or plan with a law (--law)")
    return lengths


def run_probe(base: TrainConfig, corpus_tokens: int, first_entry_tokens: int, out: Path,
              ranks: Sequence[int] = PROBE_RANKS, shares: Sequence[float] = PROBE_SHARES,
              log: Callable[[str], None] = lambda m: None,
              on_done: Callable[[str, dict, int, int], None] | None = None, force: bool = False) -> Probe:
    """Train the probe's sweep (resuming one already in `out`) and fit its law into out/law.json. While fewer than
    MIN_UNSATURATED of its runs failed to certify, the probe goes on to a prefix twice as long (up to the whole
    corpus): a law is fitted on runs that did not certify. When the probe reaches the whole corpus, the smallest
    rank that certified it is the answer (Probe.whole_rank) and no law is fitted. Runs of `out` trained with
    other settings (a probe made before a change of train's defaults) are refused, or retrained with `force`."""
    if not ranks or min(ranks) < 1:
        raise UserError("--probe-ranks must be positive ranks, e.g. 1,2,4,8")
    ranks = sorted(set(ranks))
    lengths = probe_lengths(corpus_tokens, first_entry_tokens, shares)
    base = dataclasses.replace(base, until_recall=True, gguf="off")
    while True:
        summaries = run_sweep(base, ranks, lengths, out, on_done=on_done, log=log, skip_above_certified=True,
                              force=force, out_option="--probe-out")
        unsaturated = sum(not s.get("all_certified") for s in summaries)
        if unsaturated >= MIN_UNSATURATED or lengths[-1] >= corpus_tokens:
            break
        lengths.append(min(corpus_tokens, 2 * lengths[-1]))
        log(f"{unsaturated} of the probe's runs did not certify, too few for a law: it goes on to {lengths[-1]} "
            "answer tokens")
    probe = Probe(None, out, ranks, lengths, len(summaries), sum(s.get("wall_seconds") or 0.0 for s in summaries),
                  sum(s.get("examples") or 0 for s in summaries))
    whole = [s["rank"] for s in summaries if s["answer_tokens"] >= corpus_tokens and s.get("all_certified")]
    if whole:  # trained on the whole corpus: what certified it is measured, not predicted
        probe.whole_rank = min(whole)
        probe.settings = shared_settings(load_points([out / cell_name(probe.whole_rank, lengths[-1])]))[0]
        return probe
    try:
        fit_and_save([out], "rank", out / "law.json", plots=True)
    except LawError as e:
        raise LawError(f"the probe's {len(summaries)} runs in {out} give no law: {e}. Most likely too many of them "
                       "recalled their prefix (a saturated run says only that the rank was enough): probe longer "
                       "prefixes (--probe-shares) or lower ranks") from None
    probe.law = out / "law.json"
    return probe
