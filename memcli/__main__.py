"""The `memcli` command (console script and `python -m memcli`)."""

import sys

from .cli import app


def main() -> None:
    """`--locality` takes an optional TEXT, which typer cannot express: given last, or followed by another option,
    it is rewritten to `--locality=` (the default reference) before parsing."""
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--locality" and (i + 1 == len(args) or args[i + 1].startswith("-")):
            args[i] = "--locality="
    app(args=args, prog_name="memcli")


if __name__ == "__main__":
    main()
