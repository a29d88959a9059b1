"""Mesa: every activation autograd saves for backward is kept as 8-bit codes.

Built on ``torch.autograd.graph.saved_tensors_hooks``: the pack hook turns a floating
activation into uint8 codes with an fp32 (low, step) pair per group, the unpack hook turns the
codes back into a tensor of the saved dtype when backward needs it. The forward pass is
unchanged, bit for bit; only the gradients see the rounding.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, fields
from typing import Any

import torch

from .policy import OpTracker, exact_reason
from .quantizer import dequantize, group_range, layout_for, quantize_codes
from .report import MesaReport

RANGE_SOURCES = ("batch", "ema")


class NonFiniteActivationError(FloatingPointError):
    """A tensor saved for backward held NaN or inf, which 8-bit codes cannot represent."""


@dataclass
class MesaConfig:
    """How activations are compressed.

    Args:
        channel_group: consecutive channels sharing one range outside attention. 1 (per
            channel) costs no more than larger groups, as the ranges come from one reduction
            per channel either way, and keeps an outlier channel from coarsening its neighbours;
            Mesa's code used 64 (DeiT) and 32 (Swin).
        ranges: ``"batch"`` takes each group's min and max from the tensor itself;
            ``"ema"`` uses running estimates, low <- m low + (1 - m) min (and the same for
            high), updated before use, as the Mesa paper does. Values outside a running range
            saturate at its ends.
        momentum: m of the running estimates.
        min_numel: tensors with fewer elements are kept exact.
        stochastic: stochastic rounding (unbiased); False rounds to nearest.
        seed: seed of the rounding noise, which has its own generator per device, so the
            model's own random numbers (dropout) are the same as without compression.
        check_finite: raise :class:`NonFiniteActivationError` at the end of the forward pass
            when a compressed tensor held NaN or inf (one host sync per forward pass).
    """

    channel_group: int = 1
    ranges: str = "batch"
    momentum: float = 0.9
    min_numel: int = 4096
    stochastic: bool = True
    seed: int = 0
    check_finite: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.channel_group, int) or self.channel_group < 1:
            raise ValueError(f"channel_group must be a positive integer, got {self.channel_group!r}")
        if self.ranges not in RANGE_SOURCES:
            raise ValueError(f"ranges must be one of {', '.join(RANGE_SOURCES)}, got {self.ranges!r}")
        if not 0.0 <= self.momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum!r}")
        if not isinstance(self.min_numel, int) or self.min_numel < 0:
            raise ValueError(f"min_numel must be a non-negative integer, got {self.min_numel!r}")

    @classmethod
    def option_names(cls) -> frozenset[str]:
        return frozenset(f.name for f in fields(cls))


class PackedActivation:
    """The stored form of one activation: codes of its shape, and broadcastable low and step."""

    __slots__ = ("codes", "low", "step", "dtype", "__weakref__")

    def __init__(self, codes: torch.Tensor, low: torch.Tensor, step: torch.Tensor, dtype: torch.dtype) -> None:
        self.codes, self.low, self.step, self.dtype = codes, low, step, dtype

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.codes, self.low, self.step))

    def unpack(self) -> torch.Tensor:
        return dequantize(self.codes, self.low, self.step, self.dtype)


def _unpack(stored: Any) -> torch.Tensor:
    return stored.unpack() if isinstance(stored, PackedActivation) else stored


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class Compressor:
    """Holds the configuration, the rounding generators, the running ranges and the report.

    Use :meth:`saving` around a forward pass::

        compressor = Compressor(MesaConfig(ranges="ema"))
        with compressor.saving():
            loss = model(x).loss
        loss.backward()
        print(compressor.report.table())
    """

    def __init__(self, config: MesaConfig | None = None) -> None:
        self.config = config or MesaConfig()
        self.report = MesaReport()
        self._generators: dict[str, torch.Generator] = {}
        self._running: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self._nonfinite: list[tuple[str, torch.Tensor]] = []
        self._tracker: OpTracker | None = None
        self._shared: dict[tuple, tuple[weakref.ref, PackedActivation]] = {}
        self._namespace, self._site = "", 0

    # -- the context -------------------------------------------------------------------------

    @contextlib.contextmanager
    def saving(self, namespace: str = "", check: bool = True) -> Iterator[MesaReport]:
        """Compress what autograd saves inside; ``namespace`` keys the running ranges of a
        region that is entered separately (a recomputed block)."""
        outer = (self._tracker, self._shared, self._namespace, self._site)
        self._tracker, self._shared, self._namespace, self._site = OpTracker(), {}, namespace, 0
        completed = False
        try:
            with self._tracker, torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack):
                yield self.report
            completed = True
        finally:
            self._tracker, self._shared, self._namespace, self._site = outer
        if completed and check:
            self.raise_if_nonfinite()

    def raise_if_nonfinite(self) -> None:
        """Raise :class:`NonFiniteActivationError` naming the first op whose saved tensor held
        NaN or inf since the last call (one host sync)."""
        flags, self._nonfinite = self._nonfinite, []
        if not flags:
            return
        bad = torch.stack([flag.to(flags[0][1].device) for _, flag in flags]).nonzero()
        if bad.numel():
            op = flags[int(bad[0, 0])][0]
            raise NonFiniteActivationError(
                f"mesa: a tensor saved for backward by {op!r} holds NaN or inf, which 8-bit codes cannot "
                "represent; the forward pass produced non-finite values (check the inputs, lower the "
                "learning rate, or use a loss scaler under fp16)"
            )

    # -- hooks -------------------------------------------------------------------------------

    def _pack(self, tensor: torch.Tensor) -> Any:
        assert self._tracker is not None
        call = self._tracker.current
        site = f"{self._namespace}:{self._site}"
        self._site += 1
        reason = exact_reason(tensor, call, self.config.min_numel)
        if reason is not None:
            self.report.kept[reason].add(_nbytes(tensor), _nbytes(tensor))
            return tensor
        key = (
            tensor.untyped_storage().data_ptr(),
            tensor.storage_offset(),
            tuple(tensor.shape),
            tensor.stride(),
            tensor.dtype,
            tensor._version,
        )
        known = self._shared.get(key)
        if known is not None and known[0]() is not None:
            self.report.shared[call.name].add(_nbytes(tensor), 0)
            return known[1]
        packed = self._compress(tensor.detach(), call.attention, site, call.name)
        self.report.compressed[call.name].add(_nbytes(tensor), packed.nbytes)
        # the entry is valid while the tensor owning the storage lives; after that the memory
        # may hold another tensor with the same address and shape
        owner = tensor._base if tensor._base is not None else tensor
        self._shared[key] = (weakref.ref(owner), packed)
        return packed

    @torch.no_grad()
    def _compress(self, tensor: torch.Tensor, attention: bool, site: str, op: str) -> PackedActivation:
        layout = layout_for(tensor.shape, attention, self.config.channel_group)
        with torch.autocast(tensor.device.type, enabled=False):
            low, high = group_range(tensor, layout)
            if self.config.check_finite:
                self._nonfinite.append((op, ~torch.isfinite(high - low).all()))
            if self.config.ranges == "ema":
                low, high = self._update_running(site, low, high)
            generator = self._generator(tensor.device) if self.config.stochastic else None
            codes, step = quantize_codes(tensor, low, high, generator)
        return PackedActivation(codes, low, step, tensor.dtype)

    def _update_running(self, site: str, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        previous = self._running.get(site)
        if previous is not None and previous[0].shape == low.shape:
            m = self.config.momentum
            low = previous[0].to(low.device).mul(m).add_(low, alpha=1 - m)
            high = previous[1].to(high.device).mul(m).add_(high, alpha=1 - m)
        self._running[site] = (low, high)
        return low, high

    def _generator(self, device: torch.device) -> torch.Generator:
        name = str(device)
        generator = self._generators.get(name)
        if generator is None:
            generator = torch.Generator(device=device).manual_seed(self.config.seed)
            self._generators[name] = generator
        return generator

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The rounding generators and running ranges, as tensors (for exact resumption)."""
        state = {f"generator.{name}": g.get_state() for name, g in self._generators.items()}
        for site, (low, high) in self._running.items():
            state[f"running.{site}.low"] = low.cpu()
            state[f"running.{site}.high"] = high.cpu()
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self._generators.clear()
        self._running.clear()
        lows = {}
        for name, value in state.items():
            if name.startswith("generator."):
                device = torch.device(name.removeprefix("generator."))
                self._generator(device).set_state(value)
            elif name.startswith("running.") and name.endswith(".low"):
                lows[name.removeprefix("running.").removesuffix(".low")] = value
            elif not (name.startswith("running.") and name.endswith(".high")):
                raise KeyError(f"unexpected entry {name!r} in a Mesa state")
        for site, low in lows.items():
            self._running[site] = (low, state[f"running.{site}.high"])


def compressors_in(model: torch.nn.Module) -> dict[str, Compressor]:
    """Every Mesa compressor held by a stack inside ``model``, by module name."""
    found = {}
    for name, module in model.named_modules():
        compressor = getattr(module, "compressor", None)
        if isinstance(compressor, Compressor):
            found[name] = compressor
    return found
