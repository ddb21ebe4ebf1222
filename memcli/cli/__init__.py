"""The command line: parse, call, print. The work lives in the layers below.

- `app`: every command of `memcli` (typer) and the console script `main`.
- `bench`: the commands of `memcli bench`.
- `terminal`: consoles, progress bars, result tables, the exit codes of bad input, Ctrl-C and SIGTERM.
- `doctor`: `memcli doctor`: what this installation and machine are, for bug reports.
"""
