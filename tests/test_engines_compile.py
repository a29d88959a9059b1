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


def break_reasons(model: nn.Module, signs: torch.Tensor | None = None) -> tuple[int, list[str]]:
    """torch._dynamo.explain's graph break count and the functions the breaks happened in."""
    explanation = torch._dynamo.explain(model)(torch.randn(BATCH, T, D), signs)
    return explanation.graph_break_count, sorted({r.user_stack[-1].name for r in explanation.break_reasons})


def test_graph_breaks_are_the_documented_ones():
    """docs/engines.md: 1 break in training (the reversible path), none in evaluation, one host sync on the plain
    path (its range check), and the check of explicit gammas; explain counts a break once per frame it crosses."""
    torch.manual_seed(0)
    model = Model()
    signs = torch.randint(0, 2, (DEPTH - 1, BATCH), generator=torch.Generator().manual_seed(3)) * 2 - 1
    assert break_reasons(model) == (1, ["forward"])  # the call of the torch.compiler.disable'd reversible path
    assert break_reasons(model, signs) == (3, ["_signs", "forward"])
    model.stack.reversible = False
    assert break_reasons(model) == (3, ["raise_if_out_of_range"])
    model.eval()
    assert break_reasons(model) == (0, [])


def test_plain_path_under_inductor_follows_explicit_gammas():
    """float64, reversible=False, explicit signs: the compiled stack's output is eager's bit for bit (every state is on
    the grid), so are the loss and, to rounding (inductor's block kernels round differently), the gradients. Inductor
    once miscompiled the packing of the signs, so the compiled plain path ran other signs (docs/engines.md)."""
    torch.manual_seed(0)
    model = Model().double()
    model.stack.reversible = False
    x = torch.randn(BATCH, T, D, dtype=torch.float64)
    signs = torch.randint(0, 2, (DEPTH - 1, BATCH), generator=torch.Generator().manual_seed(3)) * 2 - 1

    def stack_out(run) -> torch.Tensor:
        return run(x, signs).detach()

    compiled_stack = torch.compile(lambda x, s: model.stack(x, gammas=s), backend="inductor")
    want = stack_out(lambda x, s: model.stack(x, gammas=s))
    assert torch.equal(stack_out(compiled_stack), want)
    assert not torch.equal(stack_out(lambda x, s: model.stack(x, gammas=-s)), want)  # the signs do matter
    compiled = torch.compile(model, backend="inductor")
    losses, grads = [], []
    for run in (model, compiled):
        model.zero_grad(set_to_none=True)
        loss = run(x, signs)
        loss.backward()
        losses.append(loss.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    assert torch.equal(losses[0], losses[1])
    for got, want_grad in zip(grads[1], grads[0]):
        assert (got - want_grad).abs().max().item() <= 1e-12 * want_grad.abs().max().item()


@pytest.mark.slow
def test_blocks_compiled_before_wrapping_train_exactly():
    """Compiled blocks run the same compiled graph in the forward and in the recomputation, dropout replayed."""
    torch.manual_seed(0)
    model = Model(compile_blocks=True, dropout=0.1)
    x = torch.randn(BATCH, T, D)
    got = grads_of(model, model, x, reversible=True)
    want = grads_of(model, model, x, reversible=False)  # plain autograd through the same compiled blocks
    assert_close(got, want)
