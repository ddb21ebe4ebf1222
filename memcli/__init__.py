"""memcli: write exact knowledge into a LoRA adapter with MemFT and prove that it is there.

The package is built in layers, one folder each, listed bottom to top in `LAYERS`. A module imports only from its
own layer and the layers below it, and the layers in `TORCH_FREE` import no torch, transformers or peft at module
level, so that the llama.cpp path of `memcli verify` starts without them (tests/test_layout.py checks both; each
folder's __init__.py lists its modules, and docs/architecture.md is generated from them).
"""

__version__ = "0.1.0"

LAYERS = (
    ("core", "the shared ground: errors, the run folder and its atomic writer, corpora and their one tokenisation, "
             "the logits kernel, verdicts, the model registry"),
    ("llama", "the llama.cpp engine: loading the library and models safely, the batched teacher-forced scorer, "
              "token checks, llama.cpp's quantiser"),
    ("gguf", "GGUF files llama.cpp runs exactly as torch + PEFT do: base models, adapters, merged models"),
    ("deploy", "the files users ship (merged, or an adapter over a quantised base) and the one certifier of them"),
    ("training", "training in torch: settings, LoRA placement, the forward pass, objectives, the loop, sweeps"),
    ("commands", "what each command does, without the terminal: verify, the law (fit, plan), ask, benchmarks"),
    ("cli", "the command line: parse, call, print"),
)
TORCH_FREE = ("core", "llama", "gguf", "deploy")
