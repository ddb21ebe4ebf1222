"""The deployment forms of a trained adapter, made as users make them: `merged` (the adapter merged into the base,
one model GGUF of the type) and `adapter` (the run's adapter.gguf over the base quantised to the type), plus an
ollama Modelfile for either."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from memcli.core import models, runs
from memcli.gguf.base import cached_base
from memcli.gguf.merge import export_merged
from memcli.llama.sampler import sampler_of

FORMS = ("merged", "adapter")


@dataclass
class Deployed:
    """One deployment form of one type: the model GGUF llama.cpp loads, and the adapter GGUF over it (None for a
    merged file)."""

    form: str
    type: str
    model: Path
    adapter: Path | None
    bytes: int  # what ships: the model file, plus the adapter for the adapter form
    fallbacks: list


def make_forms(run: Path, spec: models.ModelSpec, adapter_gguf: Path, quant: str, work: Path,
               forms=FORMS, source: Path | None = None) -> list[Deployed]:
    """Both forms of type `quant` for the run: the merged file into `work` (it is the run's own, and names
    `source`, default the run, as its adapter), the quantised base from the cache (built once per model and
    type)."""
    made = []
    if "merged" in forms:
        out = work / f"merged.{quant}.gguf"
        info = export_merged(run, out, quant, base=spec, source=source)
        made.append(Deployed("merged", quant, out, None, out.stat().st_size, info.get("fallbacks", [])))
    if "adapter" in forms:
        base = cached_base(spec, quant)
        made.append(Deployed("adapter", quant, base, adapter_gguf,
                             base.stat().st_size + adapter_gguf.stat().st_size, []))
    return made


def write_modelfile(out: str | os.PathLike, merged: bool, model: str, settings: dict | None = None) -> Path:
    """An ollama Modelfile beside `out` (OUT.Modelfile): FROM the merged model, or FROM the base + ADAPTER, with
    the decoding the run was certified for: temperature 0 and ollama's repeat penalty as `train --sampler ollama`
    trained for it, else off (greedy). `settings`: the run's, when known (a chat run is queried through ollama's
    chat API, the template stored in the GGUF; a raw run in raw mode)."""
    settings = settings or {}
    out = Path(out).resolve()
    how = ("ollama run NAME, or its chat API: the key as the user's message, no system message"
           if settings.get("chat_template") else "the API with \"raw\": true, so the key reaches the model as trained")
    lines = [f"# ollama create NAME -f {out.name}.Modelfile; then {how}"]
    if merged:
        lines.append(f"FROM {out}")
    else:
        spec = models.resolve(model)
        if spec.gguf_path is not None:
            lines.append(f"FROM {spec.gguf_path.resolve()}")
        else:
            lines += [f"# the base GGUF this adapter was trained on: memcli export-base {model} --quant q8_0 "
                      "--out base.gguf", "FROM ./base.gguf"]
        lines.append(f"ADAPTER {out}")
    lines.append("PARAMETER temperature 0")
    if settings.get("sampler") == "ollama":  # trained and certified for ollama's penalties and plain greedy both
        s = sampler_of(settings)
        lines += [f"PARAMETER repeat_penalty {s.repeat_penalty:g}", f"PARAMETER repeat_last_n {s.repeat_last_n}"]
    else:  # greedy as certified: ollama up to v0.32.9 (and before v0.30) adds a repeat penalty of 1.1 by default,
        lines.append("PARAMETER repeat_penalty 1")  # which flips the near ties repeated digits make
    if settings.get("chat_template") and settings.get("system_prompt"):
        lines.append(f'SYSTEM """{settings["system_prompt"]}"""')
    path = out.with_name(out.name + ".Modelfile")
    runs.atomic_write(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"), example="adapter.gguf.Modelfile")
    return path
