"""An exact, unbounded integer per unit, for the bits that an update destroys.

Multiplying a fixed-point state by a gate z = n / 2**F (n in [1, 2**F]) loses up to F - log2 n
bits. MacKay et al. (2018, after Maclaurin et al. 2015) keep them in one unbounded integer W per
unit and make the multiplication exactly invertible:

    forward   W <- W * 2**F + (h mod 2**F);  h <- floor(h / 2**F) * n + (W mod n);  W <- floor(W / n)
    reverse   W <- W * n + (h mod n);        h <- floor(h / n) * 2**F + (W mod 2**F); W <- floor(W / 2**F)

After the forward, h' mod n = W1 mod n and floor(h' / n) = floor(h / 2**F), with
W1 = 2**F W + (h mod 2**F), so the reverse rebuilds W1 and then h and W exactly. mod and floor
are floor-consistent for negative h.

W lives in an int64 word per unit. Before a push that could overflow it, the whole word tensor
is spilled onto a stack of earlier words and W starts again from zero. The decision is made on
the device: the word is always written to the next free level and the depth only advances when a
spill is needed, so no step waits for the host. The host checks the depth once every
``check_every`` pushes, to grow the stack ahead of need.
"""

from __future__ import annotations

import torch

INT64_MAX = 2**63 - 1


class InfoBuffer:
    """One unbounded non-negative integer per element of ``shape`` (e.g. [batch, units]).

    - ``push(remainder, base)``: W <- W * base + remainder, with 0 <= remainder < base.
    - ``pop(base)``: returns W mod base, then W <- floor(W / base).
    - ``multiply(h, n)`` / ``divide(h, n)``: h -> h * n / 2**F, exactly invertible (above).

    Every call takes ``active``, a bool mask broadcastable to ``shape`` (rows of finished
    sequences): inactive elements are left as they are. Pushes are undone by pops in reverse
    order, and each ``divide`` undoes the matching ``multiply``, in reverse order of the calls.

    Args:
        shape: the shape of one word tensor.
        fraction_bits: F, the bits of the gate numerator (gates are n / 2**F).
        max_bits_per_step: the most a call can add to W (F for ``multiply`` with n >= 1; k when
            n >= 2**(F - k)); it bounds how many spills can happen between two host checks.
        check_every: pushes between host checks of the stack depth.
        track_information: keep ``lost_bits``, the sum of F - log2(n) over active
            multiplications (the information the gates destroyed; costs a few ops per call).
    """

    def __init__(
        self,
        shape: tuple[int, ...] | torch.Size,
        device: torch.device | str = "cpu",
        *,
        fraction_bits: int = 10,
        max_bits_per_step: int | None = None,
        check_every: int = 16,
        track_information: bool = False,
    ) -> None:
        if not 1 <= fraction_bits <= 30:
            raise ValueError(f"fraction_bits must be from 1 to 30, got {fraction_bits}")
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self.fraction_bits = fraction_bits
        self.max_bits_per_step = max_bits_per_step or fraction_bits
        self.check_every = check_every
        self.word = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self.levels = torch.zeros((0, *self.shape), dtype=torch.int64, device=self.device)
        self.depth = torch.zeros((), dtype=torch.int64, device=self.device)
        self._spilled: list[torch.Tensor] = []  # per recorded push: did it spill (device bool)
        self._pushes_since_check = self.check_every  # check before the first push
        self.track_information = track_information
        # constants of every call, made once: the base 2**F and the mask of "all active"
        self._scale = torch.tensor(1 << fraction_bits, dtype=torch.int64, device=self.device)
        self._all_active = torch.ones((), dtype=torch.bool, device=self.device)
        self.lost_bits = torch.zeros((), dtype=torch.float64, device=self.device)

    # -- the word stack ----------------------------------------------------------------------

    def _ensure_capacity(self) -> None:
        """Grow the stack so the spills possible before the next check fit (one host sync)."""
        self._pushes_since_check = 0
        limit_bits = 63 - self.fraction_bits
        spare = -(-self.check_every * self.max_bits_per_step // limit_bits) + 1
        needed = int(self.depth) + spare
        if needed > self.levels.shape[0]:
            grown = torch.zeros(
                (max(needed, 2 * self.levels.shape[0]), *self.shape), dtype=torch.int64, device=self.device
            )
            grown[: self.levels.shape[0]] = self.levels
            self.levels = grown

    def _spill_if_needed(self, base: torch.Tensor, active: torch.Tensor) -> None:
        if self._pushes_since_check >= self.check_every:
            self._ensure_capacity()
        self._pushes_since_check += 1
        # W * base + (base - 1) must stay below 2**63
        full = (self.word > (INT64_MAX - (base - 1)) // base) & active
        spill = full.any()
        self.levels.index_copy_(0, self.depth.view(1), self.word.unsqueeze(0))
        self.depth += spill.to(torch.int64)
        self.word = torch.where(spill, torch.zeros_like(self.word), self.word)
        self._spilled.append(spill)

    def _unspill(self) -> None:
        if not self._spilled:
            raise RuntimeError("InfoBuffer: more pops than pushes")
        spill = self._spilled.pop()
        self.depth -= spill.to(torch.int64)
        below = self.levels.index_select(0, self.depth.view(1))[0]
        self.word = torch.where(spill, below, self.word)

    # -- push and pop ------------------------------------------------------------------------

    def _mask(self, active: torch.Tensor | None) -> torch.Tensor:
        if active is None:
            return self._all_active
        return active.to(torch.bool).reshape(active.shape + (1,) * (len(self.shape) - active.dim()))

    def _push(self, remainder: torch.Tensor, base: torch.Tensor, active: torch.Tensor) -> None:
        self.word = torch.where(active, self.word * base + remainder, self.word)

    def _pop(self, base: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        remainder = torch.remainder(self.word, base)
        self.word = torch.where(active, torch.div(self.word, base, rounding_mode="floor"), self.word)
        return remainder

    def push(self, remainder: torch.Tensor, base: torch.Tensor | int, active: torch.Tensor | None = None) -> None:
        """W <- W * base + remainder for active elements (0 <= remainder < base, base >= 1)."""
        mask = self._mask(active)
        base = torch.as_tensor(base, dtype=torch.int64, device=self.device)
        self._spill_if_needed(base, mask)
        self._push(remainder.to(torch.int64), base, mask)

    def pop(self, base: torch.Tensor | int, active: torch.Tensor | None = None) -> torch.Tensor:
        """W mod base (for every element), then W <- floor(W / base) for active ones."""
        mask = self._mask(active)
        remainder = self._pop(torch.as_tensor(base, dtype=torch.int64, device=self.device), mask)
        self._unspill()
        return remainder

    # -- exact multiplication by n / 2**F ----------------------------------------------------

    def multiply(self, h: torch.Tensor, n: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """h * n / 2**F for int64 h and n in [1, 2**F], the lost low bits kept in the buffer."""
        mask = self._mask(active)
        scale = 1 << self.fraction_bits
        self._spill_if_needed(self._scale, mask)
        self._push(torch.remainder(h, scale), self._scale, mask)
        product = torch.div(h, scale, rounding_mode="floor") * n + self._pop(n, mask)
        if self.track_information:
            self.lost_bits += ((self.fraction_bits - torch.log2(n.double())) * mask).sum()
        return torch.where(mask, product, h)

    def divide(self, h: torch.Tensor, n: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of :meth:`multiply`: the h it was given, with the buffer as it was."""
        mask = self._mask(active)
        scale = 1 << self.fraction_bits
        self._push(torch.remainder(h, n), n, mask)
        restored = torch.div(h, n, rounding_mode="floor") * scale + self._pop(self._scale, mask)
        self._unspill()
        return torch.where(mask, restored, h)

    # -- accounting --------------------------------------------------------------------------

    @property
    def empty(self) -> bool:
        """True when W is zero everywhere and nothing is spilled (one host sync)."""
        return not self._spilled and int(self.depth) == 0 and not bool(self.word.any())

    def stored_bits(self) -> int:
        """Bits held: the live word and every spilled word, 64 bits per unit each, plus one
        flag bit per recorded push (one host sync)."""
        words = int(self.depth) + 1
        return words * self.shape.numel() * 64 + len(self._spilled)
