"""The shared ground every layer stands on; no torch and no llama.cpp at module level.

- `errors`: `UserError`, bad input a user can cause: one line, exit code 2.
- `signals`: SIGTERM unwinds like Ctrl-C, so every temporary output is removed.
- `runs`: the run folder (its files, its lock) and the one atomic writer every output goes through.
- `corpus`: corpus formats -> `Example`s: the one tokenisation every stage shares.
- `datagen`: PhoneBook and random-token corpora (`memcli data`).
- `table`: a table of facts (.csv, .tsv, .jsonl) made into a corpus from query and target templates.
- `scoring`: per-token statistics from blocks of logits rows: the native kernel and its numpy reference.
- `batching`: the one batch planner every backend and training use.
- `verdicts`: exact, certified, at risk per entry, their running totals, the teacher-forced pass over a scorer.
- `quants`: the file types llama.cpp's quantiser makes, by llama.cpp's names, and their checks.
- `gguf_reader`: the GGUF file format alone: header, metadata, tensor table.
- `models`: `--model NAME|PATH` -> the model's files, tokenizer and weights; the cache; the family table.
"""
