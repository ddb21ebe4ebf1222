"""GGUF for llama.cpp: LoRA adapters and base models that llama.cpp runs exactly as torch + PEFT do (memcli trains
weight-level LoRA so that its adapters export, docs/method.md §4). Written with the `gguf` package alone (no
llama.cpp checkout, no converter scripts).

- reader.py: reading GGUF files (header, metadata, tensor table) and the outtype encodings (f32, f16, q8_0).
- hf.py: what export needs from an HF model folder (config, tensor table, llama.cpp tensor names, the RoPE row
  permutation) and its tokenizer; `read_base` makes every check GGUF export makes of a base model.
- arch.py: what llama.cpp's Gemma 3 and Phi-3 graphs need beyond Llama's hyperparameters (sliding windows, norm
  shift, partial rotary, LongRoPE), each checked against what the graph computes.
- fingerprint.py: the identity of a base, computable from its HF folder and from any GGUF of it.
- base.py: `export_base` (an HF folder as a base GGUF) and `base_gguf` (the base GGUF llama.cpp loads).
- adapter.py: `export_adapter` (a run's or a PEFT folder's LoRA as a llama.cpp adapter GGUF), `exportable`
  (the same checks before training) and `check_pair` (an adapter on a base it was not trained for is refused).

Every file is written through memcli.runs.atomic_write: an error never leaves a partial .gguf.

Layers (tests/test_layout.py): reader.py is the GGUF file format and imports nothing of memcli but errors, so
memcli.models reads GGUF metadata through it; hf, fingerprint, base and adapter sit above memcli.models and use
it. This file imports nothing.
"""
