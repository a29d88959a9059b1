"""The one switch for recurrent models: an RNN stack under a memory mode, and a per-step readout over it.

``make_rnn(cell, memory, ...)`` is to RNNs what :func:`revbits.stack` is to block stacks: the model
passes ``memory`` through and never branches on it.

- ``"standard"``: torch's ``nn.GRU`` / ``nn.LSTM`` under plain autograd, every hidden state stored;
- ``"reversible"``: :class:`~revbits.revrnn.RevGRU` / :class:`~revbits.revrnn.RevLSTM`, which store only
  the final state, the information buffers and the inputs.
"""

from __future__ import annotations

import torch
from torch import nn

from .layers import RevGRU, RevLSTM, _RevRNNBase

RNN_MEMORY_MODES = ("standard", "reversible")
CELLS = ("gru", "lstm")


def make_rnn(cell: str, memory: str, size: int, layers: int, forget_bits: int | None) -> nn.Module:
    """A batch-first recurrent stack of ``layers`` layers of width ``size`` (``forget_bits``: the most bits
    a reversible cell loses per unit and step, None for no limit; unused by torch's cells)."""
    if cell not in CELLS:
        raise ValueError(f"cell must be one of {', '.join(CELLS)}, got {cell!r}")
    if memory not in RNN_MEMORY_MODES:
        raise ValueError(f"an RNN's memory mode is one of {', '.join(RNN_MEMORY_MODES)}, got {memory!r}")
    if memory == "reversible":
        kind = RevGRU if cell == "gru" else RevLSTM
        return kind(size, size, num_layers=layers, forget_bits=forget_bits, batch_first=True)
    kind = nn.GRU if cell == "gru" else nn.LSTM
    return kind(size, size, num_layers=layers, batch_first=True)


def run_readout(
    rnn: nn.Module,
    x: torch.Tensor,
    state: torch.Tensor | tuple[torch.Tensor, ...] | None,
    readout: nn.Module,
    readout_inputs: tuple[torch.Tensor, ...],
    lengths: torch.Tensor,
) -> torch.Tensor:
    """r_t = readout(h_t, t, *readout_inputs) for every step t of the batch-first ``rnn`` from ``state``,
    stacked along time ([B, T, ...]).

    A reversible RNN runs the readout inside its reversible loop (finished sequences, past ``lengths``,
    stop), so nothing downstream keeps the T hidden states; any other RNN runs the whole sequence, then
    the readout on each step's output.
    """
    if isinstance(rnn, _RevRNNBase):
        return rnn(x, state, lengths=lengths, readout=readout, readout_inputs=readout_inputs)[0]
    out, _ = rnn(x, state)
    return torch.stack([readout(out[:, t], t, *readout_inputs) for t in range(out.shape[1])], 1)
