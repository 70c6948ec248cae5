"""Fault injection for the crash tests: ``CONTSPARSE_FAULT=SITE`` SIGKILLs the process at ``SITE``.

Sites:

* ``step:E:S``  after ``S`` steps (from 1) of the run's ``E``-th epoch (from 0, counting every phase),
* ``epoch:N``   right after the checkpoint of the run's ``N``-th finished epoch (from 1),
* ``rename:N``  inside this process's ``N``-th checkpoint write (from 1), between moving the latest checkpoint
  aside and moving the new one in: the worst moment for a crash.

Unset (always, outside tests) every call is one dictionary lookup.
``CONTSPARSE_FAULT_SIGNAL=INT`` (or ``TERM``) sends that signal instead of SIGKILL.
"""

from __future__ import annotations

import os
import signal

ENV = "CONTSPARSE_FAULT"
_counters: dict[str, int] = {}


def inject(site: str) -> None:
    """Signal this process if ``CONTSPARSE_FAULT`` names ``site`` (SIGKILL, or the signal named by
    ``CONTSPARSE_FAULT_SIGNAL``, e.g. ``INT`` to test Ctrl-C)."""
    target = os.environ.get(ENV)
    if target and target == site:
        name = os.environ.get(ENV + "_SIGNAL", "KILL")
        os.kill(os.getpid(), getattr(signal, "SIG" + name))


def count(kind: str) -> int:
    """Next value of a per-process counter (checkpoint writes, ...), for :func:`inject` sites."""
    _counters[kind] = _counters.get(kind, 0) + 1
    return _counters[kind]
