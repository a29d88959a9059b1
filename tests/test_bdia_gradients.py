"""BDIAStack's reversible backward gives the gradients of plain autograd on the same forward."""

from __future__ import annotations

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs, relative_error, reversible_and_plain_agree_under_autocast, run_step

TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}


def compare_with_plain(stack, x, args=(), signs=None, seed=0, dtype=torch.float64):
    stack.reversible = True
    out_rev, grads_rev = run_step(stack, x, args, signs, seed)
    stack.reversible = False
    out_ref, grads_ref = run_step(stack, x, args, signs, seed)
    stack.reversible = True
    assert torch.equal(out_rev, out_ref), "the reversible forward must equal the plain forward bitwise"
    assert grads_rev.keys() == grads_ref.keys()
    worst = {name: relative_error(grads_rev[name], grads_ref[name]) for name in grads_ref}
    assert max(worst.values()) <= TOLERANCE[dtype], worst
    return grads_rev


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_deep_stack_with_dropout_matches_plain_autograd(dtype):
    torch.manual_seed(0)
    depth, batch = 48, 2
    stack = revbits.BDIAStack(gpt_blocks(depth, d_model=16, n_heads=2, dropout=0.1)).to(dtype)
    x = torch.randn(batch, 6, 16, dtype=dtype, requires_grad=True)
    compare_with_plain(stack, x, signs=random_signs(depth, batch), dtype=dtype)


@pytest.mark.parametrize("batch", [1, 2, 5, 16])
def test_batch_sizes_match_plain_autograd(batch):
    torch.manual_seed(batch)
    stack = revbits.BDIAStack(gpt_blocks(6, dropout=0.1)).double()
    x = torch.randn(batch, 5, 32, dtype=torch.float64, requires_grad=True)
    compare_with_plain(stack, x, signs=random_signs(6, batch))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_attention_memory_gets_exact_gradients(dtype):
    torch.manual_seed(1)
    depth, batch = 8, 3
    stack = revbits.BDIAStack(gpt_blocks(depth, dropout=0.1, cross_attention=True)).to(dtype)
    x = torch.randn(batch, 7, 32, dtype=dtype, requires_grad=True)
    memory = torch.randn(batch, 4, 32, dtype=dtype, requires_grad=True)
    grads = compare_with_plain(stack, x, (memory,), random_signs(depth, batch), dtype=dtype)
    assert grads["arg0"].abs().sum() > 0, "the encoder output must receive a gradient"


def test_attention_mask_argument_without_gradient():
    torch.manual_seed(2)
    stack = revbits.BDIAStack(gpt_blocks(4)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(5, 5, dtype=torch.bool).tril()
    compare_with_plain(stack, x, (mask,), random_signs(4, 2))


def test_quarter_gamma_stores_two_bits_and_stays_exact():
    torch.manual_seed(3)
    stack = revbits.BDIAStack(gpt_blocks(6, dropout=0.1), gamma=0.25, check=True).double()
    x = torch.randn(3, 5, 32, dtype=torch.float64, requires_grad=True)
    compare_with_plain(stack, x, signs=random_signs(6, 3))


def test_shared_and_frozen_parameters():
    torch.manual_seed(4)
    blocks = gpt_blocks(5)
    blocks[3] = blocks[1]  # the same module twice: its parameters are used by two blocks
    for p in blocks[0].mlp.parameters():
        p.requires_grad_(False)
    stack = revbits.BDIAStack(blocks).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    grads = compare_with_plain(stack, x, signs=random_signs(5, 2))
    assert not any(name.startswith("blocks.0.mlp") for name in grads)


def test_random_gammas_in_training_mode_are_reproducible_from_the_seed():
    torch.manual_seed(5)
    stack = revbits.BDIAStack(gpt_blocks(4)).double().train()
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    outs = []
    for _ in range(2):
        torch.manual_seed(11)
        outs.append(stack(x))
    torch.manual_seed(12)
    other = stack(x)
    assert torch.equal(outs[0], outs[1])
    assert not torch.equal(outs[0], other)


@pytest.mark.parametrize(
    "batch, chunks, check, dropout",
    [(2, "auto", False, 0.2), (6, 3, True, 0.3)],  # whole batch; dropout replayed per chunk, rebuilt states checked
)
def test_backward_leaves_the_global_rng_as_plain_autograd_does(batch, chunks, check, dropout):
    torch.manual_seed(6)
    stack = revbits.BDIAStack(gpt_blocks(4, dropout=dropout), check=check, batch_chunks=chunks).double()
    x = torch.randn(batch, 5, 32, dtype=torch.float64, requires_grad=True)
    after = []
    for reversible in (True, False):
        stack.reversible = reversible
        torch.manual_seed(0)
        stack(x).sum().backward()
        after.append(torch.rand(4))
    assert torch.equal(after[0], after[1])


def test_bf16_autocast_inside_blocks_keeps_fp32_stream_exact():
    torch.manual_seed(7)
    depth = 6
    stack = revbits.BDIAStack(gpt_blocks(depth, dropout=0.1), check=True)
    x = torch.randn(2, 8, 32, requires_grad=True)
    reversible_and_plain_agree_under_autocast(stack, x, random_signs(depth, 2), "cpu", autocast=True)


def test_gradient_flows_to_the_input_through_the_straight_through_quantiser():
    torch.manual_seed(8)
    stack = revbits.BDIAStack(gpt_blocks(3)).double()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    grads = compare_with_plain(stack, x, signs=random_signs(3, 2))
    assert grads["x"].abs().sum() > 0


def test_parameters_frozen_between_forward_and_backward_keep_their_slots():
    torch.manual_seed(9)
    stack = revbits.BDIAStack(gpt_blocks(4)).double()
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(4, 2)
    torch.manual_seed(0)
    stack(x, gammas=signs).square().sum().backward()
    expected = {n: p.grad.clone() for n, p in stack.named_parameters()}
    stack.zero_grad()
    torch.manual_seed(0)
    out = stack(x, gammas=signs).square().sum()
    first = next(stack.blocks[1].parameters())
    first.requires_grad_(False)  # frozen after the forward pass
    out.backward()
    assert first.grad is None, "a parameter frozen before backward gets no gradient"
    for name, p in stack.named_parameters():
        if p is not first:
            assert torch.allclose(p.grad, expected[name], rtol=1e-12, atol=0), name
