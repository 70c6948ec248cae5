"""Stop a run cleanly on Ctrl-C or SIGTERM: finish the current step, checkpoint, exit.

A signal arriving in the middle of an optimiser step would leave the weights half updated, so the
first Ctrl-C (or the SIGTERM a cluster scheduler sends before killing a job) only sets a flag that
the training loop checks after each step. A second Ctrl-C stops at once (the last checkpoint stays).
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from types import FrameType, TracebackType
from typing import Any


@contextlib.contextmanager
def signals_interrupt() -> Iterator[None]:
    """Inside, SIGINT, SIGTERM and SIGHUP raise ``KeyboardInterrupt`` (handlers restored on exit):
    a sweep driver's way to stop its points cleanly. SIGINT too, because a shell starts background
    jobs with SIGINT ignored, and such a sweep must still stop when it gets one."""
    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    # SIGHUP ignored (nohup) stays ignored: a closed terminal must not stop such a sweep
    hangup = () if signal.getsignal(signal.SIGHUP) == signal.SIG_IGN else (signal.SIGHUP,)
    previous = {sig: signal.signal(sig, interrupt) for sig in (signal.SIGINT, signal.SIGTERM, *hangup)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class StopRequest:
    """``with StopRequest() as stop:`` ... ``if stop.requested(): ...``; handlers restored on exit."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self._requested: str | None = None
        self._previous: dict[int, Any] = {}

    def requested(self) -> bool:
        return self._requested is not None

    @property
    def reason(self) -> str:
        return self._requested or ""

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a second Ctrl-C means "at once": a scheduler's SIGTERM reaches a sweep's points and
        # its driver alike, and the driver's SIGINT that follows must not abort the checkpoint
        if self._requested == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        if self._requested is None:
            self._requested = signal.Signals(signum).name

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # signals reach the main thread only
            for signum in self.SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 traceback: TracebackType | None) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()
