"""Stopping cleanly on SIGINT (Ctrl-C) and SIGTERM: a flag the training loops poll between steps.

While a :class:`StopFlag` is active, SIGINT and SIGTERM only record which signal came; the loop
finishes its step, saves, and raises :class:`Interrupted`, which the command line turns into one line
and the shell's exit code for that signal (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
    """A run stopped by a signal after saving; ``message`` says where it was saved and how to resume."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopFlag:
    """``with StopFlag() as stop:`` ... ``if stop.signum: save and stop``. Restores the previous
    handlers on exit. Outside the main thread (where handlers cannot be set) it never fires."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""
