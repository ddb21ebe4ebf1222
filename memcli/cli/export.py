"""`memcli export` and `memcli export-base`: GGUF files for llama.cpp; parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from memcli.cli.terminal import console, user_errors
from memcli.core import runs
from memcli.core.errors import UserError
from memcli.core.models import SUPPORTED_TYPES

FAMILIES = ", ".join(SUPPORTED_TYPES)  # the model families memcli trains and exports


# --- export ------------------------------------------------------------------------------------------------

@user_errors
def export(src: Path = typer.Argument(..., help="A run folder or a PEFT adapter folder."),
           out: Path = typer.Option(..., "--out", help="The GGUF to write: the adapter, or with --merge the model."),
           outtype: str = typer.Option("f32", help="f32 | f16 | q8_0 for the LoRA tensors of an adapter."),
           merge: bool = typer.Option(False, "--merge", help="Write one self-contained model instead: the base with "
                                      "the adapter merged in (float32), tokenizer included."),
           quant: Optional[str] = typer.Option(None, help="With --merge: the file type, by llama.cpp's names (f16, "
                                               "bf16, q8_0, q6_k, q5_k_m, q5_0, q4_k_m, q4_0, q3_k_m, ...), made by "
                                               "llama.cpp's quantiser. \\[default: f16]"),
           modelfile: bool = typer.Option(False, "--modelfile", help="Also write an ollama Modelfile beside --out "
                                          "(FROM the base + ADAPTER, or FROM the merged model)."),
           model: Optional[str] = typer.Option(None, help="The base model, when the folder does not say.")):
    """Write a LoRA adapter as a llama.cpp adapter GGUF (q/k permuted, PEFT's scale reproduced exactly), or with
    --merge as one deployable model GGUF (merged, then quantised by llama.cpp)."""
    from memcli.core import models

    base = models.resolve(model) if model else None
    if quant is not None and not merge:
        raise UserError("--quant applies to --merge (an adapter's own tensors take --outtype)")
    if merge:
        from memcli.core.quants import check_quant
        from memcli.gguf.merge import export_merged

        info = export_merged(src, out, check_quant(quant or "f16", "--quant"), base=base)
        console.print(f"wrote {out}: {info['model']} with {info['merged']} adapted tensors merged, {info['type']}, "
                      f"{info['bytes'] / 2**20:.1f} MiB, {info['seconds']:.1f} s", highlight=False)
        _print_quantised(info)
    else:
        from memcli.gguf.adapter import export_adapter

        info = export_adapter(src, out, outtype, base=base)
        console.print(f"wrote {out}: {info['tensors']} tensors, {info['bytes'] / 1024:.1f} KiB, base "
                      f"{info['model']}, {info['seconds']:.2f} s", highlight=False)
    if modelfile:
        from memcli.deploy.forms import write_modelfile

        settings = runs.read_settings(src) if runs.is_run(src) else {}
        path = write_modelfile(out, merged=merge, model=info["model"], settings=settings)
        console.print(f"wrote {path}: ollama create NAME -f {path}", highlight=False)


def _print_quantised(info: dict) -> None:
    """What llama.cpp's quantiser chose: its tensor types, and the tensors it had to fall back for."""
    from memcli.llama.quantize import describe_fallbacks

    if info.get("tensor_types"):
        console.print("tensor types: " + ", ".join(f"{t} {n}" for t, n in info["tensor_types"].items()),
                      highlight=False)
    fallback = describe_fallbacks(info.get("fallbacks", []))
    if fallback:
        console.print(f"llama.cpp's quantiser fell back: {fallback}", highlight=False)


@user_errors
def export_base_cmd(hf_dir: str = typer.Argument(..., help=f"An HF model folder ({FAMILIES}) or a memcli "
                                                 "model name."),
                    out: Path = typer.Option(..., "--out", help="The base GGUF to write."),
                    outtype: str = typer.Option("f32", help="f32 | f16 | q8_0, written by memcli."),
                    quant: Optional[str] = typer.Option(None, help="Instead of --outtype: any of llama.cpp's file "
                                                        "types (q8_0, q6_k, q5_k_m, q4_k_m, q4_0, ...), made by "
                                                        "llama.cpp's quantiser: the base to deploy an adapter "
                                                        "over.")):
    """Write an HF model as a llama.cpp base GGUF, tokenizer included."""
    if quant is not None:
        from memcli.core.quants import check_quant
        from memcli.gguf.merge import export_quantised

        info = export_quantised(hf_dir, out, check_quant(quant, "--quant"))
        console.print(f"wrote {out}: {info['model']}, {info['type']}, {info['bytes'] / 2**20:.1f} MiB, "
                      f"{info['seconds']:.1f} s", highlight=False)
        _print_quantised(info)
        return
    from memcli.gguf.base import export_base

    info = export_base(hf_dir, out, outtype)
    console.print(f"wrote {out}: {info['arch']} {info['name']}, {info['tensors']} tensors, "
                  f"{info['bytes'] / 2**20:.1f} MiB, {info['seconds']:.1f} s", highlight=False)
