"""The reversible RNNs on every path a user takes, against the same model's plain-autograd reference
(``rnn.reversible = False``): forwards under no_grad and in eval mode, ``torch.autograd.grad`` and
``backward(inputs=...)``, PyTorch's own tools, torch.compile, and a reversal that goes wrong."""

from __future__ import annotations

import pytest
import torch
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed._tools.mod_tracker import ModTracker
from torch.utils.flop_counter import FlopCounterMode

from helpers import relative_error
from revbits import ReversibilityError
from revbits.revrnn import RevGRU, RevLSTM

CELLS = [RevGRU, RevLSTM]
STEPS, BATCH, INPUTS, HIDDEN = 9, 3, 5, 8

pytestmark = pytest.mark.usefixtures("one_thread")


def model(cls) -> torch.nn.Module:
    torch.manual_seed(0)
    return cls(INPUTS, HIDDEN, num_layers=2, forget_bits=3)


def data() -> torch.Tensor:
    return torch.randn(STEPS, BATCH, INPUTS, generator=torch.Generator().manual_seed(1))


def training_step(rnn: torch.nn.Module, call=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """(output, [dL/dx, dL/dparameters]) of one step with loss = sum(out^2); ``call`` runs the forward."""
    rnn.zero_grad(set_to_none=True)
    x = data().requires_grad_()
    out = (rnn if call is None else call)(x)[0]
    out.square().sum().backward()
    return out.detach(), [x.grad] + [p.grad for p in rnn.parameters()]


def reference_step(rnn: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
    rnn.reversible = False
    try:
        return training_step(rnn)
    finally:
        rnn.reversible = True


def assert_bit_equal(found: list[torch.Tensor], expected: list[torch.Tensor]) -> None:
    assert all(torch.equal(a, b) for a, b in zip(found, expected, strict=True))


@pytest.mark.parametrize("cls", CELLS)
def test_no_grad_and_eval_forwards_are_the_training_forward(cls):
    rnn = model(cls)
    trained_out, _ = training_step(rnn)
    with torch.no_grad():
        assert torch.equal(rnn(data())[0], trained_out)
    rnn.eval()
    assert torch.equal(rnn(data())[0].detach(), trained_out)
    with torch.inference_mode():
        assert torch.equal(rnn(data())[0], trained_out)


@pytest.mark.parametrize("cls", CELLS)
def test_autograd_grad_and_backward_inputs_get_the_references_gradients(cls):
    rnn = model(cls)
    reference_out, reference = reference_step(rnn)
    rnn.zero_grad(set_to_none=True)
    x = data().requires_grad_()
    out = rnn(x)[0]
    assert torch.equal(out, reference_out)
    (grad_x,) = torch.autograd.grad(out.square().sum(), [x])
    assert relative_error(grad_x, reference[0]) < 1e-5
    assert all(p.grad is None for p in rnn.parameters())  # autograd.grad leaves .grad alone

    x = data().requires_grad_()
    weight = rnn.cells[0].half_linears()[0][0].weight
    rnn(x)[0].square().sum().backward(inputs=[weight])
    assert x.grad is None and weight.grad is not None
    index = [p is weight for p in rnn.parameters()].index(True)
    assert relative_error(weight.grad, reference[1 + index]) < 1e-5
    assert all(p.grad is None for p in rnn.parameters() if p is not weight)


@pytest.mark.parametrize("cls", CELLS)
def test_pytorchs_tools_run_a_training_step_without_changing_it(cls):
    """MemTracker, ModTracker, torch.profiler and FlopCounterMode see the step; its gradients stay the same bits."""
    rnn = model(cls)
    out, grads = training_step(rnn)
    memory = MemTracker()
    memory.track_external(rnn)
    with memory:
        assert_bit_equal(training_step(rnn)[1], grads)
    assert memory.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] > 0
    with ModTracker() as modules:
        seen = []
        modules.register_user_hooks(pre_fw_hook=lambda module, args: seen.append(module))
        assert_bit_equal(training_step(rnn)[1], grads)
    assert rnn in seen
    with torch.profiler.profile() as profile:
        assert_bit_equal(training_step(rnn)[1], grads)
    assert any(event.key == "_ReversibleRNNBackward" for event in profile.key_averages())
    with FlopCounterMode(display=False) as flops:
        assert_bit_equal(training_step(rnn)[1], grads)
    assert flops.get_total_flops() > 0


@pytest.mark.parametrize("cls", CELLS)
def test_a_compiled_model_runs_the_stack_eagerly_with_the_same_bits(cls):
    """Under torch.compile (inductor, its defaults) the recurrent stack runs eagerly, so its forward and its
    reversal use the same kernels: the outputs and gradients are eager's, bit for bit."""
    rnn = model(cls)
    eager_out, eager_grads = training_step(rnn)
    torch._dynamo.reset()
    compiled = torch.compile(rnn)
    for _ in range(2):  # the first call compiles, the second runs what was compiled
        out, grads = training_step(rnn, compiled)
        assert torch.equal(out, eager_out)
        assert_bit_equal(grads, eager_grads)


@pytest.mark.parametrize("cls", CELLS)
def test_a_reversal_that_does_not_rebuild_the_initial_state_raises(cls):
    """A state changed between forward and backward stands for a forward and a reversal that computed
    different bits: the backward names it instead of returning wrong gradients."""
    rnn = model(cls)
    x = data().requires_grad_()
    out = rnn(x)[0]
    run = out.grad_fn.run
    run.states[0][0] = run.states[0][0] + 1  # one step of 2**-23 in every unit of layer 0's h1
    with pytest.raises(ReversibilityError, match="layer 0 of the Rev(GRU|LSTM): the backward's reversal did not"):
        out.square().sum().backward()


@pytest.mark.parametrize("cls", CELLS)
def test_higher_order_gradients_and_a_second_backward_are_named(cls):
    """create_graph=True would get constants from the hand-written backward (silently no second-order terms):
    it raises and names the way out, which works; a second backward over used-up bits raises too."""
    rnn = model(cls)
    x = data().requires_grad_()
    with pytest.raises(RuntimeError, match="first-order gradients only.*rnn.reversible = False"):
        torch.autograd.grad(rnn(x)[0].square().sum(), [x], create_graph=True)
    rnn.reversible = False
    (grad_x,) = torch.autograd.grad(rnn(x)[0].square().sum(), [x], create_graph=True)
    assert grad_x.requires_grad  # the reference differentiates again
    rnn.reversible = True
    loss = rnn(x)[0].square().sum()
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward already ran for this forward"):
        loss.backward()


@pytest.mark.parametrize("cls", CELLS)
def test_under_autocast_the_stack_computes_in_its_own_dtype(cls):
    """torch.autocast does not reach the backward's reversal, so the stack switches it off inside: a step under
    autocast gives the plain step's outputs and gradients bit for bit (before, the forward's products ran in
    bfloat16 and the reversal's in float32, and the backward rebuilt wrong states)."""
    rnn = model(cls)
    plain_out, plain_grads = training_step(rnn)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # forward and backward under autocast
        out, grads = training_step(rnn)
    assert out.dtype == torch.float32 and torch.equal(out, plain_out)
    assert_bit_equal(grads, plain_grads)

    def forward_under_autocast(x: torch.Tensor):  # the usual AMP loop: only the forward under autocast
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return rnn(x)

    out, grads = training_step(rnn, forward_under_autocast)
    assert torch.equal(out, plain_out)
    assert_bit_equal(grads, plain_grads)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cls", CELLS)
def test_under_cuda_autocast_the_stack_computes_in_its_own_dtype(cls):
    """The same on CUDA with float16 autocast (where the PyTorch path runs: no native kernels there)."""
    rnn = model(cls).cuda()
    x = data().cuda()

    def step(autocast: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        rnn.zero_grad(set_to_none=True)
        inputs = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.float16, enabled=autocast):
            out = rnn(inputs)[0]
        out.square().sum().backward()
        return out.detach(), [inputs.grad] + [p.grad for p in rnn.parameters()]

    plain_out, plain_grads = step(False)
    out, grads = step(True)
    assert torch.equal(out, plain_out)
    assert_bit_equal(grads, plain_grads)
