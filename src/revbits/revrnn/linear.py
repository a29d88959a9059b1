"""The linear layers of the reversible cells: y = x W^T + b, through oneDNN where it runs.

At the cells' shapes (a batch of about 20 rows, a few hundred units) torch's float32 ``F.linear``
goes to MKL. oneDNN's matmul (``torch.ops.mkldnn._linear_pointwise``, the op that torch's own
fused CPU paths call) made the RevLSTM's training step faster (its layers have 640 outputs) and
the RevGRU's slower (256 and 128 outputs) in interleaved runs on the 2-core development machine,
so it is used from ``ONEDNN_MIN_OUTPUTS`` outputs up; ``benchmarks/revrnn_speed.py
--product-paths`` times both paths for both cells. Its result differs from MKL's in the last
bits, which exactness does not mind: the forward, the reversal and the autograd reference all
compute a gate's logits through the same :class:`CellLinear`, the same op on the same shapes, so
they agree bit for bit. Under autograd (the reference) the value is
oneDNN's and the gradient is that of ``F.linear`` (straight through: ``value + (graph - graph)``
adds an exact zero). float64, other dtypes and devices other than the CPU use ``F.linear``, which
for a 2-D input is ``addmm(b, x, W^T)``; without a graph that product is called directly with W^T
made once per run (one operator per call instead of two, the same bits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ONEDNN_LINEAR = getattr(torch.ops.mkldnn, "_linear_pointwise", None)

# False sends every product through F.linear's addmm (the tests and benchmarks/revrnn_speed.py switch it).
use_onednn = _ONEDNN_LINEAR is not None and torch.backends.mkldnn.is_available()
ONEDNN_MIN_OUTPUTS = 512  # layers with fewer outputs use F.linear (see above)


def _onednn_product(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x weight^T + bias by oneDNN, without a graph."""
    return _ONEDNN_LINEAR(x, weight, bias, "none", [], "")


class CellLinear:
    """One linear layer of a cell, read once per run: y = x W^T + b, and dL/dx = dL/dy W."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        self.weight, self.bias = weight, bias
        self.onednn = (
            use_onednn
            and weight.device.type == "cpu"
            and weight.dtype == torch.float32
            and weight.shape[0] >= ONEDNN_MIN_OUTPUTS
        )
        self._values = (weight.detach(), bias.detach())
        self._weight_t = self._values[0].t()  # a view, made once per run

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x W^T + b; the same bits for the same x in the forward, the reversal and the reference."""
        if not self.onednn or x.dtype != torch.float32:
            if torch.is_grad_enabled() or x.dim() != 2:
                return F.linear(x, self.weight, self.bias)
            return torch.addmm(self._values[1], x, self._weight_t)  # F.linear's own product for 2-D x
        if not torch.is_grad_enabled():
            return _onednn_product(x, *self._values)
        value = _onednn_product(x.detach(), *self._values)
        if x.requires_grad or self.weight.requires_grad or self.bias.requires_grad:
            graph = F.linear(x, self.weight, self.bias)
            value = value + (graph - graph.detach())
        return value

    def native_args(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """(W, W^T, b, whether oneDNN) for the native operators, which compute this layer's products as
        :meth:`__call__` (no graph) and :meth:`input_gradient` do for inputs of ``dtype``."""
        return self._values[0], self._weight_t, self._values[1], self.onednn and dtype == torch.float32

    def input_gradient(self, grad_out: torch.Tensor) -> torch.Tensor:
        """dL/dx = dL/dy W (no graph). On oneDNN layers by oneDNN's product with the view W^T as its
        weight (no copy of W is held); otherwise by torch.mm on W itself."""
        if self.onednn and grad_out.dtype == torch.float32:
            return _onednn_product(grad_out, self._weight_t, None)
        return grad_out @ self._values[0]
