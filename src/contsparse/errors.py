"""Errors caused by the user's input: the CLI prints them as one line and exits with status 2."""


class UserError(Exception):
    """A mistake the user can fix (bad value, missing file, unknown name); the message says how."""
