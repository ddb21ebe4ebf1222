"""Where `memcli train` spends its time besides the optimiser's work, old way against new, in one process on the
same files (docs/measurements.md, "The set-up command"):

- the first use's dequantisation for torch: transformers' own conversion, against the same conversion with gguf's
  parser and tensor-name table cached (memcli.core.models._gguf_parsed_once), and with the parser reading a
  plain array (memcli.core.models._plain_map_reader); the folders are compared;
- the locality measurement at the end of train: two whole passes, against the layers below the adapter run once,
  and against the tuned pass alone with the base's side read (memcli.training.locality.BaseSide: the shipped
  one for the default model);
- for each corpus given: a training step against a clean check (what a check skipped by --gate-checks saves).

Usage: python docs/overhead.py CORPUS.jsonl [MORE.jsonl ...]   (the default model; a few minutes on 2 cores)
"""

import contextlib
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from memcli.core import models
from memcli.training.config import TrainConfig
from memcli.training.locality import base_side_path, reference_windows, torch_locality
from memcli.training.trainer import Trainer


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def step_and_check(corpus: str, work: Path) -> None:
    """Median times of a training step and of a clean check (the trainer's own, from its frozen prefix)."""
    trainer = Trainer(TrainConfig(corpus=corpus, max_steps=10**6, gguf="off"), work / "steps", force=True,
                      log=lambda m: None)
    trainer.prefix = trainer.frozen_prefix()
    steps = []
    for step, epoch, idx in trainer.batches():
        if step > 25:
            break
        seconds, _ = timed(lambda: trainer.train_step(step, epoch, idx))
        steps.append(seconds)
    checks = sorted(timed(trainer.evaluate)[0] for _ in range(5))
    step = sorted(steps[5:])[len(steps[5:]) // 2]
    print(f"{corpus}: {len(trainer.examples)} entries, a step {step * 1000:.0f} ms, a clean check "
          f"{checks[2] * 1000:.0f} ms ({checks[2] / step:.1f} steps); every 10 steps the check adds "
          f"{checks[2] / (10 * step):.0%}")
    trainer.close()


def main(corpus: str, more: list[str]) -> None:
    spec = models.resolve(None)
    work = Path(tempfile.mkdtemp())
    try:
        new, _ = timed(lambda: models._dequantise_gguf(spec.path, work / "new"))
        plain = models._plain_map_reader
        models._plain_map_reader = lambda reader_class: reader_class
        once, _ = timed(lambda: models._dequantise_gguf(spec.path, work / "once"))
        models._plain_map_reader = plain
        cached = models._gguf_parsed_once
        models._gguf_parsed_once = contextlib.nullcontext
        old, _ = timed(lambda: models._dequantise_gguf(spec.path, work / "old"))
        models._gguf_parsed_once = cached
        a, b, c = (load_file(work / f / "model.safetensors") for f in ("new", "once", "old"))
        same = all(x.keys() == c.keys() and all(torch.equal(x[k], c[k]) for k in c) for x in (a, b))
        print(f"dequantise: transformers {old:.1f} s, parsed once {once:.1f} s ({once / old:.2f}x), and through a "
              f"plain array {new:.1f} s ({new / old:.2f}x); same tensors: {same}")

        trainer = Trainer(TrainConfig(corpus=corpus, max_steps=30, gguf="off"), work / "run", force=True,
                          log=lambda m: None)
        trainer.run()
        windows = reference_windows(trainer.spec, "measure", None, (trainer.model, trainer.tokenizer))
        first = min(trainer.layers)
        side = base_side_path(trainer.spec, windows, str(next(trainer.model.parameters()).dtype))
        for _ in range(2):
            whole, a = timed(lambda: torch_locality(trainer.model, windows, trainer.device))
            shared, b = timed(lambda: torch_locality(trainer.model, windows, trainer.device, first_layer=first))
            one, c = timed(lambda: torch_locality(trainer.model, windows, trainer.device, first_layer=first,
                                                  base_cache=side))
            print(f"locality: two whole passes {whole:.1f} s, layers below {first} once {shared:.1f} s "
                  f"({shared / whole:.2f}x), the tuned pass against the base's side {one:.1f} s ({one / whole:.2f}x);"
                  f" agreement {a['argmax_agreement']:.4f} / {b['argmax_agreement']:.4f} / "
                  f"{c['argmax_agreement']:.4f}, KL {a['kl']:.5f} / {b['kl']:.5f} / {c['kl']:.5f}")
        for path in (corpus, *more):
            step_and_check(path, work)
    finally:
        shutil.rmtree(work)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
