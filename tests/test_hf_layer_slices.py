"""revbits.hf's layer slices: a converted Llama-style decoder layer runs everything but its attention in token
slices in BDIA's training passes, exactly, and as itself everywhere else."""

from __future__ import annotations

import logging

import pytest
import torch

from helpers import converted_steps, relative_error, tiny_decoder_config
from revbits import hf
from revbits.measure import measure_training_step

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.usefixtures("one_thread")

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model(family: str, dtype=torch.float64, **overrides):
    torch.manual_seed(0)
    config_class = {"qwen3": transformers.Qwen3Config, "llama": transformers.LlamaConfig}[family]
    config = tiny_decoder_config(config_class, **({"head_dim": 8, "attn_implementation": "sdpa"} | overrides))
    model_class = {"qwen3": transformers.Qwen3ForCausalLM, "llama": transformers.LlamaForCausalLM}[family]
    return model_class(config).to(dtype)


def projection_rows(model) -> list[int]:
    seen: list[int] = []
    for layer in model.base_model.model.model.layers:
        layer.self_attn.k_proj.base_layer.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[-2]))
    return seen


@pytest.mark.parametrize(("family", "batch_chunks", "stacked_heads"), [("qwen3", 1, False), ("llama", 2, True)])
def test_layer_slices_are_exact_and_evaluation_is_the_plain_model(family, batch_chunks, stacked_heads, monkeypatch):
    """LoRA (with dropout) on all seven linears, 13 positions in slices of 4, a batch of 4 with padding, in one
    or two batch chunks: every rebuilt state bitwise (check=True), the loss bitwise and every gradient to 1e-10
    against plain autograd on the same sliced forward; the projections saw slices; evaluation runs the layers
    whole, as the plain model. The Llama case stacks query heads per key/value head, as on a GPU."""
    from revbits.hf import layer_slices

    if stacked_heads:
        monkeypatch.setattr(layer_slices, "STACKED_HEADS_DEVICES", {"cpu"})
    model = tiny_model(family)
    plain = tiny_model(family)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=LINEARS, lora_dropout=0.1))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    hf.convert(model, "bdia", token_slice=4, check=True, batch_chunks=batch_chunks)
    assert all(block.slicer is not None for block in hf.revbits_stack(model).blocks)
    seen = projection_rows(model)
    ids = torch.randint(1, 64, (4, 13), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: a 4-d mask reaches the attention
    mask[3, :6] = 0
    model.train()
    results = []
    for reversible in (True, False):
        hf.revbits_stack(model).reversible = reversible
        model.zero_grad(set_to_none=True)
        torch.manual_seed(2)
        loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    assert max(relative_error(grads_a[n], grads_b[n]) for n in grads_b) <= 1e-10
    assert max(seen) == 4
    model.eval()
    seen.clear()
    with model.disable_adapter(), torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert set(seen) == {13}
    assert torch.equal(logits, plain(input_ids=ids, attention_mask=mask).logits)


@pytest.mark.parametrize("stacked_heads", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_the_sliced_layer_is_the_layer_to_rounding(padded, stacked_heads, monkeypatch):
    """The sliced form of a layer against its own forward, on the arguments the model passes it (causal, or a
    padding mask whose rows the query slices take), float64: outputs to 1e-12, the weights' gradients to 1e-10.
    The input's gradient to 1e-8: Qwen3's RMSNorm computes in float32 even in a float64 model, and the sliced
    form back-propagates the input norm twice (for k and v, then for q), summing float32-rounded parts in
    another order (measured 1e-9). The slices change which rows a matmul sees, not the function. With
    ``stacked_heads`` the attention runs as on a GPU (query heads stacked per key/value head)."""
    from revbits.bdia.token_slices import slicing
    from revbits.hf import layer_slices
    from revbits.hf.layer_slices import sliced_forward

    if stacked_heads:
        monkeypatch.setattr(layer_slices, "STACKED_HEADS_DEVICES", {"cpu"})

    model = tiny_model("qwen3")
    layer = model.model.layers[1]
    calls = []
    layer.register_forward_pre_hook(lambda m, args, kwargs: calls.append((args, kwargs)), with_kwargs=True)
    ids = torch.randint(1, 64, (2, 17), generator=torch.Generator().manual_seed(3))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask if padded else None, use_cache=False)
    (args, kwargs) = calls[0]
    assert (kwargs["attention_mask"] is not None) == padded
    hidden = torch.randn(2, 17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    weights = torch.randn(2, 17, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    results = []
    for sliced in (True, False):
        x = hidden.clone().requires_grad_()
        layer.zero_grad(set_to_none=True)
        if sliced:
            with slicing(3, checkpoint=True):
                out = sliced_forward(layer, x, 3, kwargs)
        else:
            out = layer(x, **kwargs)
        (out * weights).sum().backward()
        results.append((out.detach(), {"x": x.grad, **{n: p.grad for n, p in layer.named_parameters()}}))
    (out_a, grads_a), (out_b, grads_b) = results
    assert relative_error(out_a, out_b) <= 1e-12
    assert relative_error(grads_a.pop("x"), grads_b.pop("x")) <= 1e-8
    worst = {n: relative_error(grads_a[n], grads_b[n]) for n in grads_b}
    assert max(worst.values()) <= 1e-10, worst


def test_a_layer_that_computes_something_else_is_not_sliced(caplog):
    """The conversion compares the sliced form with the layer's own forward once; a layer that differs (here,
    a forward patched to scale its output) runs whole, and a warning says so."""
    model = tiny_model("qwen3")
    layer = model.model.layers[1]
    own = layer.forward
    layer.forward = lambda hidden_states, **kwargs: 2 * own(hidden_states, **kwargs)
    with caplog.at_level(logging.WARNING, logger="revbits.hf"):
        hf.convert(model, "bdia", token_slice=3, check=True)
    assert [block.slicer is not None for block in hf.revbits_stack(model).blocks] == [True, False, True]
    assert "computes something else" in caplog.text
    model.train()
    ids = torch.randint(0, 64, (1, 11), generator=torch.Generator().manual_seed(4))
    (loss_a, _), (loss_b, _) = converted_steps(model, ids)
    assert torch.equal(loss_a, loss_b)


def backward_peak(layer_slices: bool) -> int:
    torch.manual_seed(6)
    config = tiny_decoder_config(
        transformers.Qwen3Config, hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=8,
        num_key_value_heads=4, head_dim=16, attn_implementation="sdpa",
    )
    model = transformers.Qwen3Model(config)
    hf.convert(model, "bdia", token_slice=64, layer_slices=layer_slices)
    model.train()
    ids = torch.randint(0, 64, (1, 1024), generator=torch.Generator().manual_seed(5))
    loss = lambda: model(input_ids=ids, use_cache=False).last_hidden_state.square().mean()  # noqa: E731
    return measure_training_step(model, loss).activations


def test_layer_slices_cut_the_backward_peak_at_batch_1():
    """Batch 1, 1024 positions, slices of 64, Qwen3's proportions at d 64 (q twice as wide as the stream, k and v
    as wide), the layers only: with the MLPs alone in slices the backward holds the attention sublayer's whole
    graph; with layer slices, K and V whole and one slice's graph (measured: 0.60 of the peak)."""
    mlp_only, layers = backward_peak(False), backward_peak(True)
    assert layers <= 0.7 * mlp_only, (layers, mlp_only)


def test_each_query_slice_runs_twice_per_step_as_under_gradient_checkpointing():
    """BDIA's backward knows the gradient of a layer's output before it recomputes the layer, so each query slice
    (q, attention, o_proj, MLP) is back-propagated as soon as it is recomputed: its projections run twice per
    step (forward, recomputation), not three times as under checkpoint; k and v, whose gradients are known only
    after every query slice, still run three times. Gradients stay those of plain autograd (first test)."""
    model = tiny_model("qwen3")
    hf.convert(model, "bdia", token_slice=4)
    counts = {"q_proj": 0, "k_proj": 0}
    for layer in model.model.layers:
        for name in counts:
            getattr(layer.self_attn, name).register_forward_pre_hook(
                lambda m, args, name=name: counts.__setitem__(name, counts[name] + 1)
            )
    model.train()
    ids = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(7))
    model(input_ids=ids, labels=ids).loss.backward()
    slices_per_layer = 4 * len(model.model.layers)
    assert counts == {"q_proj": 2 * slices_per_layer, "k_proj": 3 * slices_per_layer}


def test_autograd_grad_and_backward_inputs_through_layer_slices():
    """``torch.autograd.grad`` and ``backward(inputs=...)`` on a converted model whose layers run in slices (the
    query slices back-propagated during the recomputation): the asked gradients equal plain autograd's on the same
    sliced forward (float64, 1e-10), and ``backward(inputs=)`` leaves every other parameter's ``.grad`` None."""
    model = tiny_model("qwen3")
    hf.convert(model, "bdia", token_slice=4)
    model.train()
    layers = model.model.layers
    asked = [layers[0].self_attn.q_proj.weight, layers[1].self_attn.k_proj.weight, layers[2].mlp.down_proj.weight]
    ids = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(8))
    results = []
    for reversible in (True, False):
        hf.revbits_stack(model).reversible = reversible
        model.zero_grad(set_to_none=True)
        grads = torch.autograd.grad(model(input_ids=ids, labels=ids).loss, asked)
        assert all(p.grad is None for p in model.parameters())
        model(input_ids=ids, labels=ids).loss.backward(inputs=asked[1:])
        others = [p for p in model.parameters() if all(p is not a for a in asked[1:])]
        assert all(p.grad is None for p in others)
        results.append([*grads, *(p.grad.clone() for p in asked[1:])])
    for mine, plain in zip(*results):
        assert relative_error(mine, plain) <= 1e-10


def test_pytorch_tools_follow_a_step_through_layer_slices():
    """FlopCounterMode and the profiler around a training step whose layers run in slices (the query slices
    back-propagated inside the recomputation): the step runs under each with the same loss bits, the flops
    exceed one plain step's (the recomputation) and the profiler sees the slices' matmuls. MemTracker refuses
    a module called more than once per step, as every slice calls the layer's modules: it raises its own
    error, rather than counting wrongly (docs/long_context.md says to measure with token_slice=None)."""
    from torch.distributed._tools.mem_tracker import MemTracker
    from torch.profiler import profile
    from torch.utils.flop_counter import FlopCounterMode

    plain = tiny_model("qwen3")
    model = hf.convert(tiny_model("qwen3"), "bdia", token_slice=4)
    plain.train()
    model.train()
    ids = torch.randint(0, 64, (1, 13), generator=torch.Generator().manual_seed(9))

    def step(m):
        torch.manual_seed(10)  # BDIA draws its gamma signs per forward
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach()

    with FlopCounterMode(display=False) as plain_counter:
        step(plain)
    losses = [step(model)]
    with FlopCounterMode(display=False) as counter:
        losses.append(step(model))
    assert counter.get_total_flops() > plain_counter.get_total_flops()
    with profile() as prof:
        losses.append(step(model))
    assert any(e.key in ("aten::mm", "aten::addmm", "aten::bmm") for e in prof.key_averages())
    assert all(torch.equal(loss, losses[0]) for loss in losses)
    tracker = MemTracker()
    tracker.track_external(model)
    with pytest.raises(NotImplementedError, match="multiple iterative calls"), tracker:
        step(model)
