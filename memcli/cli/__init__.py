"""The command line: parse, call, print. The work lives in the layers below.

- `app`: the `memcli` app (typer): the small commands, every command registered in order, the console script.
- `train`: `memcli train` and `memcli sweep`, their options (defaults from TrainConfig).
- `export`: `memcli export` and `memcli export-base`.
- `verify`: `memcli verify`, its options (defaults from VerifyOptions).
- `law`: `memcli fit` and `memcli plan`.
- `bench`: the commands of `memcli bench`.
- `terminal`: consoles, progress bars, result tables, the exit codes of bad input, Ctrl-C and SIGTERM.
- `doctor`: `memcli doctor`: what this installation and machine are, for bug reports.
"""
