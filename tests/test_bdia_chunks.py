"""BDIA on batch chunks: exact for every chunk setting, smaller backward, and the argument rule."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revbits
from helpers import converted_steps, gpt_blocks, random_signs, relative_error, reversible_against_plain, run_step
from revbits.bdia.chunks import BatchSplit, plan_split
from revbits.measure import measure_training_step

pytestmark = pytest.mark.usefixtures("one_thread")

SETTINGS = [1, 2, 3, 5, 9, "auto"]  # with batch 5: whole, uneven, uneven, one sample each, more than B


# -- exactness for every chunk setting ---------------------------------------------------------


@pytest.mark.parametrize("keep", ["auto", True, False])
@pytest.mark.parametrize("chunks", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_dropout_stack_is_exact_for_every_chunk_setting(chunks, dtype, keep):
    torch.manual_seed(0)
    depth, batch = 7, 5
    blocks = gpt_blocks(depth, dropout=0.2)
    stack = revbits.BDIAStack(blocks, check=True, batch_chunks=chunks, keep_last_graph=keep).to(dtype)
    x = torch.randn(batch, 6, 32, dtype=dtype, requires_grad=True)
    reversible_against_plain(stack, x, signs=random_signs(depth, batch), dtype=dtype)


@pytest.mark.parametrize("chunks", SETTINGS)
def test_causal_mask_argument_is_passed_whole_and_exact(chunks):
    torch.manual_seed(1)
    stack = revbits.BDIAStack(gpt_blocks(5, dropout=0.1), check=True, batch_chunks=chunks).double()
    x = torch.randn(5, 6, 32, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(6, 6, dtype=torch.bool).tril()  # [T, T]: no batch dimension
    reversible_against_plain(stack, x, (mask,), random_signs(5, 5))


@pytest.mark.parametrize("chunks", SETTINGS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_cross_attention_with_padding_mask_is_exact_for_every_chunk_setting(chunks, dtype):
    torch.manual_seed(2)
    depth, batch = 6, 5
    stack = revbits.BDIAStack(
        gpt_blocks(depth, dropout=0.1, cross_attention=True), check=True, batch_chunks=chunks
    ).to(dtype)
    x = torch.randn(batch, 7, 32, dtype=dtype, requires_grad=True)
    memory = torch.randn(batch, 4, 32, dtype=dtype, requires_grad=True)  # [B, S, d]: split with x
    keep = torch.ones(batch, 4, dtype=torch.bool)
    keep[1, 3:] = keep[3, 2:] = False
    mask = keep[:, None, None, :]  # [B, 1, 1, S], laid out like an attention mask: split with x
    _, grads = reversible_against_plain(stack, x, (memory, mask), random_signs(depth, batch), dtype=dtype)
    assert grads["arg0"][1, 3:].abs().max() == 0, "padded memory positions get no gradient"
    assert grads["arg0"].abs().sum() > 0


def test_an_argument_without_batch_dimension_gets_its_gradient_summed_over_chunks():
    torch.manual_seed(3)
    stack = revbits.BDIAStack(gpt_blocks(4, dropout=0.1), check=True, batch_chunks=3).double()
    x = torch.randn(6, 5, 32, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, 5, dtype=torch.float64, requires_grad=True)  # [T, T] additive attention bias
    _, grads = reversible_against_plain(stack, x, (bias,), random_signs(4, 6))
    assert grads["arg0"].abs().sum() > 0


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_bdia_mesa_rebuilds_exactly_for_every_chunk_setting(chunks):
    torch.manual_seed(4)
    depth, batch = 5, 4
    blocks = gpt_blocks(depth, dropout=0.1)
    exact = revbits.stack(blocks, memory="bdia", check=True, batch_chunks=chunks).double()
    mesa = revbits.stack(blocks, memory="bdia+mesa", check=True, batch_chunks=chunks).double()
    x = torch.randn(batch, 8, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(depth, batch)
    out_exact, grads_exact = run_step(exact, x, (), signs)
    out_mesa, grads_mesa = run_step(mesa, x, (), signs)  # check=True: every rebuilt state compared bitwise
    mesa.reversible = False
    out_plain, _ = run_step(mesa, x, (), signs)
    assert torch.equal(out_mesa, out_exact) and torch.equal(out_mesa, out_plain)
    for name in grads_exact:
        cos = F.cosine_similarity(grads_mesa[name].flatten(), grads_exact[name].flatten(), dim=0)
        assert cos >= 0.99, name


def test_chunked_and_whole_batch_compute_the_same_function():
    """Chunking changes where the block runs, not what it computes: without dropout the chunked and the
    whole-batch steps agree to rounding (not bitwise: a matmul on fewer rows may round differently)."""
    torch.manual_seed(5)
    stack = revbits.BDIAStack(gpt_blocks(5)).double()
    x = torch.randn(6, 5, 32, dtype=torch.float64, requires_grad=True)
    signs = random_signs(5, 6)
    results = []
    for chunks in (1, 4):
        stack.batch_chunks = chunks
        results.append(run_step(stack, x, (), signs))
    (out_a, grads_a), (out_b, grads_b) = results
    assert relative_error(out_a, out_b) <= 1e-12
    assert max(relative_error(grads_a[n], grads_b[n]) for n in grads_a) <= 1e-10


# -- memory ------------------------------------------------------------------------------------


class Scale(nn.Module):
    """y = w x: a block whose recomputed graph keeps no state-sized tensor of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.tensor(0.75))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.w


def backward_peak_in_states(chunks: int, batch: int = 16) -> float:
    torch.manual_seed(7)
    stack = revbits.BDIAStack([Scale() for _ in range(6)], batch_chunks=chunks).train()
    x, weights = torch.randn(batch, 64, 128), torch.randn(batch, 64, 128)
    # a loss whose own backward makes one state-sized tensor, grad_out, and keeps nothing else
    report = measure_training_step(stack, lambda: (stack(x) * weights).sum())
    return report.activations / (x.numel() * x.element_size())


def test_the_backward_keeps_at_most_five_state_sized_tensors_with_chunks():
    """Documented in docs/bdia.md: x_k, x_{k+1}, dL/dx_{k+1}, dL/dx_{k+2} (overwritten by dL/dx_k), and
    autograd's grad_out or, during the last block, the output x_K; the packed planes add 1/32 state per
    block and the chunk temporaries a few sixteenths."""
    chunked = backward_peak_in_states(16)
    assert chunked <= 5.6, chunked
    assert backward_peak_in_states(1) >= chunked + 1.5  # whole-batch temporaries: y, u, grad_y, ...


def test_chunks_cut_the_backward_peak_of_a_transformer_stack():
    torch.manual_seed(8)
    x = torch.randn(8, 128, 64)
    peaks = {}
    for chunks in (1, 8):
        stack = revbits.BDIAStack(gpt_blocks(4, d_model=64, n_heads=4), batch_chunks=chunks).train()
        peaks[chunks] = measure_training_step(stack, lambda s=stack: s(x).square().mean()).activations
    assert peaks[8] <= 0.5 * peaks[1], peaks


# -- the argument rule -------------------------------------------------------------------------


def test_split_slices_are_contiguous_and_even():
    assert BatchSplit.into(7, 3).slices == (slice(0, 3), slice(3, 5), slice(5, 7))
    assert BatchSplit.into(2, 5).chunks == 2
    assert BatchSplit.into(4, 1).slices == (slice(0, 4),)


def test_auto_splits_only_streams_large_enough_to_pay_for_it():
    """Every chunk holds at least 2**18 stream elements: smaller ones cost more time than they save memory
    (benchmarks/bdia_overhead.py: 8 chunks at the main job's GPT took 1.18x the time of one)."""
    blocks = gpt_blocks(2)
    assert plan_split("auto", torch.zeros(8, 16, 32), [], blocks).chunks == 1  # 4096 elements
    assert plan_split("auto", torch.zeros(16, 256, 64), [], blocks).chunks == 1  # 2**18 elements
    assert plan_split("auto", torch.zeros(16, 256, 128), [], blocks).chunks == 2  # the main job's GPT: 2**19
    assert plan_split("auto", torch.zeros(8, 1024, 256), [], blocks).chunks == 8
    assert plan_split("auto", torch.zeros(2, 1024, 256), [], blocks).chunks == 2
    assert plan_split("auto", torch.zeros(64, 1024, 256), [], blocks).chunks == 8


def test_rule_for_block_arguments():
    x, blocks = torch.zeros(4, 6, 32), gpt_blocks(2)
    args = [torch.zeros(6, 6), torch.zeros(4, 9, 32), torch.zeros(4, 1, 1, 9), torch.zeros(1, 6, 32)]
    split = plan_split(2, x, args, blocks)
    assert split.chunks == 2
    assert split.tensor(torch.zeros(6, 6), 0).shape == (6, 6)  # a [T, T] mask: whole
    assert split.tensor(torch.zeros(4, 9, 32), 1).shape == (2, 9, 32)  # an encoder output: split
    assert split.tensor(torch.zeros(4, 1, 1, 9), 0).shape == (2, 1, 1, 9)  # an attention-layout mask: split
    nested = split.tree([(torch.zeros(4, 9, 32), torch.zeros(1, 6, 32)), {"m": torch.zeros(4, 1, 6, 6)}], 0)
    assert nested[0][0].shape == (2, 9, 32) and nested[0][1].shape == (1, 6, 32) and nested[1]["m"].shape[0] == 2


@pytest.mark.parametrize(
    "arg", [torch.zeros(4, 9, dtype=torch.bool), torch.zeros(4, 6, 6), (torch.zeros(4, 6, 6),)], ids=str
)
def test_an_argument_whose_first_dimension_may_or_may_not_be_the_batch_is_refused(arg):
    x, blocks = torch.zeros(4, 6, 32), gpt_blocks(2)
    with pytest.raises(ValueError, match="unclear whether it carries the batch"):
        plan_split(2, x, [arg], blocks)
    big = torch.zeros(4, 512, 256)
    assert plan_split("auto", big, [], blocks).chunks == 2
    assert plan_split("auto", big, [arg], blocks).chunks == 1  # auto runs the step unsplit instead


def test_a_block_with_batch_norm_is_not_split():
    blocks = [nn.Sequential(nn.Flatten(0, 0), nn.BatchNorm1d(6)) for _ in range(2)]
    x = torch.zeros(4, 6, 32)
    with pytest.raises(ValueError, match="mixes the samples"):
        plan_split(2, x, [], blocks)
    assert plan_split("auto", torch.zeros(8, 6, 2**15), [], blocks).chunks == 1
    for block in blocks:
        block.eval()
    assert plan_split(2, x, [], blocks).chunks == 2


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "whole", None])
def test_bad_option_is_refused(value):
    with pytest.raises(ValueError, match="batch_chunks must be"):
        revbits.BDIAStack(gpt_blocks(2), batch_chunks=value)


def test_stack_passes_the_option_through():
    body = revbits.stack(gpt_blocks(2), memory="bdia+mesa", batch_chunks=3)
    assert body.batch_chunks == 3
    assert revbits.stack(gpt_blocks(2), memory="bdia").batch_chunks == "auto"


def test_training_command_exposes_the_option():
    from revbits.train import TrainConfig
    from revbits.train.config import ConfigError

    assert TrainConfig(model="gpt", memory="bdia").memory_options["batch_chunks"] == "auto"
    assert TrainConfig(model="gpt", memory="bdia+mesa", batch_chunks="4").memory_options["batch_chunks"] == 4
    with pytest.raises(ConfigError, match="batch_chunks must be"):
        TrainConfig(model="gpt", memory="bdia", batch_chunks="0")


@pytest.mark.parametrize("chunks", [1, 2, 4])
def test_llama_decoder_with_lora_is_exact_in_chunks(chunks):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from revbits import hf

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa", attention_dropout=0.1,
    )
    model = transformers.LlamaForCausalLM(config).double()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    hf.convert(model, "bdia", batch_chunks=chunks, check=True)
    model.train()
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(1))
    (loss_a, grads_a), (loss_b, grads_b) = converted_steps(model, ids)
    assert torch.equal(loss_a, loss_b)
    assert max(relative_error(grads_a[n], grads_b[n]) for n in grads_b) <= 1e-10
