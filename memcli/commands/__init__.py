"""What each command does, without the terminal: `memcli.cli` parses, calls these and prints.

- `verify`: `memcli verify`: certified recall from one teacher-forced pass, and its report.
- `law`: the Parametric Memory Law: `memcli fit` and `memcli plan`.
- `ask`: `memcli ask`: the greedy completion of one prompt in llama.cpp, to check a fact by eye.
- `serve_check`: `memcli serve-check`: a running server asked every key, its answers against the verdicts.
- `bench`: the benchmarks and cross-checks behind `memcli bench ...`.
"""
