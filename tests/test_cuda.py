"""BDIA exactness and Mesa agreement on CUDA, in fp32 and under autocast (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs, reversible_and_plain_agree_under_autocast

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("autocast", [False, True])
def test_cuda_gradients_match_plain_autograd(autocast):
    torch.manual_seed(0)
    depth, batch = 12, 4
    stack = revbits.BDIAStack(gpt_blocks(depth, d_model=64, dropout=0.1), check=True).cuda()
    x = torch.randn(batch, 32, 64, device="cuda", requires_grad=True)
    reversible_and_plain_agree_under_autocast(stack, x, random_signs(depth, batch).cuda(), "cuda", autocast)


def test_cuda_rng_is_replayed_and_left_untouched():
    torch.manual_seed(0)
    stack = revbits.BDIAStack(gpt_blocks(4, d_model=64, dropout=0.3)).cuda()
    x = torch.randn(2, 16, 64, device="cuda", requires_grad=True)
    after = []
    for reversible in (True, False):
        stack.reversible = reversible
        torch.manual_seed(3)
        stack(x).sum().backward()
        after.append(torch.rand(3, device="cuda"))
    assert torch.equal(after[0], after[1])


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_cuda_mesa_forward_unchanged_and_gradients_agree(dtype):
    import torch.nn.functional as F

    grads, outputs = {}, {}
    x = torch.randn(4, 128, 64, device="cuda")
    for memory in ("standard", "mesa"):
        torch.manual_seed(0)
        stack = revbits.stack(gpt_blocks(4, d_model=64, dropout=0.1), memory=memory).cuda().train()
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=dtype or torch.bfloat16, enabled=dtype is not None):
            out = stack(x)
        out.float().square().mean().backward()
        outputs[memory], grads[memory] = out.detach(), [p.grad for p in stack.parameters()]
    assert torch.equal(outputs["standard"], outputs["mesa"])
    for a, b in zip(grads["standard"], grads["mesa"]):
        assert F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0) >= 0.99


def test_cuda_mesa_rounding_is_reproducible():
    results = []
    for _ in range(2):
        torch.manual_seed(0)
        stack = revbits.stack(gpt_blocks(2, d_model=64), memory="mesa", seed=3).cuda().train()
        stack(torch.ones(2, 64, 64, device="cuda").cumsum(1)).square().mean().backward()
        results.append([p.grad for p in stack.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))
