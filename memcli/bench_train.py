"""`memcli bench train`: MemFT against SFT, and memcli's loop against a bare PEFT loop, in one process.

(1) Steps and wall time to certified recall for SFT, MemFT-OT and MemFT-SW on one PhoneBook, same rank and seed.
(2) Training throughput (answer tokens/s) over the same batches: a bare PEFT loop (the model's own mean CE over
    labelled positions, no metrics) against memcli's loop with MemFT-OT and its per-step metrics.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import torch

from . import lora, models
from .corpus import generate_phonebook
from .train import TrainConfig, Trainer


def _write_phonebook(folder: Path, entries: int, seed: int) -> Path:
    import json

    path = folder / f"pb{entries}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in generate_phonebook(entries, seed)))
    return path


def methods_to_recall(corpus: Path, model: str, rank: int, seed: int, max_epochs: int, check_every: int,
                      folder: Path) -> list[dict]:
    rows = []
    for method in ("sft", "memft-ot", "memft-sw"):
        cfg = TrainConfig(corpus=str(corpus), model=model, method=method, rank=rank, seed=seed, epochs=max_epochs,
                          until_recall=True, check_every=check_every, checkpoint_every=10**9)
        summary = Trainer(cfg, folder / method, log=lambda m: None).run()
        rows.append({"method": method, "certified": summary["all_certified"], "steps": summary["steps"],
                     "wall_s": summary["wall_seconds"], "exact_match": summary["exact_match"]})
    return rows


def bare_peft_throughput(cfg: TrainConfig, steps: int) -> float:
    """Answer tokens/s of the plainest loop: HF forward with labels (mean CE), backward, clip, AdamW step."""
    from .corpus import load_examples

    model, tokenizer = models.load_model(models.resolve(cfg.model))
    examples = load_examples(cfg.corpus, tokenizer)
    layers, modules = lora.resolve_placement(model, cfg.layers, cfg.modules)
    model = lora.add_lora(model, cfg.rank, cfg.alpha, cfg.dropout, layers, modules, cfg.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr, weight_decay=0.0)
    model.train()
    g = torch.Generator().manual_seed(cfg.seed)
    tokens, elapsed = 0, 0.0
    for step in range(steps + 1):  # the first step warms up and is not timed
        t0 = time.perf_counter()
        idx = torch.randperm(len(examples), generator=g)[: cfg.batch_size].tolist()
        batch = lora.collate([examples[i] for i in idx], tokenizer.pad_token_id, "cpu")
        labels = torch.full_like(batch.input_ids, -100)
        labels[batch.rows[batch.mask], batch.positions[batch.mask] + 1] = batch.targets[batch.mask]
        loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step:
            elapsed += time.perf_counter() - t0
            tokens += int(batch.mask.sum())
    return tokens / elapsed


def memcli_throughput(cfg: TrainConfig, steps: int, folder: Path) -> float:
    """Answer tokens/s of memcli's own loop (MemFT-OT, metrics every step, no recall checks), from the
    per-step timings it logs, skipping the first (warm-up) step."""
    import json

    cfg = dataclasses.replace(cfg, max_steps=steps + 1, check_every=10**9, checkpoint_every=10**9)
    trainer = Trainer(cfg, folder / "throughput", log=lambda m: None)
    trainer.run()
    rows = [json.loads(x) for x in (folder / "throughput" / "metrics.jsonl").read_text().splitlines()][1:]
    return sum(r["answer_tokens"] for r in rows) / sum(r["answer_tokens"] / r["tokens_per_s"] for r in rows)


def main(entries: int = 32, model: str = models.DEFAULT_MODEL, rank: int = 8, seed: int = 0, max_epochs: int = 400,
         check_every: int = 5, throughput_steps: int = 30) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = _write_phonebook(folder, entries, seed)
        console.print(f"PhoneBook of {entries} entries, model {model}, rank {rank}, seed {seed}")
        rows = methods_to_recall(corpus, model, rank, seed, max_epochs, check_every, folder)
        table = Table("method", "certified", "steps to certified recall", "wall s", "steps vs SFT")
        sft_steps = rows[0]["steps"]
        for r in rows:
            table.add_row(r["method"], str(r["certified"]), str(r["steps"]), f"{r['wall_s']:.1f}",
                          f"{r['steps'] / sft_steps:.2f}x")
        console.print(table)

        cfg = TrainConfig(corpus=str(corpus), model=model, rank=rank, seed=seed, method="memft-ot")
        bare = bare_peft_throughput(cfg, throughput_steps)
        ours = memcli_throughput(cfg, throughput_steps, folder)
        table = Table("loop", "answer tokens/s", "vs bare PEFT")
        table.add_row("bare PEFT (mean CE, no metrics)", f"{bare:.1f}", "1.00x")
        table.add_row("memcli MemFT-OT (metrics every step)", f"{ours:.1f}", f"{ours / bare:.2f}x")
        console.print(table)
        overhead = max(0.0, bare / ours - 1)
        console.print(f"MemFT overhead against the bare loop: {overhead:.1%} (target: at most 10 %)")
    return {"methods": rows, "bare_tokens_per_s": bare, "memcli_tokens_per_s": ours}
