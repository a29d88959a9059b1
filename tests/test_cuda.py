"""The same exactness on CUDA, in fp32 and with bf16 autocast inside the blocks (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch

import revbits
from conftest import gpt_blocks, random_signs, reversible_and_plain_agree_under_autocast

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
