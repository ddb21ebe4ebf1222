"""Training objectives as pure functions of per-token cross-entropy (docs/method.md §3).

Every objective is a token-weighted mean L = sum_t w_t CE_t / (sum_t w_t + eps) over answer tokens, with the
weights treated as constants. Tensors are [batch, positions]; `mask` marks the answer positions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from memcli.core.scoring import LN2  # the certification threshold, defined once

EPS = 1e-8


def weighted_mean(ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    weights = weights.detach().to(ce.dtype)
    return (weights * ce).sum() / (weights.sum() + EPS)


def sft_weights(ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return mask.to(ce.dtype)


def hard_tokens(ce: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Answer tokens not yet certified: p <= 0.5, i.e. CE >= ln 2. (The paper writes 1[CE > ln 2]; a token at
    exactly p = 0.5 is not certified either, so it keeps its weight here.)"""
    return (ce.detach() >= LN2) & mask


def ot_weights(ce: torch.Tensor, mask: torch.Tensor, threshold: float = 0.5, floor: float = 0.0,
               also_hard: torch.Tensor | None = None) -> torch.Tensor:
    """MemFT-OT: 1 where the token is still hard (p <= threshold; the paper's threshold is 0.5, or `also_hard`,
    e.g. a logit margin still under --margin), `floor` (the paper's 0) on the other answer tokens."""
    hard = (ce.detach() >= -math.log(threshold)) & mask
    if also_hard is not None:
        hard = hard | (also_hard & mask)
    return torch.where(hard, 1.0, floor * mask.to(ce.dtype)).to(ce.dtype)


def ot_loss(ce: torch.Tensor, mask: torch.Tensor, no_hard: str = "fallback", threshold: float = 0.5,
            floor: float = 0.0, also_hard: torch.Tensor | None = None) -> tuple[torch.Tensor | None, int]:
    """MemFT-OT objective and the number of tokens it trains as hard (p <= threshold). With none in the batch and
    no floor, "fallback" returns the plain mean (an SFT step, as the reference code does) and "skip" returns None
    (no update, as the formula)."""
    w = ot_weights(ce, mask, threshold, floor, also_hard)
    n_hard = int((w == 1.0).logical_and(mask).sum().item())
    if n_hard == 0 and floor == 0:
        if no_hard == "skip":
            return None, 0
        w = sft_weights(ce, mask)
    return weighted_mean(ce, w), n_hard


# --- MemFT-SW, long-context form: intra-sample spatial sliding ---------------------------------------------

@dataclass
class SlidingState:
    """Per-sample anchor history, as the reference code keeps it: the window grows while the anchor is stuck,
    and resets when it moves or when the sample has no wrong token."""

    anchor: int | None = None
    repeats: int = 0  # consecutive steps at this anchor after the first one (the first visit counts 0)
    expand: float = 1.0

    def update(self, anchor: int, patience: int = 3, growth: float = 0.5, cap: float = 4.0) -> float:
        """One step whose first wrong position is `anchor`. With patience 3 the window first grows on the 4th
        consecutive step at the same anchor (after 3 repeats)."""
        if anchor == self.anchor:
            self.repeats += 1
        else:
            self.anchor, self.repeats, self.expand = anchor, 0, 1.0
        if self.repeats >= patience:
            self.expand = min(self.expand + growth, cap)
        return self.expand

    def reset(self) -> None:
        """A step with no wrong token: no anchor, no repeats, no expansion."""
        self.anchor, self.repeats, self.expand = None, 0, 1.0

    @classmethod
    def from_dict(cls, saved: dict) -> "SlidingState":
        """From a checkpoint's dict. Checkpoints written before `repeats` hold `stay`, which counted the first
        visit as 1: repeats = stay - 1."""
        saved = dict(saved)
        if "stay" in saved:
            stay = saved.pop("stay")
            saved["repeats"] = max(0, stay - 1) if saved.get("anchor") is not None else 0
        return cls(**saved)


@dataclass
class SlidingConfig:
    sharpness: float = 10.0  # w0 = sigmoid(sharpness * (CE - ln 2))
    base_window: int = 50  # W = base_window * expand
    decay: float = 20.0  # phi = exp(-(t - a) / decay) inside the window
    floor: float = 0.01  # phi beyond the window
    patience: int = 3
    growth: float = 0.5
    cap: float = 4.0


def sliding_weights(ce: torch.Tensor, correct: torch.Tensor, state: SlidingState,
                    cfg: SlidingConfig = SlidingConfig()) -> torch.Tensor:
    """Weights for one sample's answer tokens (1-D tensors over its answer positions, in order).

    The anchor a is the first position whose teacher-forced argmax is wrong; tokens before it keep full weight,
    tokens in the window [a, a + W) decay exponentially from it, tokens beyond keep a small floor. The state is
    updated (anchor patience, window growth); with no wrong position phi = 1 everywhere and the state resets.
    """
    ce = ce.detach()
    w0 = torch.sigmoid(cfg.sharpness * (ce - LN2))
    wrong = (~correct).nonzero()
    if len(wrong) == 0:
        state.reset()
        return w0
    a = int(wrong[0])
    expand = state.update(a, cfg.patience, cfg.growth, cfg.cap)
    window = cfg.base_window * expand
    t = torch.arange(len(ce), device=ce.device, dtype=ce.dtype)
    phi = torch.where(t < a, torch.ones_like(t), torch.exp(-(t - a) / cfg.decay))
    phi = torch.where(t >= a + window, torch.full_like(t, cfg.floor), phi)
    return w0 * phi


def sliding_loss(ce: torch.Tensor, mask: torch.Tensor, correct: torch.Tensor, states: list[SlidingState],
                 cfg: SlidingConfig = SlidingConfig()) -> torch.Tensor:
    """MemFT-SW over a batch: per-sample sliding weights, falling back to the plain mean if they sum to ~0."""
    w = torch.zeros_like(ce)
    for i, state in enumerate(states):
        pos = mask[i].nonzero().squeeze(1)
        w[i, pos] = sliding_weights(ce[i, pos], correct[i, pos], state, cfg)
    if w.sum().item() <= 1e-5:
        w = sft_weights(ce, mask)
    return weighted_mean(ce, w)


# --- MemFT-SW, PhoneBook form: inter-batch temporal curriculum ----------------------------------------------

@dataclass
class Curriculum:
    """Expose a growing prefix of a fixed seeded permutation: 20/40/60/80 % of the samples until each boundary
    epoch, then all of them. Earlier samples stay in and are replayed; there is no per-epoch reshuffle."""

    n: int
    seed: int
    boundaries: tuple[int, ...] = (20, 40, 60, 80)
    order: list[int] = field(init=False)

    def __post_init__(self):
        g = torch.Generator().manual_seed(self.seed)
        self.order = torch.randperm(self.n, generator=g).tolist()

    def fraction(self, epoch: int) -> float:
        stages = len(self.boundaries) + 1
        for i, boundary in enumerate(self.boundaries):
            if epoch < boundary:
                return (i + 1) / stages
        return 1.0

    def exposed(self, epoch: int) -> list[int]:
        """The sample indices trained on in this epoch (0-based), in their fixed order."""
        return self.order[: max(1, math.ceil(self.fraction(epoch) * self.n - 1e-9))]
