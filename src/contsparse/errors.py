"""Errors caused by the user's input, and the clean stop of an interrupted run.

The CLI prints a :class:`UserError` as one line and exits with status 2; a
:class:`RunInterrupted` as the way to resume, with status 130 (the shell's code for Ctrl-C).
"""


class UserError(Exception):
    """A mistake the user can fix (bad value, missing file, unknown name); the message says how."""


def some_of(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` of many names for a one-line message, and how many more there are."""
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


class RunInterrupted(Exception):
    """The run stopped on Ctrl-C or SIGTERM after saving a checkpoint; the message says how to resume."""


def raised_by_torch_compile(err: BaseException) -> bool:
    """Whether ``err`` comes from torch.compile's tracer or compiler (e.g. no C++ compiler)."""
    return type(err).__module__.startswith(("torch._dynamo", "torch._inductor"))
