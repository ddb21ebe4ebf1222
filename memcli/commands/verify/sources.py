"""What `memcli verify --lora` names, and the base it is verified on.

--lora is a run folder, a PEFT adapter folder (a run's adapter/ or a bare one) or an adapter .gguf (a run's
adapter.gguf or a lone one). `resolve_adapter` finds every form the adapter exists in and, for a run, its
settings; run folders are read only through `memcli.core.runs`. `resolve_base` picks the base model: --model, else
the run's model, else the model the adapter GGUF or the PEFT folder names, else the default. `recorded_base`
says what the adapter was trained for, so that another base is refused (`memcli.gguf.fingerprint.check_base`,
docs/method.md §2).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from memcli.core import models, runs
from memcli.core.errors import UserError
from memcli.core.models import ModelSpec
from memcli.gguf.adapter import adapter_info, model_name_for
from memcli.gguf.base import base_gguf, cached_base
from memcli.gguf.fingerprint import Fingerprint, base_fingerprint


@dataclass
class AdapterSource:
    """The adapter a user named, in the forms it exists in."""

    given: Path | None
    run_dir: Path | None = None  # a memcli run folder (config.yaml + adapter/)
    peft_dir: Path | None = None  # PEFT adapter folder (for the torch backend; exported for llama.cpp)
    gguf: Path | None = None  # llama.cpp adapter (for the llama backend)
    settings: dict = field(default_factory=dict)  # the run's settings (corpus options, model)


def _is_run(path: Path) -> bool:
    """A run folder that has got as far as its adapter/ folder."""
    return runs.is_run(path) and runs.adapter_dir(path).is_dir()


def _existing_gguf(run_dir: Path) -> Path | None:
    gguf = runs.gguf_path(run_dir)
    return gguf if gguf.exists() else None


def resolve_adapter(lora: str | os.PathLike | None) -> AdapterSource:
    if lora is None:
        return AdapterSource(None)
    path = Path(lora)
    if not path.exists():
        raise UserError(f"--lora {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise UserError(f"--lora {path}: expected a run folder, a PEFT adapter folder or an adapter .gguf")
        src = AdapterSource(path, gguf=path)
        if _is_run(path.parent):  # RUN/adapter.gguf: the run's settings and PEFT adapter come along
            src.run_dir, src.peft_dir = path.parent, runs.adapter_dir(path.parent)
            src.settings = runs.read_settings(path.parent)
        return src
    if _is_run(path):
        if not runs.has_adapter(path):
            raise UserError(f"run folder {path} has no finished adapter (adapter/adapter_config.json is missing)")
        return AdapterSource(path, run_dir=path, peft_dir=runs.adapter_dir(path), gguf=_existing_gguf(path),
                             settings=runs.read_settings(path))
    if (path / "adapter_config.json").exists():
        src = AdapterSource(path, peft_dir=path)
        if _is_run(path.parent) and runs.adapter_dir(path.parent) == path:
            src.run_dir, src.settings = path.parent, runs.read_settings(path.parent)
            src.gguf = _existing_gguf(path.parent)
        return src
    raise UserError(f"--lora {path} is not a memcli run folder, a PEFT adapter folder or an adapter .gguf")


def gguf_is_stale(src: AdapterSource) -> bool:
    """RUN/adapter.gguf older than RUN/adapter/ (training resumed after the export)."""
    if src.gguf is None or src.peft_dir is None or src.gguf == src.given:
        return False
    return any(p.stat().st_mtime > src.gguf.stat().st_mtime for p in src.peft_dir.glob("adapter_model.*"))


# --- the base ------------------------------------------------------------------------------------------------

def peft_recorded_base(peft_dir: Path) -> str | None:
    """base_model_name_or_path as a PEFT folder's adapter_config.json records it (None when absent)."""
    try:
        recorded = json.loads((peft_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return str(recorded) if recorded else None


def peft_base_model(peft_dir: Path) -> str | None:
    """The model a bare PEFT folder names (base_model_name_or_path), when memcli can resolve it."""
    recorded = peft_recorded_base(peft_dir)
    if recorded is None:
        return None
    if recorded in models.registry():
        return recorded

    return model_name_for(recorded) or (recorded if Path(recorded).is_dir() else None)


@dataclass
class Base:
    """The model an adapter is verified on."""

    spec: ModelSpec
    token_spec: ModelSpec  # the model whose tokenizer the ids come from (the training model for a quantised GGUF)
    peft_base: str | None  # the base a bare PEFT folder names, when memcli resolves it


def resolve_base(src: AdapterSource, model: str | None) -> Base:
    """--model, else the run's model, else the model the adapter GGUF names, else the default; never the default
    for a bare PEFT folder: its base is the one it names, or --model (UserError otherwise)."""
    s = src.settings
    adapter_model = peft_base = None
    if src.gguf is not None and not s:
        adapter_model = adapter_info(src.gguf).get("model")
        if adapter_model is not None and adapter_model not in models.registry():
            adapter_model = None
    if src.peft_dir is not None and not s:
        peft_base = peft_base_model(src.peft_dir)
        if peft_base is None and model is None:
            named = peft_recorded_base(src.peft_dir)
            raise UserError(f"--lora {src.given}: the base model its adapter_config.json names "
                            f"({named!r}) is not a memcli model name or a local model folder; pass --model"
                            if named else f"--lora {src.given}: its adapter_config.json does not name the base "
                            "model (no base_model_name_or_path); pass --model")
        if model is None:
            adapter_model = peft_base
    spec = models.resolve(model or s.get("model") or adapter_model or models.DEFAULT_MODEL)
    # The tokenizer of the shared tokenisation: the training model's (a quantised GGUF of the same base shares it).
    token_spec = spec
    if spec.kind == "gguf" and (s.get("model") or adapter_model):
        token_spec = models.resolve(s.get("model") or adapter_model)
    return Base(spec, token_spec, peft_base)


def recorded_base(src: AdapterSource, peft_base: str | None, spec):
    """(fingerprint, model name) of the base the adapter was trained for, when something records one that may
    differ from `spec`: the fingerprint in the adapter GGUF, else the run's model or the PEFT folder's base
    (fingerprinted now). None when nothing does, or when the record names `spec` itself."""
    if src.gguf is not None:
        try:
            info = adapter_info(src.gguf)
        except UserError:  # an unreadable GGUF beside the PEFT adapter: fall back to the recorded model name
            info = {"fingerprint": None}
        if info["fingerprint"]:
            return Fingerprint(info["fingerprint"], info["weights"]), info["model"] or "another model"
    name = src.settings.get("model") or peft_base
    if not name:
        return None
    trained = models.resolve(name)
    if trained.name == spec.name:
        return None
    return base_fingerprint(trained), name


BASE_CHOICES = ("auto", "training", "shipped")


def verify_base(spec: ModelSpec, choice: str = "auto", deploy: str | None = None) -> tuple[Path, dict]:
    """The base GGUF llama.cpp verifies on, and why (report.json's `base`).

    `deploy`: the (first) type a `train --deploy TYPES` run was trained for; `auto` then decodes the base as
    llama.cpp quantises it to that type (the weights that run trained against; its float base is not what it
    promises).

    A model that ships as a quantised GGUF (the default model) is trained on its dequantised weights. `auto` and
    `training` decode an F16 export of exactly those weights (built once into the cache): measured on this
    machine it is faster than the shipped Q4_1 (llama.cpp's batched matrix product has no fast path for Q4_1)
    and its verdicts are those of the weights training saw. `shipped` decodes the shipped GGUF: the deployment
    check (the quantised model users run), whose activations llama.cpp quantises too, so close calls can flip.
    A .gguf given with --model is used as given; an HF model is exported once to F32."""
    if deploy is not None and choice == "auto":
        return cached_base(spec, deploy), {"kind": f"deploy-{deploy}", "why": f"the run was trained with --deploy "
                                           f"{deploy}: its base as llama.cpp quantises it to {deploy}"}
    if spec.gguf_path is None:
        return base_gguf(spec), {"kind": "hf-f32", "why": "an F32 export of the HF weights the adapter was trained on"}
    if spec.kind != "wheel":
        return spec.gguf_path, {"kind": "given", "why": "the .gguf given with --model"}
    if choice == "shipped":
        return spec.gguf_path, {"kind": "shipped", "why": "--base shipped: the quantised GGUF as deployed (activations "
                                "quantised by llama.cpp too: close calls can differ from the weights training saw)"}
    return cached_base(spec, "f16"), {
        "kind": "training-f16", "why": "the dequantised weights training used, in F16: faster than the shipped Q4_1 "
        "in llama.cpp and faithful to training's weights (--base shipped checks the deployed file)"}
