"""Real greedy generation against the teacher-forced verdicts (`memcli verify --generate K`): the check that one
teacher-forced pass decides what greedy decoding does (docs/method.md §2), on a sample of entries."""

from __future__ import annotations

import math

import numpy as np

from memcli.commands.verify.report import rounded
from memcli.core.verdicts import DEFAULT_RISK_MARGIN, EntryVerdict, Generated


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
            "teacher_forced_margin": rounded(tf), "generated_margin": rounded(gen),
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
