"""Errors a user can cause. The CLI prints their message on one line and exits with code 2."""


class UserError(Exception):
    """Bad input: a file, a field, a setting or a model the user named. The message says which."""
