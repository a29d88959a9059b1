"""Test-only switches of a PETRA run, read from the environment, which the stage processes inherit from
the launcher; :class:`~revbits.petra.config.PetraConfig` carries production options only.

    REVBITS_PETRA_FAIL=j@t[:mode]   stage j fails at its step t: raises :class:`InjectedFailure` ("raise",
                                    the default), exits at once with code 17 ("exit"), or hangs ("stall")
    REVBITS_PETRA_RECORD=1          every stage's StageRecord also keeps the gradients of every update, its
                                    forward inputs and the inputs its backward used (tests, debugging)

A value that does not parse raises ValueError naming the variable.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

FAIL_ENV = "REVBITS_PETRA_FAIL"
RECORD_ENV = "REVBITS_PETRA_RECORD"
FAIL_MODES = ("raise", "exit", "stall")
EXIT_CODE = 17


class InjectedFailure(RuntimeError):
    """Raised by a stage at the step ``REVBITS_PETRA_FAIL`` names (mode "raise")."""


@dataclass(frozen=True)
class PlannedFailure:
    """Stage ``stage`` fails at its step ``step`` in the way ``mode`` names."""

    stage: int
    step: int
    mode: str = "raise"

    def strike(self, stage: int, step: int) -> None:
        """Fail now if this is the planned (stage, step); otherwise do nothing."""
        if (stage, step) != (self.stage, self.step):
            return
        if self.mode == "exit":
            os._exit(EXIT_CODE)
        if self.mode == "stall":
            threading.Event().wait()  # never set: hang until killed
        raise InjectedFailure(f"stage {stage}: injected failure at step {step} ({FAIL_ENV})")


def planned_failure() -> PlannedFailure | None:
    """The failure ``REVBITS_PETRA_FAIL`` plans, or None when it is unset or empty."""
    spec = os.environ.get(FAIL_ENV, "").strip()
    if not spec:
        return None
    where, _, mode = spec.partition(":")
    stage, _, step = where.partition("@")
    if not (stage.isdigit() and step.isdigit() and (mode or "raise") in FAIL_MODES):
        raise ValueError(f"{FAIL_ENV} must be STAGE@STEP[:MODE], MODE one of {', '.join(FAIL_MODES)}; got {spec!r}")
    return PlannedFailure(int(stage), int(step), mode or "raise")


def recording() -> bool:
    """Whether ``REVBITS_PETRA_RECORD`` asks the stages to keep full records ("1"; unset, "" or "0": no)."""
    value = os.environ.get(RECORD_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise ValueError(f"{RECORD_ENV} must be 0 or 1, got {value!r}")
    return value == "1"
