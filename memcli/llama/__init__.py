"""The llama.cpp engine, through llama-cpp-python's C API; torch-free. Every stage that asks llama.cpp uses it.

- `library`: loading the library (API check, log capture) and models safely (the AMX probe), system info.
- `scorer`: `LlamaBackend`: packed multi-sequence batches, every answer position's logits reduced by the kernel;
  near ties scored again as a runner decodes one request.
- `sampler`: a runner's decoding at temperature 0 (presets: penalties, window, attention kernel) and llama.cpp's
  penalty arithmetic on the logits.
- `checks`: token ids inside the vocabulary; entries llama.cpp's own tokenizer splits differently.
- `quantize`: llama.cpp's own quantiser (`llama_model_quantize`), as users quantise before shipping.
"""
