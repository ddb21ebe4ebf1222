"""`memcli train --preserve`: keep the tuned model's next-token distribution on unrelated text close to the base's.

Each step adds `weight` x the mean KL(base || tuned) over a small replay batch to the method's objective (SFT,
MemFT-OT or MemFT-SW alike). The base is the same model with the adapter switched off, so there is no second copy
of the weights, and its distribution on the replay text is computed once, when the run starts, and kept as its
TOP_K most likely tokens per position plus the rest of the probability mass as one more outcome. The KL between
these coarsened distributions (the top-k tokens and "any other token") is what is trained; it is a lower bound of
the full KL, equal to it when the top-k hold all the mass.

Cost per step: WINDOWS_PER_STEP replay windows of REPLAY_TOKENS tokens (the layers below the adapter run once for
all of them, at the start, as for the corpus), and the output layer at POSITIONS positions of each. Which windows
and positions is a function of the run's seed and the step, so a resumed run replays what the uninterrupted one
would have.

The replay text: `--preserve-text FILE` (cut into windows), else the default reference's preserve half (the base
model's own continuations of short prompts: `memcli.training.locality`, which measures on the other half).
"""

from __future__ import annotations

import torch

from memcli.training import forward, locality

TOP_K = 64
REPLAY_TOKENS = 64  # a reference window (128 tokens) gives two replay windows
WINDOWS_PER_STEP = 2
POSITIONS = 32  # per replay window per step


def replay_windows(spec, tokenizer, text: str | None, log=None, model=None) -> list[list[int]]:
    """The replay text in windows of REPLAY_TOKENS: FILE's (UserError for a bad one) or the default reference's."""
    if text is not None:
        windows = locality.text_windows(text, tokenizer, window=REPLAY_TOKENS, what="--preserve-text")
    else:
        windows = [w[i: i + REPLAY_TOKENS] for w in locality.reference_windows(spec, "preserve", log,
                                                                     None if model is None else (model, tokenizer))
                   for i in range(0, len(w) - REPLAY_TOKENS + 1, REPLAY_TOKENS)]
    return windows


class Preserve:
    """The preserve term of one run: the base's top-k on the replay windows (computed at construction) and the
    per-step KL."""

    def __init__(self, model, windows: list[list[int]], weight: float, seed: int, device, first_layer: int = 0):
        self.weight, self.seed, self.device = weight, seed, device
        self.examples = locality.as_examples(windows)
        self.prefix = (forward.FrozenPrefix(model, self.examples, first_layer, 0, device)
                       if first_layer > 0 else None)
        # The base's distribution at every position, once: top-k log-probabilities and ids, and the rest's log mass.
        top_lp, top_id = [], []
        was_training = model.training
        model.eval()
        with torch.no_grad(), model.disable_adapter():
            for start in range(0, len(self.examples), 16):
                idx = list(range(start, min(start + 16, len(self.examples))))
                batch = forward.collate([self.examples[i] for i in idx], 0, device, self.prefix, idx)
                logp = torch.log_softmax(forward.answer_logits(model, batch), dim=-1)  # [B, L, V]
                lp, ids = logp.topk(TOP_K, dim=-1)
                top_lp.append(lp.cpu())
                top_id.append(ids.cpu())
        model.train(was_training)
        self.top_lp = torch.cat(top_lp)  # [N, L, K]
        self.top_id = torch.cat(top_id)
        self.rest_lp = _log_rest(self.top_lp)  # [N, L]
        self.length = self.top_lp.shape[1]

    def pick(self, step: int) -> tuple[list[int], torch.Tensor]:
        """The replay windows and positions of a step: a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(self.seed * 7_919 + step)
        n = len(self.examples)
        idx = torch.randperm(n, generator=g)[: min(WINDOWS_PER_STEP, n)].tolist()
        k = min(POSITIONS, self.length)
        positions = torch.stack([torch.randperm(self.length, generator=g)[:k].sort().values for _ in idx])
        return idx, positions

    def loss(self, model, step: int) -> torch.Tensor:
        """weight x the mean KL(base || tuned) over this step's replay positions (coarsened to the base's top-k
        and the rest), with gradients through the adapter."""
        idx, pos = self.pick(step)
        batch = forward.collate([self.examples[i] for i in idx], 0, self.device, self.prefix, idx)
        rows = torch.arange(len(idx)).unsqueeze(1).expand_as(pos)
        batch.rows, batch.positions = rows.to(self.device), pos.to(self.device)  # position t predicts token t+1
        logq = torch.log_softmax(forward.answer_logits(model, batch), dim=-1)  # [B, k, V]
        ids = self.top_id[idx][rows, pos].to(self.device)  # [B, k, K]
        lp = self.top_lp[idx][rows, pos].to(self.device)
        rest_p = self.rest_lp[idx][rows, pos].to(self.device)
        lq = logq.gather(-1, ids)
        rest_q = _log_rest(lq)
        kl = (lp.exp() * (lp - lq)).sum(-1) + rest_p.exp() * (rest_p - rest_q)
        return self.weight * kl.mean()


def _log_rest(top_lp: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top_lp)) over the last axis: the log-probability of every token outside the top-k (clamped
    away from log 0 so that a top-k holding all the mass gives a zero term, not a NaN)."""
    mass = torch.logsumexp(top_lp, dim=-1).clamp(max=-1e-6)
    return torch.log(-torch.expm1(mass)).clamp(min=-50.0)
