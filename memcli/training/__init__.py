"""Training in torch (`memcli train`, `memcli sweep`); the loop reads on one page in `trainer`.

- `config`: every train setting with its default, type and check (defaults < YAML < command line).
- `lora`: adapter placement (layers, modules) and wrapping the frozen model.
- `forward`: answer-only logits, the frozen-prefix cache, the clean recall pass, the base's loss.
- `objectives`: SFT, MemFT-OT and MemFT-SW token weights as pure functions; the curriculum.
- `preserve`: `--preserve`: the tuned model's next-token distribution kept close to the base's.
- `locality`: what memorising cost elsewhere: the reference text, its running totals, the torch pass.
- `deploy_aware`: `--deploy TYPE`: both deployed forms in the forward pass, llama.cpp's verdict at each check.
- `trainer`: the training loop (`Trainer.run`), checkpoints, resume, the summary.
- `sweep`: one run per (rank, length) cell, on local workers or Ray.
"""
