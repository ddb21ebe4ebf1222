"""LoRA placement: which layers and modules get the adapter, and wrapping the frozen model with it."""

from __future__ import annotations

import torch

from memcli.core.errors import UserError


def decoder_layers(model) -> torch.nn.ModuleList:
    return model.get_decoder().layers


def linear_modules(model, layer: int = 0) -> tuple[list[str], list[str]]:
    """(attention, MLP) linear module names of a decoder layer, in model order: q_proj, k_proj, v_proj, o_proj and
    gate_proj, up_proj, down_proj for Llama, Mistral, Qwen and Gemma 3; qkv_proj, o_proj and gate_up_proj,
    down_proj for Phi-3 (its fused projections, adapted as one matrix each, as llama.cpp holds them)."""
    attention, mlp = [], []
    for name, mod in decoder_layers(model)[layer].named_modules():
        if isinstance(mod, torch.nn.Linear):
            (mlp if name.startswith("mlp.") else attention).append(name.rsplit(".", 1)[-1])
    return attention, mlp


def resolve_placement(model, layers: list[int] | None, modules: list[str] | str | None) -> tuple[list[int], list[str]]:
    """Default: the one middle layer, its MLP projections (gate_proj, up_proj, down_proj; Phi-3: gate_up_proj,
    down_proj). `all-linear`: every linear module of the layers. Checks both against the model."""
    n_layers = len(decoder_layers(model))
    layers = [n_layers // 2] if not layers else sorted(set(layers))
    for layer in layers:
        if not 0 <= layer < n_layers:
            raise UserError(f"--layers: layer {layer} is out of range; the model has layers 0-{n_layers - 1}")
    attention, mlp = linear_modules(model, layers[0])
    if modules is None or modules == "mlp":
        modules = list(mlp)
    elif modules in ("all-linear", ["all-linear"]):
        modules = attention + mlp
    elif isinstance(modules, str):
        modules = [m.strip() for m in modules.split(",") if m.strip()]
    available = set(attention + mlp)
    for m in modules:
        if m not in available:
            raise UserError(f"--modules: unknown module '{m}'; this model's layers have {', '.join(sorted(available))}")
    return layers, list(modules)


def add_lora(model, rank: int, alpha: float | None, dropout: float, layers: list[int], modules: list[str], seed: int,
             rslora: bool = False, init: str = "default"):
    """Wrap the frozen model with a seeded LoRA adapter (A random: Kaiming-uniform, or Gaussian with `init`
    gaussian; B zero) on the given layers and modules; `rslora` scales it by alpha / sqrt(rank)."""
    from peft import LoraConfig, get_peft_model

    if rank < 1:
        raise UserError(f"--rank must be at least 1, got {rank}")
    pattern = r".*\.layers\.({})\.(self_attn|mlp)\.({})".format("|".join(map(str, layers)), "|".join(modules))
    config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, lora_dropout=dropout,
                        target_modules=pattern, bias="none", task_type="CAUSAL_LM", use_rslora=rslora,
                        init_lora_weights=True if init == "default" else init)
    torch.manual_seed(seed)
    return get_peft_model(model, config)


def parameter_groups(model, lr: float, lora_plus: float = 1.0) -> list[dict]:
    """The adapter's trainable parameters as optimiser groups: A matrices at `lr`, B matrices at `lr` x
    `lora_plus` (LoRA+, Hayou et al. 2024; 1: one learning rate for both)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    b = [p for n, p in named if ".lora_B." in n]
    rest = [p for n, p in named if ".lora_B." not in n]
    return [{"params": rest, "lr": lr}] + ([{"params": b, "lr": lr * lora_plus}] if b else [])


def trainable_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
