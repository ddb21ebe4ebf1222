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

from memcli.core import models
from memcli.core.datagen import generate_phonebook, write_jsonl
from memcli.training import forward, lora
from memcli.training.config import TrainConfig
from memcli.training.trainer import Trainer


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


class BarePeftLoop:
    """The plainest loop on the same model, placement and seed: HF forward with labels (the model's own mean CE
    over every labelled position), backward, clip, AdamW step, no metrics. It loads its own float32 CPU model, or
    trains the adapter of `model` (a PEFT model already on `device`, e.g. a Trainer's) with its own optimiser."""

    def __init__(self, cfg: TrainConfig, examples, model=None, pad_id: int | None = None, device: str = "cpu"):
        if model is None:
            model, tokenizer = models.load_model(models.resolve(cfg.model))
            layers, modules = lora.resolve_placement(model, cfg.layers, cfg.modules)
            model = lora.add_lora(model, cfg.rank, cfg.alpha, cfg.dropout, layers, modules, cfg.seed)
            pad_id = tokenizer.pad_token_id
        self.model = model
        self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=cfg.lr,
                                           weight_decay=0.0)
        self.model.train()
        self.cfg, self.examples, self.pad_id, self.device = cfg, examples, pad_id, device

    def step(self, idx: list[int]) -> tuple[int, float]:
        """(answer tokens, seconds) of one step (on a GPU: until its kernels have finished)."""
        t0 = time.perf_counter()
        batch = forward.collate([self.examples[i] for i in idx], self.pad_id, self.device)
        labels = torch.full_like(batch.input_ids, -100)
        labels[batch.rows[batch.mask], batch.positions[batch.mask] + 1] = batch.targets[batch.mask]
        loss = self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return int(batch.mask.sum()), time.perf_counter() - t0


def throughput(cfg: TrainConfig, steps: int, folder: Path) -> dict:
    """Answer tokens/s of the bare PEFT loop, memcli's loop running the whole model every step, and memcli's loop
    starting at the first adapted layer (the frozen prefix computed once; its one-time cost is reported apart and
    also amortised over the timed steps), all with MemFT-OT and a metrics row every step, over the same batches.
    The loops alternate step by step, so load on a shared machine hits them alike; the first step of each warms
    up and is not counted."""
    cfg = dataclasses.replace(cfg, checkpoint_every=10**9)
    full = Trainer(cfg, folder / "full", log=lambda m: None)
    cached = Trainer(cfg, folder / "cached", log=lambda m: None)
    t0 = time.perf_counter()
    cached.prefix = cached.frozen_prefix()
    prefix_s = time.perf_counter() - t0
    bare = BarePeftLoop(cfg, full.examples)
    full.model.train()
    cached.model.train()
    totals = {"bare": [0, 0.0], "full": [0, 0.0], "cached": [0, 0.0]}
    for step, epoch, idx in full.batches():
        if step > steps + 1:
            break
        tokens, seconds = bare.step(idx)
        rows = {"full": full.train_step(step, epoch, idx), "cached": cached.train_step(step, epoch, idx)}
        if step > 1:
            totals["bare"][0] += tokens
            totals["bare"][1] += seconds
            for name, row in rows.items():
                totals[name][0] += row["answer_tokens"]
                totals[name][1] += row["answer_tokens"] / row["tokens_per_s"]
    rates = {name: n / t for name, (n, t) in totals.items()}
    rates["cached_amortised"] = totals["cached"][0] / (totals["cached"][1] + prefix_s)
    rates["prefix_s"] = prefix_s
    rates["first_layer"] = cached.prefix.first_layer if cached.prefix is not None else 0
    return rates


def bench_train(entries: int = 32, model: str = models.DEFAULT_MODEL, rank: int = 8, seed: int = 0,
                max_epochs: int = 400, check_every: int = 5, throughput_steps: int = 30, recall: bool = True) -> dict:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        corpus = folder / f"pb{entries}.jsonl"
        write_jsonl(corpus, generate_phonebook(entries, seed))
        console.print(f"PhoneBook of {entries} entries, model {model}, rank {rank}, seed {seed}")
        rows = methods_to_recall(corpus, model, rank, seed, max_epochs, check_every, folder) if recall else []
        if rows:
            table = Table("method", "certified", "steps to certified recall", "wall s", "steps vs SFT")
            for r in rows:
                table.add_row(r["method"], str(r["certified"]), str(r["steps"]), f"{r['wall_s']:.1f}",
                              f"{r['steps'] / rows[0]['steps']:.2f}x")
            console.print(table)

        cfg = TrainConfig(corpus=str(corpus), model=model, rank=rank, seed=seed, method="memft-ot")
        r = throughput(cfg, throughput_steps, folder)
        table = Table("loop", "answer tokens/s", "vs bare PEFT")
        table.add_row("bare PEFT (HF forward with labels, no metrics)", f"{r['bare']:.1f}", "1.00x")
        table.add_row("memcli MemFT-OT, whole model every step", f"{r['full']:.1f}", f"{r['full'] / r['bare']:.2f}x")
        table.add_row(f"memcli MemFT-OT, from layer {r['first_layer']} (frozen prefix cached)", f"{r['cached']:.1f}",
                      f"{r['cached'] / r['bare']:.2f}x")
        table.add_row(f"  the same with the prefix's one-time {r['prefix_s']:.1f} s spread over {throughput_steps} "
                      "steps", f"{r['cached_amortised']:.1f}", f"{r['cached_amortised'] / r['bare']:.2f}x")
        console.print(table)
    return {"methods": rows, "throughput": r}
