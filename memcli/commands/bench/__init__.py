"""Benchmarks and cross-checks behind `memcli bench ...`: each prints side-by-side numbers.

- `verify`: `bench verify`: memcli verify against the usual ways of checking recall, one corpus, one machine.
- `kernel`: `bench kernel`: the native logits kernel against its numpy reference.
- `train`: `bench train`: MemFT against SFT, and memcli's loop against a bare PEFT loop.
- `methods`: `bench methods`: training objectives at equal rank, seed, batches and budget.
- `settings_study`: `bench settings`: entries trained on and time until certified, per variant of train's settings.
- `deploy_study`: `bench deploy`: recall in the shipped files after plain, --deploy and --margin training.
- `agree`: `bench agree`: torch + PEFT and llama.cpp reach the same verdict on every entry.
- `export`: `bench export`: adapter GGUF export time and size per rank.
- `memory`: `bench memory`: peak memory of verify against corpus size.
- `base`: `bench base`: which base GGUF verify should decode a model with.
- `prefix`: `bench prefix`: decoding a shared chat-template prefix once against in every sequence.
- `phonebook`: generated PhoneBooks of any size for the benchmarks.
"""
