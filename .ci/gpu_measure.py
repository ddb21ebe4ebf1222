"""The measuring half of .ci/gpu_check.sh: one subcommand per phase. Every phase appends one JSON object to
$OUT/gpu_check.jsonl (phase, mode, ok, seconds and its figures) and rewrites $OUT/gpu_check.json (every phase so
far, by name), so a run cut short still returns what it measured. The GPU run and the dry run write the same
fields; the dry run's shapes are small and its device is the CPU.

    python .ci/gpu_measure.py record PHASE KEY=VALUE ...   a shell phase's figures (VALUE read as JSON if it parses)
    python .ci/gpu_measure.py env                          the machine, the versions, what the image lacks
    python .ci/gpu_measure.py train MODEL                  a MemFT step against a bare PEFT loop (MODEL: tiny or a
                                                           SHAPES name, whose weights are made on the device)
    python .ci/gpu_measure.py make-model SHAPE FOLDER      a seeded random model of SHAPE, made on the device, saved
    python .ci/gpu_measure.py generate RUN CORPUS N        transformers generate, greedy, on the first N entries
    python .ci/gpu_measure.py verify-report PHASE REPORT   a `memcli verify` report folder's figures
    python .ci/gpu_measure.py verdicts PHASE A B [C]       per-entry verdicts of report folders A, B (and C) compared
    python .ci/gpu_measure.py summary                      the ratios the check is for, from the phases recorded
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

OUT = Path(os.environ.get("OUT") or "gpu-check")
MODE = os.environ.get("GPU_CHECK_MODE", "gpu")

# Qwen3 shapes (the configs Qwen published with the models; the weights are random: speed does not depend on them).
# The paper's model is Qwen3-8B. `dry` keeps the family, head_dim and vocabulary and shrinks the rest for a CPU.
_QWEN3 = dict(model_type="qwen3", vocab_size=151936, head_dim=128, max_position_embeddings=40960,
              rope_theta=1_000_000.0, rms_norm_eps=1e-6, hidden_act="silu")
SHAPES = {
    "qwen3-8b": dict(_QWEN3, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=False),
    "qwen3-4b": dict(_QWEN3, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-1.7b": dict(_QWEN3, hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-0.6b": dict(_QWEN3, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, tie_word_embeddings=True),
    "qwen3-dry": dict(_QWEN3, hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32, tie_word_embeddings=False),
}
TOKENIZER_FROM = "smollm2-135m"  # the tokenizer every shape borrows (carried as a copy: .ci/gpu_prepare.sh)


# --- the record -------------------------------------------------------------------------------------------------

def record(phase: str, **fields) -> dict:
    row = {"phase": phase, "mode": MODE, "at": datetime.now(timezone.utc).isoformat(timespec="seconds"), **fields}
    OUT.mkdir(parents=True, exist_ok=True)
    with open(OUT / "gpu_check.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    phases: dict[str, dict] = {}  # a phase's records merged in order (its figures, then the shell's wall time)
    for line in (OUT / "gpu_check.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            r = json.loads(line)
        except ValueError:
            continue
        phases.setdefault(r["phase"], {}).update(r)
    tmp = OUT / f".gpu_check.json.{os.getpid()}"
    tmp.write_text(json.dumps({"mode": MODE, "phases": phases}, indent=1) + "\n")
    os.replace(tmp, OUT / "gpu_check.json")
    print(f"[{phase}] " + json.dumps(fields), flush=True)
    return row


def recorded() -> dict:
    path = OUT / "gpu_check.json"
    return json.loads(path.read_text())["phases"] if path.exists() else {}


def _value(text: str):
    try:
        return json.loads(text)
    except ValueError:
        return text


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def _peak_gib(device: str) -> float | None:
    if not device.startswith("cuda"):
        return None
    import torch

    return round(torch.cuda.max_memory_allocated() / 2**30, 2)


# --- phases -----------------------------------------------------------------------------------------------------

def env(_args) -> None:
    import importlib.util

    def version(name):
        try:
            from importlib.metadata import version as v

            return v(name)
        except Exception:
            return None

    def run(cmd):
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            return None

    import torch

    fields = {"ok": True, "machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
              "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
              "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
              "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
              if torch.cuda.is_available() else None,
              "driver": run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
              if shutil.which("nvidia-smi") else None,
              "nvcc": (run(["nvcc", "--version"]) or "").splitlines()[-1:] if shutil.which("nvcc") else None,
              "disk_free_gib": round(shutil.disk_usage(os.environ.get("GPU_CHECK_WORK", "/tmp")).free / 2**30, 1),
              "versions": {n: version(n) for n in ("transformers", "peft", "numpy", "scipy", "typer", "rich",
                                                   "safetensors", "pyyaml", "nanobind", "scikit-build-core",
                                                   "cmake", "ninja")},
              "image_lacks": [n for n in ("llama_cpp", "gguf", "matplotlib", "diskcache")
                              if importlib.util.find_spec(n) is None]}
    record("env", **fields)


def shape_folder(shape: str, folder: Path) -> Path:
    """config.json of SHAPE and the borrowed tokenizer's files; no weights."""
    from transformers import AutoConfig

    from memcli.core import models

    tokenizer = models.source_tokenizer(TOKENIZER_FROM)
    if (folder / "config.json").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    fields = dict(SHAPES[shape])
    rope_theta = fields.pop("rope_theta")
    config = AutoConfig.for_model(**fields, rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
                                  bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                  pad_token_id=tokenizer.pad_token_id)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def random_model(folder: Path, dtype: str, device: str, seed: int = 0):
    """The model of folder's config.json with seeded random weights, made on `device` (seconds on a GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    _sync(device)
    return model


def train(args) -> None:
    """memcli's training step (MemFT-OT, whole model and from the frozen prefix as `memcli train` runs it) against
    a bare PEFT loop, alternating step by step on the same batches and the same adapted model."""

    from memcli.commands.bench.train import BarePeftLoop
    from memcli.core import models
    from memcli.core.datagen import generate_phonebook, write_jsonl
    from memcli.training.config import TrainConfig
    from memcli.training.trainer import Trainer

    work = Path(args.work)
    device = models.pick_device(args.device)
    corpus = work / f"train-pb{args.entries}.jsonl"
    write_jsonl(corpus, generate_phonebook(args.entries, 0))
    t0 = time.perf_counter()
    made = {}
    if args.model in SHAPES:
        folder = shape_folder(args.model, work / "shapes" / args.model)

        def load_model(spec, dtype="float32", device="cpu"):  # weights made on the device instead of read
            from transformers import AutoTokenizer

            t = time.perf_counter()
            model = random_model(folder, dtype, device)
            made["weights_s"] = round(time.perf_counter() - t, 2)
            model.requires_grad_(False)
            return model, AutoTokenizer.from_pretrained(folder)

        models.load_model = load_model
        model_name = str(folder)
    else:
        model_name = args.model
    # three updates per batch (memcli twice, the bare loop once) on one adapter: a small learning rate keeps the
    # random model's loss finite; the speed of a step does not depend on it
    cfg = TrainConfig(corpus=str(corpus), model=model_name, device=device, batch_size=args.batch, gguf="off",
                      checkpoint_every=10**9, max_steps=args.steps + 1, rank=args.rank, lr=1e-4)
    trainer = Trainer(cfg, work / "runs" / f"step-{args.model}", force=True, log=lambda m: None)
    setup_s = time.perf_counter() - t0
    base = trainer.model.get_base_model()
    params = sum(p.numel() for name, p in base.named_parameters() if "lora_" not in name)  # the base's
    t0 = time.perf_counter()
    prefix = trainer.frozen_prefix()
    prefix_s = time.perf_counter() - t0
    bare = BarePeftLoop(cfg, trainer.examples, model=trainer.model, pad_id=trainer.pad_id, device=trainer.device)
    totals = {"bare_peft": [0, 0.0], "memcli_whole_model": [0, 0.0], "memcli_from_prefix": [0, 0.0]}
    trainer.model.train()
    for step, epoch, idx in trainer.batches():
        trainer.prefix = None
        whole = trainer.train_step(step, epoch, idx)
        trainer.prefix = prefix
        cached = trainer.train_step(step, epoch, idx) if prefix is not None else whole
        tokens, seconds = bare.step(idx)
        if step > 1:  # the first step of each warms up
            totals["bare_peft"][0] += tokens
            totals["bare_peft"][1] += seconds
            for name, row in (("memcli_whole_model", whole), ("memcli_from_prefix", cached)):
                totals[name][0] += row["answer_tokens"]
                totals[name][1] += row["answer_tokens"] / row["tokens_per_s"]
    rates = {name: round(n / s, 1) for name, (n, s) in totals.items()}
    record(f"train_{'tiny' if args.model == 'tiny' else 'shape'}", ok=True, model=args.model,
           shape=SHAPES.get(args.model), parameters=params, device=trainer.device,
           dtype=str(base.get_input_embeddings().weight.dtype).removeprefix("torch."), rank=args.rank, lr=cfg.lr,
           layers=trainer.layers, batch=args.batch, timed_steps=args.steps,
           answer_tokens_per_step=round(totals["bare_peft"][0] / max(args.steps, 1), 1),
           tokens_per_s=rates, memcli_vs_bare={k: round(rates[k] / rates["bare_peft"], 3)
                                                for k in ("memcli_whole_model", "memcli_from_prefix")},
           prefix_layers=prefix.first_layer if prefix is not None else 0, prefix_s=round(prefix_s, 2),
           weights_made_s=made.get("weights_s"), setup_s=round(setup_s, 2), peak_gib=_peak_gib(trainer.device))


def make_model(args) -> None:
    from memcli.core import models

    device = models.pick_device(args.device)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    folder = Path(args.folder)
    t0 = time.perf_counter()
    shape_folder(args.shape, folder)
    model = random_model(folder, dtype, device)
    made = time.perf_counter() - t0
    t0 = time.perf_counter()
    model.save_pretrained(folder, safe_serialization=True)
    saved = time.perf_counter() - t0
    size = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    record("verify_model", ok=True, shape=args.shape, dims=SHAPES[args.shape],
           parameters=sum(p.numel() for p in model.parameters()), dtype=dtype, device=device,
           made_s=round(made, 2), saved_s=round(saved, 2), safetensors_gib=round(size / 2**30, 2))


def generate(args) -> None:
    """transformers generate, greedy, one entry at a time (memcli bench verify's baseline b) on the device."""
    from memcli.commands.bench.verify import _context, baseline_transformers
    from memcli.core import models

    device = models.pick_device(args.device)
    dtype = "bfloat16" if device.startswith("cuda") else "float32"
    src, spec, tokenizer, examples = _context(Path(args.corpus), Path(args.run), None)
    r = baseline_transformers(spec, src.peft_dir, tokenizer, examples, args.entries, None, None, device=device,
                              dtype=dtype)
    record("generate", ok=True, entries=r["entries"], device=device, dtype=dtype, seconds=round(r["seconds"], 3),
           load_s=round(r["load_s"], 2), entries_per_s=round(r["entries"] / r["seconds"], 2),
           tokens_per_s=round(r["tokens"] / r["seconds"], 1), exact=sum(r["verdicts"].values()))


def verify_report(args) -> None:
    report = json.loads((Path(args.report) / "report.json").read_text())
    t, totals, backend = report["timings"], report["totals"], report.get("backend") or {}
    record(args.phase, ok=True, entries=totals["entries"], exact=totals["exact"], certified=totals.get("certified"),
           answer_tokens=totals.get("answer_tokens"), entries_per_s=t.get("entries_per_s"),
           answer_tokens_per_s=t.get("answer_tokens_per_s"), pass_s=t.get("pass_s"), decode_s=t.get("decode_s"),
           load_s=t.get("load_s"), setup_s=t.get("setup_s"), total_s=t.get("total_s"),
           backend=report["settings"].get("backend"), n_gpu_layers=backend.get("n_gpu_layers"),
           gpu_offload=backend.get("gpu_offload"), base=(report["settings"].get("base") or {}).get("kind"),
           wall_s=_value(args.wall) if args.wall else None)


def verdicts(args) -> None:
    """Per entry: exact and the first failing position, compared between report folders (the first is the
    reference); certified is compared apart (a p at 0.5 can fall either way between backends)."""
    from memcli.commands.verify.report import iter_entries

    def rows(folder):
        return {r["line"]: r for r in iter_entries(folder)}

    names = ["gpu", "cpu", "torch"][: len(args.reports)]
    tables = [rows(f) for f in args.reports]
    ref = tables[0]
    fields = {"entries": len(ref), "exact": sum(r["exact"] for r in ref.values())}
    for name, table in zip(names[1:], tables[1:]):
        fields[f"equal_to_{name}"] = sum(1 for k, r in ref.items() if k in table and
                                         (table[k]["exact"], table[k]["first_failure"]) ==
                                         (r["exact"], r["first_failure"]))
        fields[f"certified_equal_to_{name}"] = sum(1 for k, r in ref.items()
                                                   if k in table and table[k]["certified"] == r["certified"])
    # the check: llama.cpp with every layer offloaded gives the CPU's verdicts (torch's are a figure: close calls
    # may part between the two libraries)
    ok = len(tables) > 1 and fields["equal_to_cpu"] == len(ref) == len(tables[1])
    record(args.phase, ok=ok, compared=names, **fields)


def summary(_args) -> None:
    p = recorded()

    def get(phase, *keys):
        value = p.get(phase)
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value

    gen = get("generate", "entries_per_s")
    fields = {"ok": all(r.get("ok") for r in p.values() if not r.get("skipped")),
              "phases_ok": sorted(k for k, r in p.items() if r.get("ok")),
              "phases_failed": sorted(k for k, r in p.items() if r.get("ok") is False and not r.get("skipped")),
              "phases_skipped": sorted(k for k, r in p.items() if r.get("skipped")),
              "memcli_vs_bare_tiny": get("train_tiny", "memcli_vs_bare"),
              "memcli_vs_bare_shape": get("train_shape", "memcli_vs_bare"),
              "verify_vs_generate": {k: round(get(k, "entries_per_s") / gen, 1)
                                     for k in ("verify_small", "verify_large") if gen and get(k, "entries_per_s")},
              "tiny_gpu_equals_cpu": get("tiny_verdicts", "ok"),
              "elapsed_s": _value(os.environ.get("GPU_CHECK_ELAPSED", "null"))}
    record("summary", **fields)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("record")
    r.add_argument("phase")
    r.add_argument("fields", nargs="*")
    sub.add_parser("env")
    t = sub.add_parser("train")
    t.add_argument("model")
    t.add_argument("--work", default=os.environ.get("GPU_CHECK_WORK", "/tmp/memcli-gpu-check"))
    t.add_argument("--device", default="auto")
    t.add_argument("--steps", type=int, default=10)
    t.add_argument("--entries", type=int, default=64)
    t.add_argument("--batch", type=int, default=16)
    t.add_argument("--rank", type=int, default=8)
    m = sub.add_parser("make-model")
    m.add_argument("shape", choices=sorted(SHAPES))
    m.add_argument("folder")
    m.add_argument("--device", default="auto")
    g = sub.add_parser("generate")
    g.add_argument("run")
    g.add_argument("corpus")
    g.add_argument("entries", type=int)
    g.add_argument("--device", default="auto")
    v = sub.add_parser("verify-report")
    v.add_argument("phase")
    v.add_argument("report")
    v.add_argument("--wall")
    c = sub.add_parser("verdicts")
    c.add_argument("phase")
    c.add_argument("reports", nargs="+")
    sub.add_parser("summary")
    args = ap.parse_args()
    if args.command == "record":
        record(args.phase, **{k: _value(v) for k, v in (f.split("=", 1) for f in args.fields)})
        return
    if args.command == "train" and args.model not in SHAPES and args.model != "tiny":
        sys.exit(f"train: MODEL is tiny or one of {', '.join(SHAPES)}")
    {"env": env, "train": train, "make-model": make_model, "generate": generate, "verify-report": verify_report,
     "verdicts": verdicts, "summary": summary}[args.command](args)


if __name__ == "__main__":
    main()
