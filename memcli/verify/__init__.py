"""`memcli verify` (docs/method.md §2): the orchestration (run.py: `VerifyOptions`, `verify`), what --lora names
and its base (sources.py), input checks (checks.py), the llama.cpp and torch backends (llama.py, torch.py),
greedy generation against them (generation.py) and the report folder (report.py). What a pass's statistics mean
(exact, certified, at risk) is memcli/verdicts.py, which training's clean pass shares; the batches are planned
by memcli/batching.py. Both are torch-free, and so is the llama.cpp path (llama.py, checks.py)."""
