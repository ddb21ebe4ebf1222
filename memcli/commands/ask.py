"""`memcli ask`: the greedy completion of one prompt in llama.cpp, for a person checking a memorised fact by eye.

It runs what a user deploys, through llama-cpp-python's own high-level API (`Llama`), independent of memcli's
scorer: a model GGUF (a merged file, or any base), optionally with an adapter GGUF, or a run folder (its
adapter.gguf over the deployed base: for a model shipped quantised, the shipped file). The prompt is tokenised
by llama.cpp (BOS as the model asks, special tokens parsed), wrapped in the chat template when the run was
trained with one, and decoded greedily until EOS, a newline or --max-tokens.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memcli.core import models, runs
from memcli.core.corpus import chat_prompt, system_prompt_of
from memcli.core.errors import UserError
from memcli.core.gguf_reader import read_gguf
from memcli.gguf.adapter import adapter_info, check_pair
from memcli.gguf.base import base_gguf
from memcli.llama import library


@dataclass
class Target:
    model: Path  # the model GGUF llama.cpp loads
    adapter: Path | None
    settings: dict  # the run's settings, when a run folder was named


def resolve_target(target: str | os.PathLike, model: str | None) -> Target:
    """What `ask` runs: a run folder, an adapter .gguf (over --model or the model it names) or a model .gguf."""
    path = Path(target)
    if not path.exists():
        raise UserError(f"{path} does not exist")
    if path.is_dir():
        if not runs.is_run(path) or not runs.gguf_path(path).exists():
            raise UserError(f"{path} is not a run folder with an adapter.gguf (write one with `memcli export "
                            f"{path} --out {path}/adapter.gguf`)")
        settings = runs.read_settings(path)
        return Target(base_gguf(models.resolve(model or settings.get("model"))), runs.gguf_path(path), settings)
    if path.suffix != ".gguf":
        raise UserError(f"{path}: expected a run folder, a model .gguf or an adapter .gguf")
    kind = read_gguf(path).get("general.type", "model")
    if kind == "adapter":
        info = adapter_info(path)
        if model is None and info["model"] is None:
            raise UserError(f"adapter {path} does not name its base model: give --model BASE.gguf")
        return Target(base_gguf(models.resolve(model or info["model"])), path, {})
    if model is not None:
        raise UserError(f"{path} is a model GGUF: --model applies to an adapter or a run folder")
    return Target(path, None, {})


def ask(target: str | os.PathLike, prompt: str, *, model: str | None = None, max_tokens: int = 48,
        chat_template: bool | None = None, stop_newline: bool = True, n_gpu_layers: int | None = None) -> dict:
    """{"model", "adapter", "prompt_tokens", "completion", "tokens", "stopped"}: the greedy completion."""
    if max_tokens < 1:
        raise UserError(f"--max-tokens must be at least 1, got {max_tokens}")
    t = resolve_target(target, model)
    if t.adapter is not None:
        check_pair(t.adapter, t.model)
    use_template = chat_template if chat_template is not None else bool(t.settings.get("chat_template", False))
    L = library.lib()
    from llama_cpp import Llama

    gpu = n_gpu_layers if n_gpu_layers is not None else (-1 if library.supports_gpu_offload() else 0)
    with library.safe_defaults(t.model):
        llm = Llama(str(t.model), lora_path=str(t.adapter) if t.adapter else None, n_ctx=0, n_gpu_layers=gpu,
                    verbose=False, logits_all=False)
    try:
        text = prompt
        if use_template:
            text = _chat_prompt(t, prompt)
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=not use_template, special=True)
        if not tokens:
            raise UserError("the prompt is empty and the model adds no BOS token: there is nothing to complete "
                            "from; give the key as PROMPT")
        if len(tokens) + max_tokens > llm.n_ctx():
            raise UserError(f"the prompt ({len(tokens)} tokens) and --max-tokens {max_tokens} exceed the model's "
                            f"context of {llm.n_ctx()} tokens")
        out, stopped = [], "max-tokens"
        eos = L.llama_vocab_eos(L.llama_model_get_vocab(llm.model))
        for tok in llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if tok == eos or L.llama_vocab_is_eog(L.llama_model_get_vocab(llm.model), tok):
                stopped = "eos"
                break
            out.append(tok)
            if stop_newline and b"\n" in llm.detokenize([tok]):
                stopped = "newline"
                break
            if len(out) >= max_tokens:
                break
        completion = llm.detokenize(out, prev_tokens=tokens).decode("utf-8", "replace")
    finally:
        llm.close()
    return {"model": str(t.model), "adapter": str(t.adapter) if t.adapter else None, "prompt_tokens": len(tokens),
            "completion": completion.rstrip("\n") if stopped == "newline" else completion, "tokens": len(out),
            "stopped": stopped, "chat_template": use_template}


def _chat_prompt(t: Target, prompt: str) -> str:
    """The prompt as training rendered a key in the chat template (memcli.core.corpus.tokenize)."""
    tokenizer = models.load_tokenizer(models.resolve(t.settings.get("model")))
    return chat_prompt(tokenizer, prompt, system_prompt_of(t.settings))
