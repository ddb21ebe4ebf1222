"""LoRA placement and the answer-token forward pass shared by training, evaluation and the torch backend."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .corpus import Example
from .errors import UserError

MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
LN2 = math.log(2.0)


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def resolve_placement(model, layers: list[int] | None, modules: list[str] | str | None) -> tuple[list[int], list[str]]:
    """Default: the one middle layer, its MLP projections. Checks both against the model."""
    n_layers = len(decoder_layers(model))
    layers = [n_layers // 2] if not layers else sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UserError(f"--layers: layer {layer} is out of range; the model has layers 0-{n_layers - 1}")
    if modules is None or modules == "mlp":
        modules = list(MLP_MODULES)
    elif modules in ("all-linear", ["all-linear"]):
        modules = list(ALL_LINEAR)
    elif isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    available = {name.rsplit(".", 1)[-1] for name, mod in decoder_layers(model)[layers[0]].named_modules()
                 if isinstance(mod, torch.nn.Linear)}
    for m in modules:
        if m not in available:
            raise UserError(f"--modules: unknown module '{m}'; this model's layers have {', '.join(sorted(available))}")
    return layers, list(modules)


def add_lora(model, rank: int, alpha: float | None, dropout: float, layers: list[int], modules: list[str], seed: int):
    """Wrap the frozen model with a seeded LoRA adapter (A random, B zero) on the given layers and modules."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    pattern = r".*\.layers\.({})\.(self_attn|mlp)\.({})".format("|".join(map(str, layers)), "|".join(modules))
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=pattern, bias="none", task_type="CAUSAL_LM")
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


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
    was_training = model.training
    model.eval()
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    exact, certified, min_p = [None] * len(examples), [None] * len(examples), [None] * len(examples)
    total_ce, total_above, n_tokens = 0.0, 0, 0
    start = 0
    while start < len(order):
        width = len(examples[order[start]])
        end = start + 1
        while end < len(order) and (end - start + 1) * max(width, len(examples[order[end]])) <= batch_tokens:
            width = max(width, len(examples[order[end]]))
            end += 1
        idx = order[start:end]
        batch = collate([examples[i] for i in idx], pad_id, device)
        ce, correct = answer_ce(model, batch)
        above = (ce < LN2) | ~batch.mask
        total_ce += ce.sum().item()
        total_above += (above & batch.mask).sum().item()
        n_tokens += batch.mask.sum().item()
        max_ce = ce.max(1).values.exp().reciprocal()  # the smallest target probability of each entry
        for j, i in enumerate(idx):
            exact[i] = bool(correct[j].all())
            certified[i] = bool(above[j].all())
            min_p[i] = float(max_ce[j])
        start = end
    model.train(was_training)
    return Recall(total_ce / n_tokens, exact, certified, min_p, total_above / n_tokens)
