"""When each stage does what: PETRA's discrete time steps (Algorithm 1, worker perspective).

Stages are numbered j = 0..J-1 here (the paper numbers them 1..J). A message sent at step t reaches
the neighbour at step t + 1, and the last stage does the forward and the backward of a micro-batch in
the same step. So micro-batch m is

    forwarded at stage j at step  m + j,
    back-propagated at stage j at step  m + j + delay(j),  delay(j) = 2 (J - 1 - j),

which is the paper's delay 2(J - j) written 0-based. Stage j does no backward during its first delay(j)
steps (warm-up), and after the last forward it keeps stepping with backwards only (drain).
"""

from __future__ import annotations


def delay(j: int, J: int) -> int:
    """delay(j) = 2 (J - 1 - j): steps between a micro-batch's forward and its backward at stage j."""
    if not 0 <= j < J:
        raise ValueError(f"stage {j} is not in 0..{J - 1}")
    return 2 * (J - 1 - j)


def steps(j: int, J: int, M: int) -> range:
    """The steps t at which stage j has work: from its first forward (t = j) to its last backward
    (t = M - 1 + j + delay(j)), for M micro-batches."""
    return range(j, M + j + delay(j, J))


def forward_micro_batch(t: int, j: int, M: int) -> int | None:
    """m = t - j, the micro-batch stage j forwards at step t (None if there is none)."""
    m = t - j
    return m if 0 <= m < M else None


def backward_micro_batch(t: int, j: int, J: int, M: int) -> int | None:
    """m = t - j - delay(j), the micro-batch stage j back-propagates at step t (None if there is none)."""
    m = t - j - delay(j, J)
    return m if 0 <= m < M else None
