"""LoRA placement: which layers and modules get the adapter, and wrapping the frozen model with it."""

from __future__ import annotations

import torch

from .config import ALL_LINEAR, MLP_MODULES
from .errors import UserError



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
