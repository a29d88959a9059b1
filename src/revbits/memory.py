"""Deprecated: moved to :mod:`revbits.measure`; this alias goes in 0.3.

The module was renamed because ``memory`` already names the memory mode (``stack(memory=...)``,
``--memory``); measuring the bytes of a training step is :mod:`revbits.measure`.
"""

from .measure import CATEGORIES, LiveBytes, StepMemory, measure_training_step, tracking

__all__ = ["CATEGORIES", "LiveBytes", "StepMemory", "measure_training_step", "tracking"]
