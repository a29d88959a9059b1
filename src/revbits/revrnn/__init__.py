"""Reversible RNNs with exact forgetting: RevGRU and RevLSTM over an InfoBuffer."""

from .cells import FORGET_BITS
from .layers import RevGRU, RevLSTM, StateRangeError
from .switch import CELLS, RNN_MEMORY_MODES, make_rnn, run_readout

__all__ = [
    "CELLS",
    "FORGET_BITS",
    "RNN_MEMORY_MODES",
    "RevGRU",
    "RevLSTM",
    "StateRangeError",
    "make_rnn",
    "run_readout",
]
