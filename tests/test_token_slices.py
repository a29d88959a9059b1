"""BDIA's token slices: token-wise modules run on slices of the sequence in training, exactly, with one
slice's graph at a time in the backward, and whole at evaluation."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import revbits
from helpers import (
    converted_steps,
    gpt_blocks,
    random_signs,
    relative_error,
    reversible_against_plain,
    reversible_and_plain_agree_under_autocast,
    run_step,
    tiny_llama_config,
)
from revbits.bdia import token_slices
from revbits.bdia.token_slices import slice_bounds, slicing
from revbits.measure import measure_training_step
from revbits.models import TransformerBlock
from revbits.models.blocks import MLP

pytestmark = pytest.mark.usefixtures("one_thread")



def rows_seen_by_mlps(stack: nn.Module) -> list[int]:
    """A list that records the number of positions of every call of the MLPs' first linear layer."""
    seen: list[int] = []
    for block in stack.blocks:
        block.mlp.fc.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2]))
    return seen


# -- exactness ---------------------------------------------------------------------------------


@pytest.mark.parametrize("token_slice", [1, 4, 7, 40])
@pytest.mark.parametrize("batch_chunks", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sliced_stack_rebuilds_exactly_and_matches_plain_autograd(token_slice, batch_chunks, dtype):
    """check=True compares every rebuilt state bitwise; dropout inside the MLP is replayed slice by slice."""
    torch.manual_seed(0)
    depth, batch = 5, 3
    stack = revbits.BDIAStack(
        gpt_blocks(depth, dropout=0.2), check=True, batch_chunks=batch_chunks, token_slice=token_slice
    ).to(dtype)
    x = torch.randn(batch, 23, 32, dtype=dtype, requires_grad=True)
    seen = rows_seen_by_mlps(stack)
    reversible_against_plain(stack, x, signs=random_signs(depth, batch), dtype=dtype)
    assert max(seen) <= token_slice, "the MLPs ran on slices of the positions of each batch chunk"


class TokenWiseBlock(nn.Module):
    """x + MLP(LN x): a block without attention, so that a long sequence stays cheap."""

    def __init__(self, d_model: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d_model)
        self.mlp = MLP(d_model, ratio=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.ln(x))


def test_auto_slices_hold_at_least_512_positions_and_2_18_elements():
    """"auto" slices of max(512, 2**18 / d) positions: 512 for an LLM's width, longer for a narrow stream,
    whose slices would otherwise cost more time than they save memory."""
    assert token_slices.slice_length("auto", 1024) == 512 and token_slices.slice_length("auto", 4096) == 512
    assert token_slices.slice_length("auto", 128) == 2048 and token_slices.slice_length(40, 128) == 40
    torch.manual_seed(1)
    stack = revbits.BDIAStack([TokenWiseBlock(8) for _ in range(3)], check=True).double()
    assert stack.token_slice == "auto"
    x = torch.randn(1, 70000, 8, dtype=torch.float64, requires_grad=True)  # 2**18 / 8 = 32768 positions a slice
    seen = rows_seen_by_mlps(stack)
    reversible_against_plain(stack, x, signs=random_signs(3, 1))
    assert set(seen) == {23333, 23334}, "70000 positions in 3 slices of at most 32768"
    seen.clear()
    run_step(stack, x[:, :32768].detach().requires_grad_(), signs=random_signs(3, 1))
    assert set(seen) == {32768}, "32768 positions run whole"


def test_slices_change_where_the_mlp_runs_not_what_it_computes():
    """Without dropout, sliced and whole agree to rounding (not bitwise: a matmul on fewer rows may round
    differently, which is why every pass that must agree bitwise slices alike)."""
    torch.manual_seed(2)
    stack = revbits.BDIAStack(gpt_blocks(4)).double()
    x = torch.randn(2, 20, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(4, 2)
    results = []
    for token_slice in (None, 3):
        stack.token_slice = token_slice
        results.append(run_step(stack, x, (), signs))
    (out_a, grads_a), (out_b, grads_b) = results
    assert relative_error(out_a, out_b) <= 1e-12
    assert max(relative_error(grads_a[n], grads_b[n]) for n in grads_a) <= 1e-10


def test_evaluation_and_no_grad_never_slice():
    torch.manual_seed(3)
    stack = revbits.BDIAStack(gpt_blocks(3), token_slice=4, quantize_eval=False).double().eval()
    x = torch.randn(2, 13, 32, dtype=torch.float64)
    seen = rows_seen_by_mlps(stack)
    out = stack(x)
    with torch.no_grad():
        out_no_grad = stack(x)
    expected = x
    for block in stack.blocks:
        token_slices.uninstall(block.mlp)
        expected = block(expected)
    assert torch.equal(out, expected) and torch.equal(out_no_grad, expected)
    assert set(seen) == {13}
    assert stack.blocks[0].mlp(x).shape == x.shape  # outside a stack it is the plain module


def test_bdia_mesa_rebuilds_exactly_with_token_slices():
    torch.manual_seed(4)
    depth, batch = 4, 2
    blocks = gpt_blocks(depth, dropout=0.1)
    exact = revbits.stack(blocks, memory="bdia", check=True, token_slice=5).double()
    mesa = revbits.stack(blocks, memory="bdia+mesa", check=True, token_slice=5).double()
    x = torch.randn(batch, 17, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(depth, batch)
    out_exact, grads_exact = run_step(exact, x, (), signs)
    out_mesa, grads_mesa = run_step(mesa, x, (), signs)  # check=True: every rebuilt state compared bitwise
    assert torch.equal(out_mesa, out_exact)
    for name in grads_exact:
        cos = torch.nn.functional.cosine_similarity(grads_mesa[name].flatten(), grads_exact[name].flatten(), dim=0)
        assert cos >= 0.99, name


def test_sliced_stack_is_exact_under_bf16_autocast():
    torch.manual_seed(5)
    stack = revbits.BDIAStack(gpt_blocks(4, dropout=0.1), token_slice=6)
    x = torch.randn(2, 19, 32, requires_grad=True)
    reversible_and_plain_agree_under_autocast(stack, x, random_signs(4, 2), "cpu", autocast=True)


# -- memory ------------------------------------------------------------------------------------


def backward_peak(token_slice: int | None) -> int:
    torch.manual_seed(6)
    blocks = [TransformerBlock(16, 2, causal=True, mlp_ratio=16) for _ in range(3)]
    stack = revbits.BDIAStack(blocks, token_slice=token_slice).train()
    x = torch.randn(1, 1024, 16)
    return measure_training_step(stack, lambda: stack(x).square().mean()).activations


def test_token_slices_cut_the_backward_peak_at_batch_1():
    """Batch 1, 1024 positions, an MLP 16 times as wide as the stream: batch chunks have nothing to slice, and
    one block's recomputed graph sets the peak. In slices of 64 positions its MLP part shrinks to one slice's
    (measured: 0.31 of the unsliced peak; the rest is attention's graph and the states)."""
    whole, sliced = backward_peak(None), backward_peak(64)
    assert sliced <= 0.4 * whole, (sliced, whole)


# -- installing --------------------------------------------------------------------------------


def test_installing_keeps_module_tree_and_state_dict_and_uninstall_restores_the_module():
    blocks = gpt_blocks(2)
    names = [n for b in blocks for n, _ in b.named_modules()]
    keys = [k for b in blocks for k in b.state_dict()]
    stack = revbits.BDIAStack(blocks)
    mlp = stack.blocks[0].mlp
    assert token_slices.is_installed(mlp) and type(mlp).__name__ == "MLP"
    assert [n for b in stack.blocks for n, _ in b.named_modules()] == names
    assert [k for b in stack.blocks for k in b.state_dict()] == keys
    token_slices.install(mlp)  # idempotent
    assert type(mlp).__mro__[1] is MLP
    for twin in (copy.deepcopy(stack), pickle.loads(pickle.dumps(stack))):
        twin_mlp = twin.blocks[0].mlp
        assert token_slices.is_installed(twin_mlp)
        assert all(a is not b for a, b in zip(twin_mlp.parameters(), mlp.parameters()))
        x = torch.randn(1, 9, 32)
        with slicing(4, checkpoint=False):
            assert torch.equal(twin_mlp(x), mlp(x))
    token_slices.uninstall(mlp)
    assert not token_slices.is_installed(mlp) and type(mlp) is MLP


def test_a_module_that_is_not_token_wise_is_refused_and_other_calls_run_whole():
    class Mean(nn.Module):
        def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
            return x.mean(max(x.dim() - 2, 0), keepdim=True) * scale  # over the positions: not token-wise

    module = token_slices.install(Mean())
    x = torch.randn(2, 9, 4)
    with slicing(3, checkpoint=False):
        assert module(x, scale=2.0).shape == (2, 1, 4)  # a keyword argument: run whole
        assert module(x[0, :, 0]).shape == (1,)  # rank 1: no token dimension, run whole
        with pytest.raises(TypeError, match="installed as token-wise"):
            module(x)


def test_slice_bounds_are_contiguous_and_even():
    assert slice_bounds(10, 4) == [slice(0, 4), slice(4, 7), slice(7, 10)]
    assert slice_bounds(8, 4) == [slice(0, 4), slice(4, 8)]
    assert slice_bounds(3, 8) == [slice(0, 3)]


@pytest.mark.parametrize("value", [0, -2, 1.5, True, "whole"])
def test_bad_option_is_refused(value):
    with pytest.raises(ValueError, match="token_slice must be"):
        revbits.BDIAStack(gpt_blocks(2), token_slice=value)


def test_stack_passes_the_option_through():
    assert revbits.stack(gpt_blocks(2), memory="bdia+mesa", token_slice=64).token_slice == 64
    assert revbits.stack(gpt_blocks(2), memory="bdia", token_slice=None).token_slice is None


# -- transformers ------------------------------------------------------------------------------


def test_llama_decoder_with_lora_runs_its_mlps_in_slices_exactly():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from revbits import hf

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(tiny_llama_config(attn_implementation="sdpa")).double()
    plain = transformers.LlamaForCausalLM(model.config).double()
    plain.load_state_dict(model.state_dict())
    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "gate_proj", "down_proj"], lora_dropout=0.1)
    model = peft.get_peft_model(model, lora)
    names, keys = [n for n, _ in model.named_modules()], list(model.state_dict())
    hf.convert(model, "bdia", token_slice=4, check=True)
    assert [n for n, _ in model.named_modules()] == names and list(model.state_dict()) == keys
    mlp = model.base_model.model.model.layers[1].mlp
    seen: list[int] = []
    mlp.up_proj.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[-2]))
    model.train()
    ids = torch.randint(0, 64, (2, 13), generator=torch.Generator().manual_seed(1))
    (loss_a, grads_a), (loss_b, grads_b) = converted_steps(model, ids)
    assert torch.equal(loss_a, loss_b)
    assert max(relative_error(grads_a[n], grads_b[n]) for n in grads_b) <= 1e-10
    assert max(seen) == 4
    model.eval()
    seen.clear()
    hf.revbits_stack(model).quantize_eval = False
    with model.disable_adapter(), torch.no_grad():
        logits = model(input_ids=ids).logits
    assert set(seen) == {13}
    assert torch.equal(logits, plain(input_ids=ids).logits)  # evaluation is the plain model, unsliced
    hf.restore(model)
    assert not token_slices.is_installed(mlp)


def test_gpt2_and_checkpoint_mode():
    transformers = pytest.importorskip("transformers")
    from revbits import hf

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=3, n_embd=32, n_head=4, vocab_size=50, n_positions=32)
    model = transformers.GPT2LMHeadModel(config).double()
    hf.convert(model, "checkpoint")
    assert not any(token_slices.is_installed(layer.mlp) for layer in model.transformer.h)
    hf.restore(model)
    hf.convert(model, "bdia", token_slice=5, check=True)
    assert all(token_slices.is_installed(layer.mlp) for layer in model.transformer.h)
    model.train()
    ids = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(1))
    (loss_a, grads_a), (loss_b, grads_b) = converted_steps(model, ids)
    assert torch.equal(loss_a, loss_b)
    assert len(grads_b) == len(list(model.parameters()))  # every parameter trains
    assert max(relative_error(grads_a[n], grads_b[n]) for n in grads_b) <= 1e-10


def test_bdia_mesa_slices_tokens_by_default_as_bdia():
    """bdia+mesa takes bdia's "auto" default (benchmarks/layer_floor.py: with slices 13.0 states per token at
    Qwen3-0.6B's width and T = 4096, without 28.1)."""
    assert revbits.stack(gpt_blocks(2), memory="bdia+mesa").token_slice == "auto"
    assert revbits.stack(gpt_blocks(2), memory="bdia").token_slice == "auto"
    assert revbits.stack(gpt_blocks(2), memory="bdia+mesa", token_slice=None).token_slice is None


def test_bdia_mesa_slices_a_converted_qwen3_with_lora():
    """bdia+mesa with token slices on a converted Qwen3 (LoRA on every linear, 13 positions in slices of 4,
    Mesa compressing every saved tensor): the slices' checkpoints used to save their inputs through Mesa's hooks
    and re-run on rounded contiguous copies, another matmul path, which raised a CheckpointError. The loss is
    BDIA's bit for bit; the gradients see Mesa's rounding only."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from helpers import tiny_decoder_config
    from revbits import hf

    linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ids = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(1))
    results = {}
    for memory, options in (("bdia", {}), ("bdia+mesa", {"min_numel": 16})):
        torch.manual_seed(0)
        config = tiny_decoder_config(transformers.Qwen3Config, head_dim=8, attn_implementation="sdpa")
        model = peft.get_peft_model(transformers.Qwen3ForCausalLM(config), peft.LoraConfig(r=4, target_modules=linears))
        for name, p in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(p, std=0.1)  # nonzero, so every adapter has a gradient
        hf.convert(model, memory, token_slice=4, check=True, **options)
        seen: list[int] = []
        mlp = model.base_model.model.model.layers[1].mlp
        mlp.down_proj.register_forward_pre_hook(lambda module, args, seen=seen: seen.append(args[0].shape[-2]))
        model.train()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert max(seen) == 4, "the MLPs ran in slices of 4 positions"
        results[memory] = (loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    (loss_exact, grads_exact), (loss_mesa, grads_mesa) = results["bdia"], results["bdia+mesa"]
    assert torch.equal(loss_mesa, loss_exact)
    for name, grad in grads_exact.items():  # 8-bit codes of 8- to 64-wide activations: unsliced, the worst is 0.958
        cos = torch.nn.functional.cosine_similarity(grads_mesa[name].flatten(), grad.flatten(), dim=0)
        assert cos >= 0.9, name
