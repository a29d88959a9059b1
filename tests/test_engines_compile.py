"""BDIA under torch.compile: exact at a size where compiled and eager kernels round differently.

d=64, T=64, batch 8: there the compiled blocks of a model and their eager recomputation differed before
the reversible path was kept out of dynamo, and the backward raised ReversibilityError at block 0.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from revbits import BDIAStack
from revbits.models import TransformerBlock

pytestmark = pytest.mark.usefixtures("one_thread")

D, T, BATCH, DEPTH = 64, 64, 8, 3


class Model(nn.Module):
    def __init__(self, compile_blocks: bool = False, dropout: float = 0.0) -> None:
        super().__init__()
        blocks = [TransformerBlock(D, 4, causal=True, dropout=dropout) for _ in range(DEPTH)]
        if compile_blocks:
            blocks = [torch.compile(b) for b in blocks]
        self.stack = BDIAStack(blocks)
        self.head = nn.Linear(D, 1)

    def forward(self, x: torch.Tensor, signs: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.stack(x, gammas=signs)).square().mean()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def grads_of(model: nn.Module, run, x: torch.Tensor, reversible: bool) -> list[torch.Tensor]:
    """Gradients of one step with fixed signs g (a compiled model would draw them from inductor's RNG)."""
    model.stack.reversible = reversible
    model.zero_grad(set_to_none=True)
    signs = torch.randint(0, 2, (DEPTH - 1, BATCH), generator=torch.Generator().manual_seed(3)) * 2 - 1
    torch.manual_seed(4)  # the same dropout masks in every run
    run(x, signs).backward()
    return [p.grad.clone() for p in model.parameters()]


def assert_close(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-5 * b.abs().max().item()


@pytest.mark.slow
def test_compiled_model_trains_exactly():
    torch.manual_seed(0)
    model = Model()
    x = torch.randn(BATCH, T, D)
    compiled = torch.compile(model)
    got = grads_of(model, compiled, x, reversible=True)  # raises ReversibilityError if the passes differ
    want = grads_of(model, model, x, reversible=False)  # plain autograd, eager, on the same forward
    assert_close(got, want)


def test_compiled_model_has_one_graph_break_at_the_reversible_path():
    torch.manual_seed(0)
    model = Model()
    explanation = torch._dynamo.explain(model)(torch.randn(BATCH, T, D))
    assert explanation.graph_break_count == 1
    assert "_forward_reversible" in str(explanation.break_reasons[0])


@pytest.mark.slow
def test_blocks_compiled_before_wrapping_train_exactly():
    """Compiled blocks run the same compiled graph in the forward and in the recomputation, dropout replayed."""
    torch.manual_seed(0)
    model = Model(compile_blocks=True, dropout=0.1)
    x = torch.randn(BATCH, T, D)
    got = grads_of(model, model, x, reversible=True)
    want = grads_of(model, model, x, reversible=False)  # plain autograd through the same compiled blocks
    assert_close(got, want)
