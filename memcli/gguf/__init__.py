"""GGUF files that llama.cpp runs exactly as torch + PEFT do, written with the `gguf` package alone (no llama.cpp
checkout, no converter scripts); every file goes through memcli.core.runs.atomic_write, never half-written.

- `hf`: what export needs from an HF model folder (config, tensor names, the RoPE row layout) and its tokenizer.
- `arch`: what llama.cpp's Gemma 3 and Phi-3 graphs need beyond Llama's hyperparameters.
- `fingerprint`: the identity of a base, from its HF folder or any GGUF of it; `check_base` refuses another.
- `base`: an HF model as a base GGUF, and the cached base GGUF of each model and type.
- `adapter`: a PEFT LoRA as a llama.cpp adapter GGUF, and `check_pair` (an adapter on its own base only).
- `merge`: a LoRA merged into its base, or the base alone, as one GGUF of any llama.cpp file type.
"""
