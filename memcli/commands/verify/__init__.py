"""`memcli verify` (docs/method.md §2): what a pass's statistics mean is memcli.core.verdicts; the scorer is
memcli.llama.scorer (or the torch one here).

- `run`: the orchestration: `VerifyOptions`, inputs, backend, the streamed pass, `--deploy`, the report.
- `sources`: what `--lora` names, and the base it is verified on.
- `peft_backend`: the torch + PEFT scorer, a cross-check of llama.cpp's.
- `generation`: real greedy generation of a sample against the teacher-forced verdicts (`--generate`).
- `base_vs_tuned`: `--locality`: base against tuned over a text, in llama.cpp or torch.
- `report`: entries.jsonl rows, the probability plot, the report folder written whole or not at all.
"""
