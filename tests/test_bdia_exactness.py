"""Bit-exact reconstruction, evaluation behaviour and the memory-mode switch."""

from __future__ import annotations

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs
from revbits.bdia.fixedpoint import quantize


def states_of_plain_forward(stack, x, signs):
    """Every state x_0..x_K of the quantised forward, from the autograd reference path."""
    captured = []
    hooks = [b.register_forward_pre_hook(lambda m, a: captured.append(a[0].detach().clone())) for b in stack.blocks]
    stack.reversible = False
    out = stack(x, gammas=signs)
    stack.reversible = True
    for h in hooks:
        h.remove()
    return captured + [out.detach()]


@pytest.mark.parametrize("gamma", [0.5, 0.25, 0.125])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_rebuilds_every_state_bit_for_bit(gamma, dtype):
    torch.manual_seed(0)
    depth = 12
    stack = revbits.BDIAStack(gpt_blocks(depth, dropout=0.1), gamma=gamma, check=True).to(dtype)
    x = torch.randn(3, 6, 32, dtype=dtype, requires_grad=True)
    signs = random_signs(depth, 3)
    torch.manual_seed(1)
    expected = states_of_plain_forward(stack, x, signs)
    torch.manual_seed(1)
    stack(x, gammas=signs).sum().backward()  # check=True raises at the first state that differs
    # the states the check compared against are the forward's own: x_0..x_{K-1}
    assert all(s.dtype == dtype for s in expected)
    assert all(torch.equal(s, quantize(s, stack.bits)) for s in expected), "states lie on the grid"


class Drifting(torch.nn.Module):
    """A block whose output changes from call to call by ``drift``: recomputation cannot match."""

    def __init__(self, drift: float):
        super().__init__()
        self.linear = torch.nn.Linear(8, 8)
        self.drift, self.calls = drift, 0

    def forward(self, x):
        self.calls += 1
        return x + self.linear(x) * (1 + self.drift * self.calls)


def test_check_mode_catches_a_recomputation_that_differs():
    blocks = (
        [torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2)]
        + [Drifting(1e-3)]
        + [torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2)]
    )
    for verify_only in (False, True):
        stack = revbits.BDIAStack(blocks, check=not verify_only).double()
        x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
        with pytest.raises(revbits.ReversibilityError, match="block 2"):
            stack(x, gammas=random_signs(5, 4)).sum().backward()


def test_a_recomputation_of_block_0_that_differs_is_caught():
    """Block 0's x_1 = Q(y_0) is checked against the x_1 block 1 rebuilt (checksum mode compares grid codes), also
    with one batch chunk and with several."""
    for check, chunks in ((True, 1), (False, 1), (False, 2)):
        blocks = [Drifting(1e-2)] + [torch.nn.Sequential(torch.nn.Linear(8, 8)) for _ in range(2)]
        stack = revbits.BDIAStack(blocks, check=check, batch_chunks=chunks).double()
        x = torch.randn(4, 8, dtype=torch.float64, requires_grad=True)
        with pytest.raises(revbits.ReversibilityError, match="block 0"):
            stack(x, gammas=random_signs(3, 4)).sum().backward()


def test_verification_can_be_turned_off():
    stack = revbits.BDIAStack([Drifting(1e-3) for _ in range(3)], verify=False).double()
    x = torch.randn(2, 8, dtype=torch.float64, requires_grad=True)
    stack(x, gammas=random_signs(3, 2)).sum().backward()  # silently inexact, as asked
    assert x.grad is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_eval_without_quantiser_is_exactly_the_blocks_in_sequence(dtype):
    torch.manual_seed(2)
    blocks = gpt_blocks(5, dropout=0.1)
    stack = revbits.BDIAStack(blocks, quantize_eval=False).to(dtype).eval()
    x = torch.randn(2, 7, 32, dtype=dtype)
    expected = x
    for block in blocks:
        expected = block(expected)
    assert torch.equal(stack(x), expected)


def test_eval_with_quantiser_rounds_every_block_output():
    torch.manual_seed(3)
    blocks = gpt_blocks(4)
    stack = revbits.BDIAStack(blocks, bits=9).eval()
    x = torch.randn(2, 7, 32)
    expected = quantize(x, 9)
    for block in blocks:
        expected = quantize(block(expected), 9)
    out = stack(x)
    assert torch.equal(out, expected)
    plain = revbits.stack(blocks, memory="standard").eval()(x)
    assert (out - plain).abs().max() < 0.05, "quantising at 2**-9 stays close to the float model"


def test_weights_move_between_memory_modes_and_agree_in_eval():
    torch.manual_seed(4)
    trained = revbits.stack(gpt_blocks(4, dropout=0.1), memory="bdia", quantize_eval=False)
    x = torch.randn(2, 6, 32)
    trained.train()
    trained(x).square().mean().backward()  # a training step's graph exists and is used
    state = trained.state_dict()
    outputs = {}
    for mode in revbits.MEMORY_MODES:
        options = {"quantize_eval": False} if mode == "bdia" else {}
        model = revbits.stack(gpt_blocks(4, dropout=0.1), memory=mode, **options)
        model.load_state_dict(state)
        outputs[mode] = model.eval()(x)
    assert torch.equal(outputs["standard"], outputs["bdia"])
    assert torch.equal(outputs["standard"], outputs["checkpoint"])


def test_checkpoint_mode_gives_the_standard_gradients():
    torch.manual_seed(5)
    grads = {}
    for mode in ("standard", "checkpoint"):
        torch.manual_seed(5)
        model = revbits.stack(gpt_blocks(3, dropout=0.1), memory=mode)
        x = torch.randn(2, 6, 32)
        torch.manual_seed(9)
        model(x).square().sum().backward()
        grads[mode] = [p.grad for p in model.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(grads["standard"], grads["checkpoint"]))


def test_stack_rejects_unknown_modes_and_misplaced_options():
    with pytest.raises(ValueError, match="unknown memory mode 'fast'"):
        revbits.stack(gpt_blocks(2), memory="fast")
    with pytest.raises(TypeError, match=r"option\(s\) bits do not apply to memory='checkpoint'"):
        revbits.stack(gpt_blocks(2), memory="checkpoint", bits=9)
    assert isinstance(revbits.stack(gpt_blocks(2), memory="bdia"), revbits.BDIAStack)


def test_eval_gamma_sweeps_the_update_and_zero_is_the_standard_step():
    torch.manual_seed(6)
    blocks = gpt_blocks(4)
    stack = revbits.BDIAStack(blocks, quantize_eval=False).eval()
    x = torch.randn(2, 5, 32)
    base = stack(x)
    stack.eval_gamma = 0.25
    swept = stack(x)
    expected_prev, expected = x, blocks[0](x)
    for block in blocks[1:]:
        y = block(expected)
        expected_prev, expected = expected, 0.25 * expected_prev + (1.25 * y - 0.5 * expected)
    assert torch.allclose(swept, expected, atol=1e-6)
    assert not torch.allclose(swept, base)
    stack.eval_gamma = 0.0
    assert torch.equal(stack(x), base)


def test_the_step_is_built_once_and_again_only_when_an_option_changes():
    """The stack holds its configuration and Step across forwards; changing bits or gamma rebuilds both, changing
    another option rebuilds the configuration around the same Step, and the result follows the new option."""
    torch.manual_seed(0)
    stack = revbits.BDIAStack(gpt_blocks(3), batch_chunks=1)
    x = torch.randn(2, 4, 32, requires_grad=True)
    signs = random_signs(3, 2)
    stack(x, gammas=signs).sum().backward()
    config = stack._config()
    stack(x, gammas=signs).sum().backward()
    assert stack._config() is config
    stack.check = True
    assert stack._config() is not config and stack._config().step is config.step and stack._config().check
    stack.gamma = 0.25
    stack.reversible = False
    reference = stack(x, gammas=signs)
    stack.reversible = True
    assert stack._config().step is not config.step and stack._config().step.gamma == 0.25
    assert torch.equal(stack(x, gammas=signs), reference)
