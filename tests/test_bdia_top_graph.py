"""keep_last_graph: the forward keeps the top block's graph, the backward does not recompute it, and every result
is the recompute path's bit for bit (revbits.bdia.top_graph)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import revbits
from helpers import gpt_blocks, random_signs, run_step, tiny_llama_config
from revbits.measure import measure_training_step


class Counted(nn.Module):
    """A block that counts its calls."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block, self.calls = block, 0

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        self.calls += 1
        return self.block(x, *args)


def counted_stacks(depth: int, memory: str = "bdia", **options) -> tuple[nn.Module, nn.Module]:
    """Two stacks of the same counted blocks (shared weights): one keeping the top block's graph, one not."""
    blocks = [Counted(b) for b in gpt_blocks(depth, dropout=0.1, cross_attention=True)]
    keep = revbits.stack(blocks, memory=memory, keep_last_graph=True, check=True, **options).double()
    recompute = revbits.stack(blocks, memory=memory, keep_last_graph=False, check=True, **options).double()
    return keep, recompute


def assert_same_step(keep, recompute, x, args, signs, seed: int = 0) -> None:
    out_keep, grads_keep = run_step(keep, x, args, signs, seed)
    out_recompute, grads_recompute = run_step(recompute, x, args, signs, seed)
    assert torch.equal(out_keep, out_recompute)
    assert grads_keep.keys() == grads_recompute.keys()
    for name, grad in grads_recompute.items():
        assert torch.equal(grads_keep[name], grad), name


@pytest.mark.parametrize("chunks", [1, 3])
@pytest.mark.parametrize("memory", ["bdia", "bdia+mesa"])
def test_the_top_block_is_not_recomputed_and_the_step_is_the_recompute_paths_bit_for_bit(chunks, memory):
    torch.manual_seed(0)
    depth, batch = 4, 3
    keep, recompute = counted_stacks(depth, memory, batch_chunks=chunks)
    x = torch.randn(batch, 5, 32, dtype=torch.float64, requires_grad=True)
    encoder = torch.randn(batch, 4, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(depth, batch)
    assert_same_step(keep, recompute, x, (encoder,), signs)
    blocks = list(keep.blocks)
    for block in blocks:
        block.calls = 0
    run_step(keep, x, (encoder,), signs)
    assert [b.calls for b in blocks] == [2 * chunks] * (depth - 1) + [chunks]  # block K-1: the forward's call only
    for block in blocks:
        block.calls = 0
    run_step(recompute, x, (encoder,), signs)
    assert [b.calls for b in blocks] == [2 * chunks] * depth


def test_autograd_grad_and_backward_inputs_match_the_recompute_path():
    torch.manual_seed(1)
    keep, recompute = counted_stacks(3)
    x = torch.randn(2, 5, 32, dtype=torch.float64, requires_grad=True)
    encoder = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(3, 2)
    top = dict(keep.named_parameters())["blocks.2.block.mlp.fc.weight"]
    grads = []
    for stack in (keep, recompute):
        torch.manual_seed(5)
        grads.append(torch.autograd.grad(stack(x, encoder, gammas=signs).square().sum(), [x, top]))
        x.grad = encoder.grad = top.grad = None
        torch.manual_seed(5)
        stack(x, encoder, gammas=signs).square().sum().backward(inputs=[encoder])
        grads.append((encoder.grad,))
        assert x.grad is None and top.grad is None
    for a, b in zip(grads[:2], grads[2:]):
        assert all(torch.equal(s, t) for s, t in zip(a, b))


def test_token_slices_and_a_compiled_block_match_the_recompute_path():
    torch.manual_seed(2)
    blocks = gpt_blocks(3, dropout=0.1)
    blocks[2].compile(backend="eager")
    keep = revbits.BDIAStack(blocks, keep_last_graph=True, token_slice=4, batch_chunks=1, check=True).double()
    recompute = revbits.BDIAStack(blocks, keep_last_graph=False, token_slice=4, batch_chunks=1, check=True).double()
    x = torch.randn(2, 6, 32, dtype=torch.float64, requires_grad=True)
    assert_same_step(keep, recompute, x, (), random_signs(3, 2))


def test_auto_keeps_only_an_unchunked_unsliced_step_without_a_recompute_context():
    x = torch.randn(2, 6, 32)
    signs = random_signs(3, 2)

    def kept(stack) -> bool:
        out = stack(x.requires_grad_(), gammas=signs)
        state = out.grad_fn.state
        result = bool(state.kept)
        out.sum().backward()
        assert not state.kept, "the backward lets go of the kept graph"
        return result

    assert kept(revbits.BDIAStack(gpt_blocks(3)))
    assert not kept(revbits.BDIAStack(gpt_blocks(3), batch_chunks=2))
    assert not kept(revbits.BDIAStack(gpt_blocks(3), token_slice=4))
    assert not kept(revbits.stack(gpt_blocks(3), memory="bdia+mesa"))
    assert not kept(revbits.BDIAStack(gpt_blocks(3), keep_last_graph=False))
    assert kept(revbits.BDIAStack(gpt_blocks(3), keep_last_graph=True, batch_chunks=2))
    with torch.no_grad():  # the evaluation path keeps nothing
        assert revbits.BDIAStack(gpt_blocks(3), keep_last_graph=True)(x).grad_fn is None


def test_a_block_that_is_its_own_fsdp_unit_is_recomputed_and_true_raises():
    class FSDPModule(nn.Module):  # what revbits.bdia.params recognises an FSDP unit by (its class name)
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.inner = block

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.inner(x)

    x = torch.randn(2, 6, 32, requires_grad=True)
    auto = revbits.BDIAStack([FSDPModule(b) for b in gpt_blocks(3)])
    assert not auto(x).grad_fn.state.kept
    keep = revbits.BDIAStack([FSDPModule(b) for b in gpt_blocks(3)], keep_last_graph=True)
    with pytest.raises(ValueError, match="keep_last_graph=True: block 0 is its own FSDP unit"):
        keep(x)
    keep.reversible = False  # the plain-autograd path keeps no graph of its own: nothing to refuse
    assert keep(x).grad_fn is not None
    with pytest.raises(ValueError, match="keep_last_graph must be True, False or 'auto'"):
        revbits.BDIAStack(gpt_blocks(3), keep_last_graph="yes")


def step_peak(keep: bool | str, batch: int, chunks: int | str) -> int:
    torch.manual_seed(3)
    stack = revbits.BDIAStack(gpt_blocks(3, d_model=64, n_heads=4), keep_last_graph=keep, batch_chunks=chunks)
    x = torch.randn(batch, 32, 64)
    return measure_training_step(stack, lambda: stack(x).square().mean()).peak


def test_auto_does_not_raise_the_peak_where_chunks_make_the_recomputed_graph_smaller():
    recompute, keep, auto = (step_peak(k, 8, 4) for k in (False, True, "auto"))
    assert keep > 1.05 * recompute, (keep, recompute)  # every chunk's graph kept: the rule has something to avoid
    assert auto == recompute, (auto, recompute)


def test_keeping_the_graph_does_not_raise_the_peak_of_an_unchunked_step():
    recompute, auto = step_peak(False, 4, 1), step_peak("auto", 4, 1)
    assert auto <= recompute, (auto, recompute)


def encoder_decoder_step(keep: bool | str, calls: bool = False):
    """An encoder stack whose output every decoder block attends to, as in the translator: (peak, output, grads,
    the encoder's block calls)."""
    torch.manual_seed(4)
    encoder_blocks = [Counted(b) for b in gpt_blocks(3, d_model=32, dropout=0.1)]
    encoder = revbits.BDIAStack(encoder_blocks, keep_last_graph=keep, batch_chunks=1)
    decoder = revbits.BDIAStack(gpt_blocks(3, d_model=32, dropout=0.1, cross_attention=True), batch_chunks=1)
    x, y = torch.randn(4, 16, 32, requires_grad=True), torch.randn(4, 16, 32)

    def loss() -> torch.Tensor:
        torch.manual_seed(5)
        return decoder(y, encoder(x)).square().mean()

    peak = measure_training_step(nn.ModuleList([encoder, decoder]), loss).peak
    for block in encoder_blocks:
        block.calls = 0
    x.grad = None
    out = loss()
    out.backward()
    return peak, out.detach(), x.grad, [b.calls for b in encoder_blocks]


def test_a_graph_kept_under_auto_is_dropped_when_another_stack_runs_before_its_backward():
    """The encoder's kept graph would live through the decoder's forward and backward: the decoder's forward drops it
    and the encoder's backward recomputes its top block, so the peak is the recompute path's and the step its bits."""
    peak_recompute, out_recompute, grad_recompute, calls_recompute = encoder_decoder_step(False)
    peak_auto, out_auto, grad_auto, calls_auto = encoder_decoder_step("auto")
    assert torch.equal(out_auto, out_recompute) and torch.equal(grad_auto, grad_recompute)
    assert calls_auto == calls_recompute == [2, 2, 2]
    assert peak_auto == peak_recompute, (peak_auto, peak_recompute)
    peak_keep, out_keep, grad_keep, calls_keep = encoder_decoder_step(True)  # True keeps it whatever runs after
    assert torch.equal(out_keep, out_recompute) and torch.equal(grad_keep, grad_recompute)
    assert calls_keep == [2, 2, 1] and peak_keep > peak_recompute


def test_the_option_reaches_the_stack_from_revbits_train_and_hf_convert_turns_it_off():
    from revbits.train import TrainConfig
    from revbits.train.config import ConfigError

    assert "keep_last_graph" not in TrainConfig(model="gpt", memory="bdia").memory_options  # the builder's default
    assert TrainConfig(model="gpt", memory="bdia", keep_last_graph="off").memory_options["keep_last_graph"] is False
    options = TrainConfig(model="gpt", memory="bdia+mesa", keep_last_graph="on").memory_options
    assert revbits.stack(gpt_blocks(2), memory="bdia+mesa", **options).keep_last_graph is True
    with pytest.raises(ConfigError, match="keep_last_graph must be auto, on or off"):
        TrainConfig(model="gpt", memory="bdia", keep_last_graph="yes")
    transformers = pytest.importorskip("transformers")
    from revbits import hf

    model = hf.convert(transformers.LlamaForCausalLM(tiny_llama_config()), "bdia")
    assert hf.revbits_stack(model).keep_last_graph is False
