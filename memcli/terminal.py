"""What every command prints through: the two consoles and the one way bad input ends."""

from __future__ import annotations

import functools

import typer
from rich.console import Console
from rich.markup import escape

from .errors import UserError

console = Console(stderr=True)  # progress, notes and errors
out_console = Console()  # results a user may pipe


def user_errors(fn):
    """Bad input ends in one clear line on stderr and exit code 2."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            console.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2)
    return wrapper
