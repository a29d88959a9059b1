"""revbits.stack, the one switch: every memory mode runs the same blocks, keeps the same state dict, and
gives the gradients of plain autograd on its forward; bdia+mesa is BDIA with Mesa's recompute context."""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch

import revbits
from helpers import gpt_blocks, random_signs, relative_error
from revbits.bdia import BDIAStack
from revbits.mesa import NonFiniteActivationError, compressors_in
from revbits.modes import MEMORY_MODES, BDIAMesaStack, CheckpointStack, MesaStack, SequentialStack

DEPTH, BATCH, T, D = 4, 3, 5, 16
KINDS = {
    "standard": SequentialStack,
    "checkpoint": CheckpointStack,
    "mesa": MesaStack,
    "bdia": BDIAStack,
    "bdia+mesa": BDIAMesaStack,
}
NO_COMPRESSION = {"min_numel": 2**62}  # Mesa keeps every tensor exact: the plumbing alone
ALL_COMPRESSED = {"min_numel": 0}


def blocks(seed: int = 0, dropout: float = 0.1) -> list:
    torch.manual_seed(seed)
    return gpt_blocks(DEPTH, d_model=D, n_heads=2, dropout=dropout)


def make(memory: str, **options) -> torch.nn.Module:
    return revbits.stack(blocks(), memory=memory, **options).double().train()


def inputs(seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(BATCH, T, D, generator=g, dtype=torch.float64).requires_grad_()


def step(module: torch.nn.Module, x: torch.Tensor, seed: int = 2, **call) -> tuple[torch.Tensor, dict]:
    """One forward and backward from RNG seed ``seed`` with an uneven output weighting: the output and the
    gradients of x and of every parameter."""
    for t in [x, *module.parameters()]:
        t.grad = None
    torch.manual_seed(seed)
    out = module(x, **call)
    (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
    grads = {"x": x.grad.clone(), **{n: p.grad.clone() for n, p in module.named_parameters()}}
    return out.detach(), grads


def assert_close(got: dict, want: dict, tolerance: float) -> None:
    assert got.keys() == want.keys()
    worst = {name: relative_error(got[name], want[name]) for name in want}
    assert max(worst.values()) <= tolerance, worst


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


# -- every mode, one switch ----------------------------------------------------------------------


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_every_mode_runs_the_blocks_and_trains_all_of_them(memory):
    module = make(memory)
    assert type(module) is KINDS[memory]
    out, grads = step(module, inputs())
    assert out.shape == (BATCH, T, D) and out.dtype == torch.float64
    assert all(g.abs().sum() > 0 for name, g in grads.items()), "every parameter and the input get a gradient"
    module.eval()
    with torch.no_grad():
        assert torch.isfinite(module(inputs())).all()


def test_the_state_dict_has_the_same_keys_in_every_mode():
    keys = {memory: list(make(memory).state_dict()) for memory in MEMORY_MODES}
    assert keys["standard"] and all(k.startswith("blocks.") for k in keys["standard"])
    assert all(k == keys["standard"] for k in keys.values()), keys


@pytest.mark.parametrize("trained_in", MEMORY_MODES)
def test_weights_trained_in_one_mode_load_into_every_other(trained_in):
    source = make(trained_in)
    optimiser = torch.optim.SGD(source.parameters(), lr=0.1)
    step(source, inputs())
    optimiser.step()
    trained = source.state_dict()
    assert not torch.equal(trained["blocks.0.mlp.fc.weight"], make(trained_in).state_dict()["blocks.0.mlp.fc.weight"])
    x = inputs(5).detach()
    evaluated = {}
    for memory in MEMORY_MODES:
        target = make(memory)
        target.load_state_dict(trained)  # strict
        for name, value in target.state_dict().items():
            assert torch.equal(value, trained[name]), (memory, name)
        with torch.no_grad():
            evaluated[memory] = target.eval()(x)
    # evaluation is the same function of the weights in the modes that share a forward
    assert torch.equal(evaluated["standard"], evaluated["checkpoint"])
    assert torch.equal(evaluated["standard"], evaluated["mesa"])
    assert torch.equal(evaluated["bdia"], evaluated["bdia+mesa"])


# -- gradients against plain autograd --------------------------------------------------------------


def test_checkpoint_gives_the_gradients_of_standard():
    x = inputs()
    out_ref, want = step(make("standard"), x)
    out, got = step(make("checkpoint"), x)
    assert torch.equal(out, out_ref)  # dropout replayed in the recomputation
    assert_close(got, want, 1e-12)


def test_mesa_keeps_the_forward_and_without_compression_the_gradients_of_standard():
    x = inputs()
    out_ref, want = step(make("standard"), x)
    out, got = step(make("mesa", **NO_COMPRESSION), x)
    assert torch.equal(out, out_ref)
    assert_close(got, want, 1e-12)
    out, lossy = step(make("mesa", **ALL_COMPRESSED), x)
    assert torch.equal(out, out_ref)  # 8-bit storage touches only what backward reads
    assert min(cosine(lossy[name], want[name]) for name in want) > 0.99


@pytest.mark.parametrize("memory", ["bdia", "bdia+mesa"])
def test_bdia_modes_give_the_gradients_of_plain_autograd_on_the_same_forward(memory):
    """The reversible backward against ``reversible = False`` (plain autograd on the same quantised forward),
    with the same signs of gamma; for bdia+mesa with nothing compressed, so only the plumbing is compared."""
    module = make(memory, **(NO_COMPRESSION if memory == "bdia+mesa" else {}))
    x, signs = inputs(), random_signs(DEPTH, BATCH, torch.Generator().manual_seed(4))
    out, got = step(module, x, gammas=signs)
    module.reversible = False
    out_ref, want = step(module, x, gammas=signs)
    assert torch.equal(out, out_ref)
    assert_close(got, want, 1e-10)


def test_bdia_mesa_is_bdia_with_8_bit_recomputation():
    x, signs = inputs(), random_signs(DEPTH, BATCH, torch.Generator().manual_seed(4))
    out_ref, want = step(make("bdia"), x, gammas=signs)
    out, got = step(make("bdia+mesa", **ALL_COMPRESSED, check=True), x, gammas=signs)  # every state compared
    assert torch.equal(out, out_ref)
    assert min(cosine(got[name], want[name]) for name in want) > 0.99
    assert any(not torch.equal(got[name], want[name]) for name in want), "the 8-bit codes must be in use"


# -- bdia+mesa through the recompute context -------------------------------------------------------


def test_bdia_mesa_fills_the_mesa_report_through_the_recompute_context():
    module = make("bdia+mesa", **ALL_COMPRESSED)
    model = torch.nn.Sequential(module)
    assert compressors_in(model) == {"0": module.compressor}  # what `revbits memory` prints tables from
    x = inputs()
    torch.manual_seed(0)
    out = module(x)
    assert module.compressor.report.bytes_before == 0  # cleared by the forward; the backward recomputes
    out.square().sum().backward()
    report = module.compressor.report
    assert {"linear", "layer_norm", "gelu", "scaled_dot_product_attention"} <= set(report.compressed)
    assert 0 < report.bytes_after < report.bytes_before
    filled = report.bytes_before
    step(module, x)
    assert module.compressor.report.bytes_before == filled  # the next step's report replaces this one


def test_the_recompute_context_is_entered_around_every_recomputed_block():
    entered: list[int] = []
    saved: list[int] = []

    @contextlib.contextmanager
    def context(k: int):
        entered.append(k)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(k) or t, lambda t: t):
            yield

    x, signs = inputs(), random_signs(DEPTH, BATCH, torch.Generator().manual_seed(4))
    _, want = step(make("bdia"), x, gammas=signs)
    module = make("bdia", recompute_context=context, batch_chunks=1)
    out = module(x, gammas=signs)
    assert entered == []  # the forward keeps no graph, so it recomputes nothing
    entered.clear()
    _, got = step(module, x, gammas=signs)
    assert entered == list(range(DEPTH - 1, -1, -1))  # block K-1 first, block 0 last
    assert sorted(set(saved)) == list(range(DEPTH))  # every block's recomputation saved inside it
    assert_close(got, want, 0.0)
    assert out.shape == x.shape


class Overflowing(torch.nn.Module):
    """y = x, through an internal exp(1e4 x) that is inf wherever x > 0: a finite stream whose recomputed
    graph saves a non-finite tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.nan_to_num(torch.exp(x * 1e4) * 0.0, nan=0.0)


def test_a_non_finite_recomputed_activation_raises_in_the_backward():
    module = revbits.stack([Overflowing() for _ in range(3)], memory="bdia+mesa", **ALL_COMPRESSED).double()
    out = module(inputs())  # the forward keeps no graph: nothing is saved, nothing to check yet
    with pytest.raises(NonFiniteActivationError, match="NaN or inf"):
        out.sum().backward()


# -- bad input -------------------------------------------------------------------------------------


def test_an_unknown_mode_is_named():
    with pytest.raises(ValueError, match=r"unknown memory mode 'mesa8'; choose one of standard, checkpoint"):
        revbits.stack(blocks(), memory="mesa8")


@pytest.mark.parametrize(
    "memory, options, named",
    [
        ("standard", {"bits": 9}, "bits"),
        ("checkpoint", {"channel_group": 2}, "channel_group"),
        ("mesa", {"bits": 9, "channel_group": 2}, "bits"),
        ("bdia", {"channel_group": 2}, "channel_group"),
        ("bdia", {"ranges": "ema", "bits": 9}, "ranges"),
        ("bdia+mesa", {"recompute_context": None}, "recompute_context"),
        ("bdia+mesa", {"bogus": 1, "bits": 9}, "bogus"),
    ],
)
def test_an_option_of_another_mode_is_named(memory, options, named):
    message = f"option(s) {named} do not apply to memory={memory!r}"
    with pytest.raises(TypeError) as info:
        revbits.stack(blocks(), memory=memory, **options)
    assert str(info.value) == message


def test_options_reach_their_module():
    bdia = revbits.stack(blocks(), memory="bdia+mesa", bits=8, gamma=0.25, channel_group=4, ranges="ema")
    assert (bdia.bits, bdia.gamma, bdia.compressor.config.channel_group, bdia.compressor.config.ranges) == (
        8,
        0.25,
        4,
        "ema",
    )
    mesa = revbits.stack(blocks(), memory="mesa", momentum=0.5)
    assert mesa.compressor.config.momentum == 0.5
    with pytest.raises(ValueError, match="momentum must be in"):
        revbits.stack(blocks(), memory="mesa", momentum=2.0)
    with pytest.raises(ValueError, match="bits must be an integer from 1 to 23, got 0"):
        revbits.stack(blocks(), memory="bdia", bits=0)


def test_a_deep_copy_keeps_the_recompute_context_on_its_own_compressor():
    module = make("bdia+mesa", **ALL_COMPRESSED)
    twin = copy.deepcopy(module)
    assert twin.compressor is not module.compressor
    step(twin, inputs())
    assert twin.compressor.report.bytes_before > 0 and module.compressor.report.bytes_before == 0
