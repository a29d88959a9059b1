"""Reversible RNNs with exact forgetting: RevGRU and RevLSTM over an InfoBuffer."""

from .cells import FORGET_BITS
from .layers import RevGRU, RevLSTM, StateRangeError

__all__ = ["FORGET_BITS", "RevGRU", "RevLSTM", "StateRangeError"]
