"""The answer-token forward pass in torch: batches (and the one batch planner every backend uses), logits at
the positions that predict answer tokens only, per-token cross-entropy for training, and the clean recall pass
whose verdicts come from the same function `memcli verify` uses (`memcli.verify.verdicts.verdicts`)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .corpus import Example


def plan_batches(lengths, budget: int, *, padded: bool = False, max_seqs: int | None = None) -> list[tuple[int, int]]:
    """Consecutive [start, end) groups of entries, in the order given. A group's cost is its total tokens
    (packed sequences) or, with padded, entries x its longest entry (right-padded rows); it stays within
    `budget` (an entry over it is a group of its own) and holds at most `max_seqs` entries."""
    groups, start, used, width = [], 0, 0, 0
    lengths = [int(n) for n in lengths]
    for i, n in enumerate(lengths):
        cost = (i - start + 1) * max(width, n) if padded else used + n
        if i > start and (cost > budget or (max_seqs is not None and i - start >= max_seqs)):
            groups.append((start, i))
            start, used, width = i, 0, 0
        used, width = used + n, max(width, n)
    if lengths:
        groups.append((start, len(lengths)))
    return groups


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [B, L] batch row of each answer slot
    positions: torch.Tensor  # [B, L] position whose logits predict the answer token
    targets: torch.Tensor  # [B, L] answer token ids (0 where mask is False)
    mask: torch.Tensor  # [B, L] True on real answer slots


def collate(examples: list[Example], pad_id: int, device) -> Batch:
    """Pad on the right; the attention mask comes from lengths, never from `token != pad` (pad may be EOS)."""
    T = max(len(ex) for ex in examples)
    L = max(len(ex.target_ids) for ex in examples)
    B = len(examples)
    input_ids = torch.full((B, T), pad_id, dtype=torch.long)
    attention = torch.zeros((B, T), dtype=torch.long)
    positions = torch.zeros((B, L), dtype=torch.long)
    targets = torch.zeros((B, L), dtype=torch.long)
    mask = torch.zeros((B, L), dtype=torch.bool)
    for i, ex in enumerate(examples):
        ids, p, n = ex.input_ids, len(ex.prompt_ids), len(ex.target_ids)
        input_ids[i, : len(ids)] = torch.tensor(ids)
        attention[i, : len(ids)] = 1
        positions[i, :n] = torch.arange(p - 1, p - 1 + n)
        targets[i, :n] = torch.tensor(ex.target_ids)
        mask[i, :n] = True
    rows = torch.arange(B).unsqueeze(1).expand(B, L)
    return Batch(*(t.to(device) for t in (input_ids, attention, rows, positions, targets, mask)))


def answer_logits(model, batch: Batch) -> torch.Tensor:
    """Logits [B, L, V] (float32) at the positions that predict answer tokens only: the output layer, the
    costliest matrix product for a large vocabulary, never runs over prompt or padding positions."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.get_decoder()(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    return base.get_output_embeddings()(hidden[batch.rows, batch.positions]).float()


def answer_ce(model, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-answer-token cross-entropy [B, L] (0 off the mask) and teacher-forced argmax correctness."""
    logits = answer_logits(model, batch)
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(batch.targets.shape)
    correct = logits.argmax(-1) == batch.targets
    return ce * batch.mask, correct | ~batch.mask


@dataclass
class Recall:
    """A clean (no dropout) teacher-forced pass over every entry."""

    mean_ce: float  # mean over all answer tokens
    exact: list[bool]  # per entry: every teacher-forced argmax right (greedy recall)
    certified: list[bool]  # per entry: every answer token has p > 0.5
    min_p: list[float]
    above: float  # fraction of answer tokens with p > 0.5

    @property
    def exact_match(self) -> float:
        return sum(self.exact) / len(self.exact)

    @property
    def certified_rate(self) -> float:
        return sum(self.certified) / len(self.certified)


@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, device, batch_tokens: int = 8192) -> Recall:
    """The clean recall pass: entries sorted by length into padded batches, their answer logits reduced by the
    scoring kernel and judged by the verdict function `memcli verify` uses, so training's certification and
    verify's agree by construction."""
    from .scoring import score_logits
    from .verify.verdicts import verdicts

    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    exact, certified, min_p = [False] * len(examples), [False] * len(examples), [0.0] * len(examples)
    total_ce, total_above, n_tokens = 0.0, 0, 0
    for start, end in plan_batches([len(examples[i]) for i in order], batch_tokens, padded=True):
        idx = order[start:end]
        batch = collate([examples[i] for i in idx], pad_id, device)
        logits = answer_logits(model, batch)[batch.mask]  # [answer tokens, V], entry order
        targets = batch.targets[batch.mask].cpu().numpy()
        stats = score_logits(logits.cpu().numpy(), targets)
        lengths = np.array([len(examples[i].target_ids) for i in idx])
        for v in verdicts(stats, targets, lengths, idx):
            exact[v.index], certified[v.index], min_p[v.index] = v.exact, v.certified, v.min_p
        total_ce += float(-stats.logprob.sum())
        total_above += int((stats.prob > 0.5).sum())
        n_tokens += len(targets)
    model.train(was_training)
    return Recall(total_ce / n_tokens, exact, certified, min_p, total_above / n_tokens)
