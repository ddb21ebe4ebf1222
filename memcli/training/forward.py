"""The answer-token forward pass in torch: padded batches (planned by `memcli.core.batching`, the one batch planner
every backend uses), logits at the positions that predict answer tokens only, the frozen-prefix cache (the layers
below the first adapted one, run once per entry), per-token cross-entropy for training, and the clean recall pass
whose verdicts come from the same function `memcli verify` uses (`memcli.core.verdicts.verdicts`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from memcli.core import models
from memcli.core.batching import plan_batches
from memcli.core.corpus import Example, answer_tokens, load_examples
from memcli.core.scoring import LN2, score_logits
from memcli.core.verdicts import verdicts
from memcli.llama.sampler import GREEDY, Sampler


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T], right-padded
    attention_mask: torch.Tensor  # [B, T]
    rows: torch.Tensor  # [B, L] batch row of each answer slot
    positions: torch.Tensor  # [B, L] position whose logits predict the answer token
    targets: torch.Tensor  # [B, L] answer token ids (0 where mask is False)
    mask: torch.Tensor  # [B, L] True on real answer slots
    hidden: torch.Tensor | None = None  # [B, T, d]: the states entering layer `first_layer`, from a FrozenPrefix
    first_layer: int = 0
    idx: list[int] | None = None  # with `hidden`: the entries' indices into the FrozenPrefix
    penalty: tuple | None = None  # (b, l, token, count): the tokens in each answer slot's sampler window


def penalise(logits: torch.Tensor, batch: Batch, sampler: Sampler) -> torch.Tensor:
    """The runner's penalised answer logits [B, L, V] (memcli.llama.sampler's arithmetic, differentiable): a new
    tensor, the slots' window tokens moved."""
    row, slot, t, c = batch.penalty
    cur = logits[row, slot, t]
    new = torch.where(cur <= 0, cur * sampler.repeat_penalty, cur / sampler.repeat_penalty)
    new = new - c * sampler.frequency_penalty - (c > 0).to(logits.dtype) * sampler.presence_penalty
    return logits.index_put((row, slot, t), new)


class FrozenPrefix:
    """The hidden states entering the first adapted layer, computed once per entry. The layers below it are
    frozen and, with no adapter under them, see the same inputs every step; so training runs them once and each
    step starts at the first adapted layer (the default placement, the middle layer, halves the forward pass).
    The result is the same computation on the same inputs: `check` compares it with the full pass."""

    BUDGET_BYTES = 4 << 30  # past this the prefix is recomputed every step instead (and training says so)

    def __init__(self, model, examples: list[Example], first_layer: int, pad_id: int, device,
                 batch_tokens: int = 8192):
        self.first_layer = first_layer
        self.states: list[torch.Tensor] = [None] * len(examples)  # per entry [len, d], kept on the CPU
        decoder = _base(model).get_decoder()
        was_training = model.training
        model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
        with torch.no_grad():
            for start, end in plan_batches([len(examples[i]) for i in order], batch_tokens, padded=True):
                idx = order[start:end]
                batch = collate([examples[i] for i in idx], pad_id, device)
                states = _states_entering(decoder, first_layer, batch)
                for row, i in enumerate(idx):
                    self.states[i] = states[row, : len(examples[i])].to("cpu").clone()
        model.train(was_training)

    @torch.no_grad()
    def agrees(self, model, examples: list[Example], pad_id: int, device, n: int = 4, atol: float = 1e-3) -> bool:
        """Whether starting at the first adapted layer gives the full pass's logits on the first n entries (a
        model whose forward does more to its inputs than the layers, e.g. scaled embeddings, does not)."""
        idx = list(range(min(n, len(examples))))
        was_training = model.training
        model.eval()
        batch = collate([examples[i] for i in idx], pad_id, device)
        full = answer_logits(model, batch)[batch.mask]
        cached = answer_logits(model, collate([examples[i] for i in idx], pad_id, device, self, idx))[batch.mask]
        model.train(was_training)
        return bool(torch.allclose(full, cached, rtol=0, atol=atol))

    @staticmethod
    def size_bytes(model, examples: list[Example]) -> int:
        cfg = _base(model).config
        return sum(len(ex) for ex in examples) * cfg.hidden_size * next(model.parameters()).element_size()

    def hidden(self, idx: list[int], width: int, device) -> torch.Tensor:
        """[B, width, d]: the cached states of entries idx, right-padded with zeros."""
        first = self.states[idx[0]]
        out = torch.zeros((len(idx), width, first.shape[-1]), dtype=first.dtype)
        for row, i in enumerate(idx):
            out[row, : len(self.states[i])] = self.states[i]
        return out.to(device)


class _Reached(Exception):
    """Raised by the hook of `_states_entering` to end a forward pass at the layer it wanted."""

    def __init__(self, states: torch.Tensor):
        self.states = states


def _states_entering(decoder, layer: int, batch: Batch) -> torch.Tensor:
    """The hidden states [B, T, d] entering decoder layer `layer`: the pass runs the layers below it and stops
    there (the layers above never run)."""
    def stop(module, args, kwargs):
        raise _Reached(args[0] if args else kwargs["hidden_states"])

    handle = decoder.layers[layer].register_forward_pre_hook(stop, with_kwargs=True)
    try:
        decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    except _Reached as reached:
        return reached.states
    finally:
        handle.remove()
    raise AssertionError(f"the decoder never reached layer {layer}")


@contextlib.contextmanager
def _layers_from(decoder, first: int):
    """The decoder runs its layers from `first` on (fed the states entering that layer as inputs_embeds)."""
    full = decoder.layers
    decoder.layers = full[first:]
    try:
        yield
    finally:
        decoder.layers = full


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def collate(examples: list[Example], pad_id: int, device, prefix: FrozenPrefix | None = None,
            idx: list[int] | None = None, sampler: Sampler = GREEDY) -> Batch:
    """Pad on the right; the attention mask comes from lengths, never from `token != pad` (pad may be EOS).
    With a FrozenPrefix (and the entries' indices into it), the batch carries their cached states; with an
    active sampler, the tokens of each answer slot's window."""
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
    batch = Batch(*(t.to(device) for t in (input_ids, attention, rows, positions, targets, mask)))
    if prefix is not None:
        batch.hidden, batch.first_layer, batch.idx = prefix.hidden(idx, T, device), prefix.first_layer, idx
    if sampler.active:
        rows, tokens = sampler.window_pairs(examples)
        r, t, c = sampler.counts(rows, tokens, 0, int(mask.sum()), int(tokens.max(initial=0)) + 1)
        slot_b, slot_l = mask.nonzero(as_tuple=True)  # answer slots in entry order, as window_pairs numbers them
        batch.penalty = (slot_b[r].to(device), slot_l[r].to(device), torch.as_tensor(t, device=device),
                         torch.as_tensor(c, device=device, dtype=torch.float32))
    return batch


def output_layer(model) -> torch.nn.Module:
    """The module that turns the decoder's last states into logits (the LM head)."""
    return _base(model).get_output_embeddings()


def answer_hidden(model, batch: Batch) -> torch.Tensor:
    """The decoder's last states [B, L, d] at the positions that predict answer tokens (the output layer's input)."""
    decoder = _base(model).get_decoder()
    if batch.hidden is None:
        hidden = decoder(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    else:
        with _layers_from(decoder, batch.first_layer):
            hidden = decoder(inputs_embeds=batch.hidden, attention_mask=batch.attention_mask).last_hidden_state
    return hidden[batch.rows, batch.positions]


def answer_logits(model, batch: Batch) -> torch.Tensor:
    """Logits [B, L, V] (float32) at the positions that predict answer tokens only: the output layer, the
    costliest matrix product for a large vocabulary, never runs over prompt or padding positions."""
    return output_layer(model)(answer_hidden(model, batch)).float()


def _token_terms(logits: torch.Tensor, batch: Batch):
    ce = F.cross_entropy(logits.flatten(0, 1), batch.targets.flatten(), reduction="none").view(batch.targets.shape)
    with torch.no_grad():
        top2 = logits.topk(2, dim=-1)
        target = logits.gather(-1, batch.targets.unsqueeze(-1)).squeeze(-1)
        correct = top2.indices[..., 0] == batch.targets
        margin = target - torch.where(correct, top2.values[..., 1], top2.values[..., 0])
    return ce, correct, margin


def answer_ce(model, batch: Batch, sampler: Sampler = GREEDY) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-answer-token cross-entropy [B, L] (0 off the mask), teacher-forced argmax correctness, and the logit
    margin (target minus the best other token; detached, +inf off the mask). With an active sampler each token's
    worse decoding, plain greedy or the runner's: the higher CE, the lower margin, correct only under both, so
    the objective trains a token while either could get it wrong."""
    logits = answer_logits(model, batch)
    ce, correct, margin = _token_terms(logits, batch)
    if batch.penalty is not None:
        ce_p, correct_p, margin_p = _token_terms(penalise(logits, batch, sampler), batch)
        ce, correct, margin = torch.maximum(ce, ce_p), correct & correct_p, torch.minimum(margin, margin_p)
    return ce * batch.mask, correct | ~batch.mask, margin.masked_fill(~batch.mask, float("inf"))


@dataclass
class Recall:
    """A clean (no dropout) teacher-forced pass over every entry."""

    mean_ce: float  # mean over all answer tokens
    exact: list[bool]  # per entry: every teacher-forced argmax right (greedy recall)
    certified: list[bool]  # per entry: every answer token has p > 0.5
    min_p: list[float]
    above: float  # fraction of answer tokens with p > 0.5
    token_accuracy: list[float]  # per entry: greedy-correct share of the value (first failure / l)

    @property
    def exact_match(self) -> float:
        return sum(self.exact) / len(self.exact)

    @property
    def certified_rate(self) -> float:
        return sum(self.certified) / len(self.certified)

    @property
    def mean_token_accuracy(self) -> float:
        return sum(self.token_accuracy) / len(self.token_accuracy)


class LatestPass:
    """Each entry's answer tokens as its latest training pass saw them, before that step's update: how many were
    still uncertified (p <= 0.5, or a logit margin under --margin). Without dropout that pass is the clean pass at
    that step's weights, a step or an epoch old: far from certified, a clean check can be skipped on its word."""

    def __init__(self, n_entries: int):
        self.hard = np.full(n_entries, -1)  # -1: not seen yet
        self.tokens = np.zeros(n_entries, dtype=np.int64)

    def update(self, idx: list[int], ce: torch.Tensor, mask: torch.Tensor, margin: torch.Tensor | None = None,
               min_margin: float = 0.0) -> None:
        hard = (ce.detach() >= LN2) & mask
        if min_margin > 0 and margin is not None:
            hard |= (margin < min_margin) & mask
        self.hard[idx] = hard.sum(1).cpu().numpy()
        self.tokens[idx] = mask.sum(1).cpu().numpy()

    @property
    def above(self) -> float:
        """The share of the answer tokens of the entries seen so far past p = 0.5 in their latest pass."""
        seen = self.hard >= 0
        return 1.0 - float(self.hard[seen].sum()) / max(1, int(self.tokens[seen].sum()))


@torch.no_grad()
def evaluate(model, examples: list[Example], pad_id: int, device, batch_tokens: int = 8192,
             prefix: FrozenPrefix | None = None, margin: float = 0.0, sampler: Sampler = GREEDY) -> Recall:
    """The clean recall pass: entries sorted by length into padded batches, their answer logits reduced by the
    scoring kernel and judged by the verdict function `memcli verify` uses, so training's certification and
    verify's agree by construction. With `margin` > 0 an entry is certified only when every answer token's logit
    also leads the runner-up's by at least that much (`memcli train --margin`). With an active sampler an entry
    is recalled (certified) only when it is under plain greedy decoding and under the runner's penalties, as
    `verify --sampler` computes them; the mean CE and the share above 0.5 are plain greedy's."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    exact, certified, min_p = [False] * len(examples), [False] * len(examples), [0.0] * len(examples)
    accuracy = [0.0] * len(examples)
    total_ce, total_above, n_tokens = 0.0, 0, 0
    for start, end in plan_batches([len(examples[i]) for i in order], batch_tokens, padded=True):
        idx = order[start:end]
        batch = collate([examples[i] for i in idx], pad_id, device, prefix, idx)
        logits = answer_logits(model, batch)[batch.mask]  # [answer tokens, V], entry order
        targets = batch.targets[batch.mask].cpu().numpy()
        rows = logits.cpu().numpy()
        stats = score_logits(rows, targets)
        lengths = np.array([len(examples[i].target_ids) for i in idx])
        judged = [verdicts(stats, targets, lengths, idx)]
        if sampler.active:
            sampler.penalise(rows, [examples[i] for i in idx])
            judged.append(verdicts(score_logits(rows, targets), targets, lengths, idx))
        for vs in zip(*judged):
            v = vs[0]
            exact[v.index], min_p[v.index] = all(u.exact for u in vs), min(u.min_p for u in vs)
            certified[v.index] = all(u.certified and (margin <= 0 or u.min_margin >= margin) for u in vs)
            accuracy[v.index] = min(u.token_accuracy for u in vs)
        total_ce += float(-stats.logprob.sum())
        total_above += int((stats.prob > 0.5).sum())
        n_tokens += len(targets)
    model.train(was_training)
    return Recall(total_ce / n_tokens, exact, certified, min_p, total_above / n_tokens, accuracy)


class CorpusLoss(NamedTuple):
    """What `memcli plan CORPUS` plans from."""

    tokens: int  # answer tokens of the corpus
    l_init: float  # the base model's mean answer CE
    model: str  # the model's name
    entries: int
    first_tokens: int  # the shortest prefix a sweep can take: the first entry's answer tokens (1 for one value)


def base_loss(corpus_path, model: str | None = None, **corpus_options) -> CorpusLoss:
    """The corpus's answer tokens and L_init under the base model."""
    spec = models.resolve(model)
    base, tokenizer = models.load_model(spec)
    examples = load_examples(corpus_path, tokenizer, n_ctx=base.config.max_position_embeddings, **corpus_options)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return CorpusLoss(answer_tokens(examples), evaluate(base, examples, pad_id, "cpu").mean_ce, spec.name,
                      len(examples), 1 if len(examples) == 1 else len(examples[0].target_ids))
