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
is spilled onto a stack of earlier words and W starts again from zero. Where the spill decision is
read matters for speed: on the CPU reading a flag costs nothing, so the host decides and only an
actual spill copies a word. On an accelerator the decision stays on the device: the word is always
written to the next free level and the depth only advances when a spill is needed, so no step
waits for the host, and the host checks the depth once every ``check_every`` pushes to grow the
stack ahead of need.

With base 2**F the push and pop are shifts and masks; a division by n is done once per update
(floor(W / n)), and W mod n is W - n floor(W / n) (one addcmul).

On the CPU the host also keeps an upper bound on the word, so most multiplications need not look
at it at all: a multiplication with n >= 2**(F - k) (k = ``max_bits_per_step``) gives
floor((W 2**F + r) / n) < (W + 1) 2**k, so the bound B becomes (B + 1) 2**k, and only when B
passes the spill threshold is the word's maximum read (which resets B). The spill decisions are
those of a check at every push, since B >= W.
"""

from __future__ import annotations

import torch

INT64_MAX = 2**63 - 1


def _where(mask: torch.Tensor | None, value: torch.Tensor, otherwise: torch.Tensor) -> torch.Tensor:
    return value if mask is None else torch.where(mask, value, otherwise)


def _push_limit(base: int | torch.Tensor) -> int | torch.Tensor:
    """The largest W for which W * base + (base - 1) stays below 2**63."""
    return (INT64_MAX - (base - 1)) // base


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
            n >= 2**(F - k)); it bounds how many spills can happen between two host checks, and how
            fast the host's bound on W grows. ``multiply`` relies on n >= 2**(F - k).
        check_every: pushes between host checks of the stack depth (device decisions only).
        track_information: keep ``lost_bits``, the sum of F - log2(n) over active
            multiplications (the information the gates destroyed; costs a few ops per call).
        host_decides: read each spill decision on the host (default: on the CPU only).
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
        host_decides: bool | None = None,
    ) -> None:
        if not 1 <= fraction_bits <= 30:
            raise ValueError(f"fraction_bits must be from 1 to 30, got {fraction_bits}")
        self.shape = torch.Size(shape)
        self.device = torch.device(device)
        self.fraction_bits = fraction_bits
        self.max_bits_per_step = max_bits_per_step or fraction_bits
        self.check_every = check_every
        self.host_decides = self.device.type == "cpu" if host_decides is None else host_decides
        self.word = torch.zeros(self.shape, dtype=torch.int64, device=self.device)
        self._spilled: list = []  # per recorded push: did it spill (a bool, or a device bool)
        # host decisions: the spilled words, newest last; device decisions: a stack of levels
        self._stack: list[torch.Tensor] = []
        self.levels = torch.zeros((0, *self.shape), dtype=torch.int64, device=self.device)
        self._depth = torch.zeros((), dtype=torch.int64, device=self.device)
        self._pushes_since_check = self.check_every  # check before the first push
        self.track_information = track_information
        self._low_bits = (1 << fraction_bits) - 1  # h mod 2**F is h & this
        self._scale_limit = _push_limit(1 << fraction_bits)
        self.lost_bits = torch.zeros((), dtype=torch.float64, device=self.device)
        self._bound: int | None = 0  # host decisions: an upper bound on every element of W (None: unknown)

    @property
    def depth(self) -> int | torch.Tensor:
        """Spilled words below the live one (an int, or a device tensor for device decisions)."""
        return len(self._stack) if self.host_decides else self._depth

    # -- the word stack ----------------------------------------------------------------------

    def _ensure_capacity(self) -> None:
        """Grow the stack so the spills possible before the next check fit (one host sync)."""
        self._pushes_since_check = 0
        limit_bits = 63 - self.fraction_bits
        spare = -(-self.check_every * self.max_bits_per_step // limit_bits) + 1
        needed = int(self._depth) + spare
        if needed > self.levels.shape[0]:
            grown = torch.zeros(
                (max(needed, 2 * self.levels.shape[0]), *self.shape), dtype=torch.int64, device=self.device
            )
            grown[: self.levels.shape[0]] = self.levels
            self.levels = grown

    def _spill_if_needed(self, limit: int | torch.Tensor, active: torch.Tensor | None) -> None:
        """Spill the word if a push onto an active element above ``limit`` could overflow."""
        full = self.word > limit
        if active is not None:
            full &= active
        if self.host_decides:
            spill = bool(full.any())
            if spill:
                self._stack.append(self.word)
                self.word = torch.zeros_like(self.word)
            self._spilled.append(spill)
            return
        if self._pushes_since_check >= self.check_every:
            self._ensure_capacity()
        self._pushes_since_check += 1
        spill = full.any()
        self.levels.index_copy_(0, self._depth.view(1), self.word.unsqueeze(0))
        self._depth += spill.to(torch.int64)
        self.word = self.word.masked_fill(spill, 0)
        self._spilled.append(spill)

    def _spill_if_bound_passes(self, mask: torch.Tensor | None) -> None:
        """Host decisions for a multiplication: spill (as :meth:`_spill_if_needed` would) when an active
        element of W is above the threshold, reading W only when the host's bound on it passes the
        threshold; then grow the bound by the multiplication to come."""
        limit = self._scale_limit
        spill = False
        if self._bound is None or self._bound > limit:
            highest = int(self.word.max()) if self.word.numel() else 0
            if highest > limit:
                spill = mask is None or bool(((self.word > limit) & mask).any())
            self._bound = 0 if spill else highest
        if spill:
            self._stack.append(self.word)
            self.word = torch.zeros_like(self.word)
        self._spilled.append(spill)
        self._bound = (self._bound + 1) << self.max_bits_per_step

    def _unspill(self) -> None:
        if not self._spilled:
            raise RuntimeError("InfoBuffer: more pops than pushes")
        spill = self._spilled.pop()
        if self.host_decides:
            if spill:
                self.word = self._stack.pop()
            return
        self._depth -= spill.to(torch.int64)
        below = self.levels.index_select(0, self._depth.view(1))[0]
        self.word = torch.where(spill, below, self.word)

    # -- push and pop ------------------------------------------------------------------------

    def _mask(self, active: torch.Tensor | None) -> torch.Tensor | None:
        if active is None:
            return None
        return active.to(torch.bool).reshape(active.shape + (1,) * (len(self.shape) - active.dim()))

    def push(self, remainder: torch.Tensor, base: torch.Tensor | int, active: torch.Tensor | None = None) -> None:
        """W <- W * base + remainder for active elements (0 <= remainder < base, base >= 1)."""
        mask = self._mask(active)
        base = torch.as_tensor(base, dtype=torch.int64, device=self.device)
        self._spill_if_needed(_push_limit(base), mask)
        self.word = _where(mask, self.word * base + remainder.to(torch.int64), self.word)
        self._bound = None

    def pop(self, base: torch.Tensor | int, active: torch.Tensor | None = None) -> torch.Tensor:
        """W mod base (for every element), then W <- floor(W / base) for active ones."""
        mask = self._mask(active)
        base = torch.as_tensor(base, dtype=torch.int64, device=self.device)
        quotient = torch.div(self.word, base, rounding_mode="floor")
        remainder = self.word - quotient * base
        self.word = _where(mask, quotient, self.word)
        self._unspill()
        self._bound = None
        return remainder

    # -- exact multiplication by n / 2**F ----------------------------------------------------

    def multiply(self, h: torch.Tensor, n: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """h * n / 2**F for int64 h and n in [1, 2**F], the lost low bits kept in the buffer."""
        mask = self._mask(active)
        if self.host_decides:
            self._spill_if_bound_passes(mask)
        else:
            self._spill_if_needed(self._scale_limit, mask)
        pushed = torch.add(h & self._low_bits, self.word, alpha=1 << self.fraction_bits)  # W 2**F + (h mod 2**F)
        quotient = torch.div(pushed, n, rounding_mode="floor")
        self.word = _where(mask, quotient, self.word)
        if self.track_information:
            lost = self.fraction_bits - torch.log2(n.double())
            self.lost_bits += (lost if mask is None else lost * mask).sum()
        kept = torch.addcmul(pushed, quotient, n, value=-1)  # W mod n
        return _where(mask, torch.addcmul(kept, h >> self.fraction_bits, n), h)  # floor(h / 2**F) n + (W mod n)

    def divide(self, h: torch.Tensor, n: torch.Tensor, active: torch.Tensor | None = None) -> torch.Tensor:
        """The inverse of :meth:`multiply`: the h it was given, with the buffer as it was."""
        mask = self._mask(active)
        quotient = torch.div(h, n, rounding_mode="floor")
        pushed = torch.addcmul(torch.addcmul(h, quotient, n, value=-1), self.word, n)  # W n + (h mod n)
        self.word = _where(mask, pushed >> self.fraction_bits, self.word)
        self._unspill()
        self._bound = None
        # floor(h / n) 2**F + (W mod 2**F)
        return _where(mask, torch.add(pushed & self._low_bits, quotient, alpha=1 << self.fraction_bits), h)

    # -- the same arithmetic in a native operator ---------------------------------------------

    def word_to_multiply(self, active: torch.Tensor | None = None) -> torch.Tensor:
        """Host decisions: spill (or not) as :meth:`multiply` does before it multiplies, and return the word
        a native operator multiplies into; it hands the new word to :meth:`multiplied`."""
        self._spill_if_bound_passes(self._mask(active))
        return self.word

    def second_multiply_unchecked(self) -> bool:
        """Host decisions, after :meth:`word_to_multiply`: True, with the second multiplication's record made,
        where the host bound shows that one cannot spill either (so one native call may do both)."""
        if self._bound is None or self._bound > self._scale_limit:
            return False
        self._spill_if_bound_passes(None)  # reads no word at this bound: records "no spill", grows the bound
        return True

    def last_two_unspilled(self) -> bool:
        """Whether neither of the last two multiplications spilled (so one native call may divide twice)."""
        return len(self._spilled) >= 2 and self._spilled[-1] is False and self._spilled[-2] is False

    def multiplied(self, word: torch.Tensor) -> None:
        """The word after a native multiplication (its host bound already grown)."""
        self.word = word

    def divided(self, word: torch.Tensor, times: int = 1) -> None:
        """The word after ``times`` native divisions: the one below comes back if the last multiplication
        they undid spilled (with ``times`` = 2 the caller checked :meth:`last_two_unspilled`)."""
        self.word = word
        for _ in range(times):
            self._unspill()
        self._bound = None

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
