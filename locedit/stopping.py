"""Stopping a long serial run cleanly on a signal: the first SIGTERM / SIGINT asks for a stop at the run's next
clean boundary (a study: after the running fact's units; a tune: after the running edit; a layer sweep: after the
running fact's layers), a second one stops at once (KeyboardInterrupt). Finished work is journalled either way.

A ``nohup cmd &`` job inherits SIGINT ignored, so ``kill -TERM PID`` is the way to stop a background run; the
handlers here are installed even where a signal was ignored and the previous ones restored on exit.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

__all__ = ["RunStopped", "StopRequest", "stop_on_signal"]

log = logging.getLogger("locedit.stopping")


class StopRequest:
    """Whether a stop was asked for (the first signal's number, or None): see :func:`stop_on_signal`."""

    def __init__(self) -> None:
        self.signal: int | None = None

    def raise_if_requested(self, where: str) -> None:
        """Raise :class:`RunStopped` if a stop was asked for (call it at a clean boundary; ``where`` names it)."""
        if self.signal is not None:
            raise RunStopped(self.signal, where)


class RunStopped(Exception):
    """A run stopped at a clean boundary on request (everything finished is journalled; rerun to resume)."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(f"stopped on {signal.Signals(signum).name} {where}; rerun the same command to resume")
        self.signal = signum
        self.where = where


@contextmanager
def stop_on_signal(boundary: str = "the running fact's units",
                   signals: Sequence[int] = (signal.SIGTERM, signal.SIGINT)) -> Iterator[StopRequest]:
    """Within the block, the first of ``signals`` only records a stop request (the run checks it at its boundaries,
    ``boundary`` is what it finishes first, for the log line); a second one raises KeyboardInterrupt at once. Off
    the main thread (where Python cannot install handlers) the request is never set."""
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():
        yield request
        return

    def handle(signum, frame) -> None:
        if request.signal is not None:
            raise KeyboardInterrupt
        request.signal = signum
        log.warning("%s: stopping after %s (send it again to stop at once)", signal.Signals(signum).name, boundary)

    previous = {s: signal.signal(s, handle) for s in signals}
    try:
        yield request
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
