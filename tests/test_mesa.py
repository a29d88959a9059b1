"""Mesa mode: 8-bit codes for saved activations, exclusions, dedup, rounding, gradients, memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revbits
from helpers import gpt_blocks
from revbits.measure import measure_training_step
from revbits.mesa import Compressor, MesaConfig, NonFiniteActivationError
from revbits.mesa.quantizer import CODE_MAX, GroupLayout, dequantize, group_range, layout_for, quantize_codes
from revbits.models import GPT, ViT
from revbits.models.gpt import GPTConfig
from revbits.models.vit import ViTConfig


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def step_gradients(model: nn.Module, loss_fn, seed: int = 1) -> tuple[torch.Tensor, list[torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = loss_fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in model.parameters()]


# -- the quantiser -----------------------------------------------------------------------------


def test_values_beyond_the_range_saturate_at_both_ends_and_never_wrap():
    x = torch.tensor([-100.0, -1.0, -0.5, 0.0, 0.5, 1.0, 1.004, 3.0, 1e6]).view(1, -1)
    low, high = torch.tensor([[-1.0]]), torch.tensor([[1.0]])
    generator = torch.Generator().manual_seed(0)
    codes, step = quantize_codes(x, low, high, generator)
    assert codes.dtype == torch.uint8
    assert codes[0, 0] == 0 and codes[0, 1] == 0  # below the range: the low end, not 255
    assert codes[0, -3:].tolist() == [CODE_MAX] * 3  # above: the high end; 1e6 does not wrap to a small code
    restored = dequantize(codes, low, step, torch.float32)
    assert restored.min() == -1.0 and torch.allclose(restored.max(), torch.tensor(1.0))
    assert (restored[0, 2:6] - x[0, 2:6]).abs().max() <= step.item()


def test_running_ranges_clamp_a_batch_that_outgrows_them():
    compressor = Compressor(MesaConfig(ranges="ema", momentum=0.9, min_numel=0))
    x = torch.randn(4, 8, 64, requires_grad=True)
    for scale in (1.0, 50.0):  # the second batch is far outside the running range
        with compressor.saving():
            y = (x * scale).sin()
        restored = y.grad_fn._saved_self
        bound = 0.9 * 1.0 * x.detach().abs().max() + 0.1 * 50.0 * x.detach().abs().max() + 1e-4
        assert restored.abs().max() <= bound
    # saturated, not wrapped: the extreme inputs map to the extreme ends of the running range
    biggest = (x.detach() * 50).argmax()
    assert restored.flatten()[biggest] == restored.max()


def test_a_constant_group_is_restored_without_dividing_by_zero():
    x = torch.full((2, 3, 64), 7.25)
    low, high = group_range(x, layout_for(x.shape, False, 64))
    codes, step = quantize_codes(x, low, high, torch.Generator().manual_seed(0))
    assert torch.equal(dequantize(codes, low, step, torch.float32), x)


def test_groups_are_heads_for_attention_and_channel_groups_elsewhere():
    assert layout_for(torch.Size([2, 4, 16, 8]), True, 64) == GroupLayout(1)
    assert layout_for(torch.Size([8, 16, 16]), True, 64) == GroupLayout(0)
    assert layout_for(torch.Size([2, 16, 256]), False, 64) == GroupLayout(2, 64)
    x = torch.randn(2, 16, 130)
    x[..., :64] *= 100  # the first group has a wide range; the others must not inherit it
    low, high = group_range(x, GroupLayout(2, 64))
    assert low.shape == (1, 1, 130)
    assert torch.equal(low[0, 0, :64], low[0, 0, :64].min().expand(64))
    assert high[0, 0, 64:].max() < 10 and high[0, 0, 128:].max() == x[..., 128:].max()


def test_stochastic_rounding_is_unbiased_and_reproducible():
    x = torch.linspace(0, 1, 1000).view(1, -1)
    low, high = torch.zeros(1, 1), torch.ones(1, 1)
    generator = torch.Generator().manual_seed(0)
    total = torch.zeros_like(x)
    for _ in range(400):
        codes, step = quantize_codes(x, low, high, generator)
        total += dequantize(codes, low, step, torch.float32)
    bias = (total / 400 - x).abs().max().item()
    assert bias < 0.15 * step.item()  # six standard errors of a 400-draw mean
    nearest_codes, _ = quantize_codes(x, low, high, None)
    assert (dequantize(nearest_codes, low, step, torch.float32) - x).abs().max() <= step.item() / 2 + 1e-7
    a = quantize_codes(x, low, high, torch.Generator().manual_seed(5))[0]
    b = quantize_codes(x, low, high, torch.Generator().manual_seed(5))[0]
    c = quantize_codes(x, low, high, torch.Generator().manual_seed(6))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


# -- what is compressed ------------------------------------------------------------------------


class Recorder(Compressor):
    """A compressor that remembers the shape and op of everything it compresses."""

    def __init__(self, config: MesaConfig) -> None:
        super().__init__(config)
        self.seen: list[tuple[str, tuple[int, ...]]] = []

    def _compress(self, tensor, attention, site, op):
        self.seen.append((op, tuple(tensor.shape)))
        return super()._compress(tensor, attention, site, op)


@pytest.mark.parametrize("frozen", [False, True])
@pytest.mark.parametrize("autocast", [None, torch.bfloat16])
def test_parameters_and_their_casts_are_never_compressed(frozen, autocast):
    torch.manual_seed(0)
    blocks = gpt_blocks(2, d_model=32, n_heads=4)
    model = revbits.SequentialStack(blocks)
    model.requires_grad_(not frozen)
    weight_shapes = {tuple(p.shape) for p in model.parameters()} | {tuple(p.shape)[::-1] for p in model.parameters()}
    compressor = Recorder(MesaConfig(min_numel=0))  # no size threshold: only the rules keep them out
    x = torch.randn(3, 50, 32, requires_grad=True)
    with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        with compressor.saving():
            y = model(x)
    assert compressor.seen and not [s for _, s in compressor.seen if s in weight_shapes]
    assert compressor.report.kept["parameter"].count >= 2 * 6  # each block's six weight matrices, at least
    y.float().square().mean().backward()
    assert x.grad is not None and all((p.grad is None) == frozen for p in model.parameters())


def test_integers_small_tensors_and_row_statistics_stay_exact():
    compressor = Compressor(MesaConfig(min_numel=100))
    x = torch.randn(4, 64, 128, requires_grad=True)
    table = torch.randn(100, 128, requires_grad=True)
    index = torch.randint(0, 100, (4, 64))
    with compressor.saving():
        h = x * 1.0
        normed = F.layer_norm(h, (128,))  # saves mean and rstd, (4, 64, 1)
        picked = F.embedding(index, table)  # saves the integer indices
        small = (torch.randn(8, 8, requires_grad=True) * 1.0).exp()  # 64 elements
    kept = compressor.report.kept
    assert kept["statistic"].count == 2 and kept["statistic"].bytes_before == 2 * 4 * 64 * 4
    assert kept["integer"].count == 1 and kept["small"].count >= 1
    assert set(compressor.report.compressed) == {"layer_norm"}
    (normed.sum() + picked.sum() + small.sum()).backward()


def test_attention_log_sum_exp_stays_exact():
    compressor = Compressor(MesaConfig(min_numel=0))
    q, k, v = (torch.randn(2, 4, 64, 16, requires_grad=True) for _ in range(3))
    with compressor.saving():
        F.scaled_dot_product_attention(q * 1, k * 1, v * 1, is_causal=True).sum().backward()
    assert compressor.report.kept["statistic"].count == 1  # the (2, 4, 64) log-sum-exp
    assert compressor.report.compressed["scaled_dot_product_attention"].count == 4  # q, k, v and the output


def test_a_tensor_saved_by_several_ops_is_stored_once():
    compressor = Compressor(MesaConfig(min_numel=0))
    x = torch.randn(8, 32, 64, requires_grad=True)
    lin_a, lin_b = nn.Linear(64, 64), nn.Linear(64, 32)
    with compressor.saving():
        h = F.layer_norm(x, (64,))
        out = lin_a(h).sum() + lin_b(h).sum() + h.sin().sum() + h.cos().sum()
    report = compressor.report
    assert report.compressed["linear"].count == 1 and report.shared["linear"].count == 1
    assert report.compressed["sin"].count == 1 and report.shared["cos"].count == 1  # same storage, one code
    out.backward()
    reference = x.detach().requires_grad_()
    h = F.layer_norm(reference, (64,))
    (lin_a(h).sum() + lin_b(h).sum() + h.sin().sum() + h.cos().sum()).backward()
    assert cosine(x.grad, reference.grad) > 0.999


def test_a_tensor_changed_in_place_or_freed_and_reallocated_is_not_shared():
    compressor = Compressor(MesaConfig(min_numel=0))
    x = torch.randn(16, 256, requires_grad=True)
    with compressor.saving():
        h = x * 2
        h.sin()
        with torch.no_grad():
            h.add_(1)  # a new version: its next save is a new code
        h.cos()
        terms = [torch.sin(x * (i + 1)) for i in range(4)]  # temporaries, whose memory may be reused
    report = compressor.report
    assert report.compressed["cos"].count == 1 and not report.shared
    assert report.compressed["sin"].count == 5
    sum(t.sum() for t in terms).backward()
    exact = sum((i + 1) * torch.cos(x.detach() * (i + 1)) for i in range(4))
    assert cosine(x.grad, exact) > 0.999


# -- whole models ------------------------------------------------------------------------------


def gpt_and_batch(memory: str, dropout: float = 0.1, **options):
    torch.manual_seed(0)
    config = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, d_model=64, dropout=dropout)
    model = GPT(config.__class__(**{**config.__dict__, "memory": memory, "memory_options": options}))
    tokens = torch.randint(0, 65, (8, 65), generator=torch.Generator().manual_seed(3))
    return model.train(), lambda: model(tokens[:, :-1], tokens[:, 1:]).loss


@pytest.mark.parametrize("autocast", [None, torch.bfloat16, torch.float16])
def test_gpt_gradients_agree_with_standard_and_the_forward_is_unchanged(autocast):
    results = {}
    for memory in ("standard", "mesa"):
        model, loss_fn = gpt_and_batch(memory)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            results[memory] = step_gradients(model, loss_fn)
    (loss_a, grads_a), (loss_b, grads_b) = results["standard"], results["mesa"]
    assert torch.equal(loss_a, loss_b)  # the forward pass, dropout included, is bit for bit the same
    for a, b in zip(grads_a, grads_b):
        assert cosine(a, b) >= 0.99


def test_vit_gradients_agree_with_standard():
    results = {}
    images = torch.randn(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 10, (16,), generator=torch.Generator().manual_seed(2))
    for memory in ("standard", "mesa"):
        torch.manual_seed(0)
        model = ViT(
            ViTConfig(
                image_size=28,
                patch_size=7,
                channels=1,
                num_classes=10,
                n_layer=3,
                n_head=4,
                d_model=64,
                dropout=0.1,
                memory=memory,
            )
        ).train()
        results[memory] = step_gradients(model, lambda m=model: F.cross_entropy(m(images).logits, labels))
    for a, b in zip(results["standard"][1], results["mesa"][1]):
        assert cosine(a, b) >= 0.99


def test_bdia_with_mesa_recomputation_rebuilds_exactly_and_agrees_with_bdia():
    results = {}
    for memory in ("bdia", "bdia+mesa"):
        model, loss_fn = gpt_and_batch(memory, check=True)  # check=True compares every rebuilt state bitwise
        results[memory] = step_gradients(model, loss_fn)
    assert torch.equal(results["bdia"][0], results["bdia+mesa"][0])
    for a, b in zip(results["bdia"][1], results["bdia+mesa"][1]):
        assert cosine(a, b) >= 0.99


def test_same_seed_same_gradients_other_seed_other_gradients():
    grads = []
    for seed in (0, 0, 1):
        model, loss_fn = gpt_and_batch("mesa", seed=seed)
        grads.append(step_gradients(model, loss_fn)[1])
    assert all(torch.equal(a, b) for a, b in zip(grads[0], grads[1]))
    assert not all(torch.equal(a, b) for a, b in zip(grads[0], grads[2]))


def test_activation_memory_is_under_045x_standard_measured():
    measured = {}
    x = torch.randn(4, 256, 128)
    for memory in ("standard", "mesa"):
        torch.manual_seed(0)
        model = revbits.stack(gpt_blocks(4, d_model=128, n_heads=4), memory=memory).train()
        measured[memory] = measure_training_step(model, lambda m=model: m(x).square().mean())
    ratio = measured["mesa"].activations / measured["standard"].activations
    held = measured["mesa"].held_after_forward / measured["standard"].held_after_forward
    assert ratio <= 0.45 and held <= 0.30


def test_report_names_ops_and_counts_bytes():
    model, loss_fn = gpt_and_batch("mesa")
    loss_fn().backward()
    report = model.stack.compressor.report
    assert {"linear", "scaled_dot_product_attention", "gelu", "layer_norm"} <= set(report.compressed)
    assert 0.24 <= report.bytes_after / report.bytes_before <= 0.27  # 1 byte for 4, plus group ranges
    table = report.table()
    assert "linear" in table and "total" in table and "parameter" in table
    assert report.as_dict()["compressed"]["linear"]["count"] == report.compressed["linear"].count


# -- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"ranges": "minmax"}, "ranges must be one of batch, ema"),
        ({"channel_group": 0}, "channel_group must be a positive integer"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"min_numel": -1}, "min_numel"),
    ],
)
def test_bad_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        MesaConfig(**options)


def test_options_of_another_mode_are_refused():
    with pytest.raises(TypeError, match=r"^option\(s\) bits do not apply to memory='mesa'$"):
        revbits.stack(gpt_blocks(2), memory="mesa", bits=9)
    with pytest.raises(ValueError, match="unknown memory mode"):
        revbits.stack(gpt_blocks(2), memory="mesa8")


def test_non_finite_activations_are_reported_with_the_op():
    model = revbits.stack(gpt_blocks(2, d_model=32), memory="mesa").train()
    x = torch.randn(2, 64, 32)
    x[0, 3, 5] = float("nan")
    with pytest.raises(NonFiniteActivationError, match="layer_norm"):
        model(x)


def test_packed_activations_are_uint8_codes_with_fp32_ranges():
    compressor = Compressor(MesaConfig(min_numel=0))
    x = torch.randn(4, 32, 64, requires_grad=True)
    with compressor.saving(), torch.autocast("cpu", dtype=torch.bfloat16):
        y = F.gelu(x.to(torch.bfloat16) * 1)
    assert compressor.report.compressed["gelu"].bytes_after < 0.6 * compressor.report.compressed["gelu"].bytes_before
    restored = y.grad_fn._saved_self
    assert restored.dtype == torch.bfloat16 and restored.shape == y.shape
    assert (restored.float() - (x.detach() * 1).bfloat16().float()).abs().max() < 0.05


def test_sparse_tensors_are_kept_as_they_are():
    compressor = Compressor(MesaConfig(min_numel=0))
    dense = torch.randn(64, 64, requires_grad=True)
    sparse = torch.eye(64).to_sparse()
    with compressor.saving():
        out = torch.sparse.mm(sparse, dense * 1.0).sum()
    out.backward()
    assert compressor.report.kept["layout"].count >= 1
    assert torch.allclose(dense.grad, torch.ones(64, 64))


def test_mesa_quantiser_has_its_own_name():
    """revbits.quantize is BDIA's grid Q; Mesa's 8-bit quantiser is quantize_codes."""
    assert not hasattr(revbits.mesa.quantizer, "quantize")  # the 0.2 alias is gone
    assert revbits.quantize is not quantize_codes and revbits.quantize.__module__ == "revbits.bdia.fixedpoint"
