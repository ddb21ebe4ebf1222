"""`memcli verify` (docs/method.md §2): the orchestration (run.py: `VerifyOptions`, `verify`), what --lora names
and its base (sources.py), input checks (checks.py), the llama.cpp and torch backends (llama.py, torch.py),
verdicts (verdicts.py), greedy generation against them (generation.py) and the report folder (report.py)."""
