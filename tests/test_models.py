"""Every registered model under every memory mode it has (parametrised over the registry, as timm's tests
are): a model registered in revbits.models gets these tests without being named here."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import revbits
from helpers import relative_error
from revbits.models import Output, create, list_models, memory_modes, model_spec, register
from revbits.models import registry as registry_module

CASES = [(name, memory) for name in list_models() for memory in memory_modes(name)]
# Where a mode's plain-autograd reference runs the same forward: the mode itself with reversible = False,
# or for the modes whose forward is standard's, the standard model with the same weights.
REFERENCE = {"checkpoint": "standard", "mesa": "standard", "bdia+mesa": "bdia"}
LOSSY = {"mesa", "bdia+mesa"}  # 8-bit saved tensors: gradients close to, not equal to, the reference
EXACT = {"standard", "checkpoint"}  # the same operations recomputed: the same gradients, bit for bit
MESA_EVERYWHERE = {"min_numel": 0}  # the tiny models' tensors are below Mesa's default size threshold


def build(name: str, memory: str, **memory_options) -> nn.Module:
    spec = model_spec(name)
    options = dict(spec.tiny)
    if memory_options:
        options["memory_options"] = memory_options
    torch.manual_seed(0)
    return create(name, memory=memory, **options)


def example(name: str, model: nn.Module) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
    return model_spec(name).example(model.config, torch.Generator().manual_seed(1))


def plain_autograd(model: nn.Module) -> nn.Module:
    """The same forward under plain autograd: every reversible part (BDIA stacks, RevGRU/RevLSTM) off."""
    for module in model.modules():
        if hasattr(module, "reversible"):
            module.reversible = False
    return model


def loss_and_grads(model: nn.Module, inputs, targets) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(7)  # the same gamma signs and dropout masks in every run
    loss = model(*inputs, targets=targets).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def bdia_options(memory: str) -> dict:
    return {"quantize_eval": False} if memory.startswith("bdia") else {}


def test_the_registry_has_every_model_kind():
    assert list_models() == sorted(["gpt", "vit", "translator", "rnnlm", "rnn-translator", "revnet"])
    assert memory_modes("gpt") == revbits.MEMORY_MODES and memory_modes("rnnlm") == ("standard", "reversible")


@pytest.mark.parametrize("name, memory", CASES)
def test_create_builds_every_model_and_its_forward_keeps_the_contract(name, memory):
    model = build(name, memory).train()
    inputs, targets = example(name, model)
    out = model(*inputs, targets=targets)
    assert isinstance(out, Output) and out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.eval()
    with torch.no_grad():
        plain, scored = model(*inputs), model(*inputs, targets=targets)
    assert plain.loss is None and plain.logits.shape[:-1] == targets.shape
    # the loss is the mean cross-entropy of those logits (padding ignored)
    pad = getattr(model.config, "pad_id", -100)
    expected = F.cross_entropy(plain.logits.flatten(0, -2), targets.flatten(), ignore_index=pad)
    assert torch.allclose(scored.loss, expected, rtol=1e-5, atol=0)


def test_an_output_is_not_a_tuple():
    model = build("gpt", "standard")
    inputs, targets = example("gpt", model)
    with pytest.raises(TypeError, match=r"use out\.logits and out\.loss"):
        logits, loss = model(*inputs, targets=targets)  # the revbits 0.1 idiom fails loudly
    with pytest.raises(AttributeError):
        model(*inputs).loss = None  # frozen
    out = model(*inputs, targets=targets)
    leaves, spec = torch.utils._pytree.tree_flatten(out)  # wrappers (FSDP, DDP) find the tensors inside
    assert leaves[0] is out.loss and leaves[1] is out.logits
    assert torch.utils._pytree.tree_unflatten(leaves, spec) == out


@pytest.mark.parametrize("name", list_models())
def test_weights_have_the_same_names_and_values_in_every_memory_mode(name):
    spec = model_spec(name)
    states = {memory: build(name, memory).state_dict() for memory in spec.memory_modes}
    names = {memory: list(state) for memory, state in states.items()}
    first = states[spec.memory_modes[0]]
    if spec.shared_weights:
        assert all(keys == list(first) for keys in names.values()), names
        assert all(torch.equal(state[k], first[k]) for state in states.values() for k in first)
    else:  # the flag tells the truth: these modes are other cells with other weights
        assert len({tuple(keys) for keys in names.values()}) == len(names)


@pytest.mark.parametrize("name", [n for n in list_models() if model_spec(n).shared_weights])
def test_weights_trained_in_one_mode_give_the_same_outputs_in_every_mode(name):
    spec = model_spec(name)
    last = spec.memory_modes[-1]
    trained = build(name, last, **bdia_options(last)).train()
    inputs, targets = example(name, trained)
    trained(*inputs, targets=targets).loss.backward()
    torch.optim.SGD(trained.parameters(), lr=0.1).step()  # the weights are no longer the initial ones
    outputs = {}
    for memory in spec.memory_modes:
        model = build(name, memory, **bdia_options(memory))
        model.load_state_dict(trained.state_dict())
        with torch.no_grad():
            outputs[memory] = model.eval()(*inputs).logits
    first = outputs[spec.memory_modes[0]]
    assert all(torch.equal(logits, first) for logits in outputs.values())


@pytest.mark.parametrize("name, memory", CASES)
def test_gradients_equal_plain_autograd_on_the_same_forward(name, memory):
    options = MESA_EVERYWHERE if memory in LOSSY else {}
    model = build(name, memory, **options).train()
    reference = plain_autograd(build(name, REFERENCE.get(memory, memory)).train())
    reference.load_state_dict(model.state_dict())
    inputs, targets = example(name, model)
    loss, grads = loss_and_grads(model, inputs, targets)
    reference_loss, reference_grads = loss_and_grads(reference, inputs, targets)
    assert torch.equal(loss, reference_loss)  # the same forward, bit for bit
    assert grads.keys() == reference_grads.keys() == dict(model.named_parameters()).keys()
    for n in grads:
        if memory in LOSSY:
            assert cosine(grads[n], reference_grads[n]) >= 0.99, n
        elif memory in EXACT:
            assert torch.equal(grads[n], reference_grads[n]), n
        else:
            assert relative_error(grads[n], reference_grads[n]) <= 1e-5, n


@pytest.mark.parametrize("name", [n for n in list_models() if "bdia" in memory_modes(n)])
def test_bdia_gradients_equal_plain_autograd_in_double_precision(name):
    model = build(name, "bdia").double().train()
    inputs, targets = example(name, model)
    inputs = tuple(t.double() if t.is_floating_point() else t for t in inputs)
    _, grads = loss_and_grads(model, inputs, targets)
    _, reference = loss_and_grads(plain_autograd(model), inputs, targets)
    assert max(relative_error(grads[n], reference[n]) for n in reference) <= 1e-10


def test_create_names_what_is_wrong():
    with pytest.raises(ValueError, match=r"unknown model 'gtp'; known models: gpt, revnet, rnn-translator"):
        create("gtp")
    with pytest.raises(ValueError, match=r"gpt has no option\(s\) layers; its options: vocab_size, block_size"):
        create("gpt", vocab_size=5, layers=2)
    with pytest.raises(ValueError, match=r"gpt needs the option\(s\) vocab_size"):
        create("gpt")
    with pytest.raises(ValueError, match=r"rnnlm: memory must be one of standard, reversible, got 'bdia'"):
        create("rnnlm", memory="bdia", vocab_size=5)


def test_a_registered_model_is_created_by_name(monkeypatch):
    monkeypatch.setattr(registry_module, "_MODELS", dict(registry_module._MODELS))  # leave the registry as it was
    from dataclasses import dataclass

    @dataclass
    class ToyConfig:
        width: int = 3
        memory: str = "standard"

    toy = dict(config=ToyConfig, memory_modes=("standard",), tiny={}, example=lambda config, generator: ((), None))

    @register("toy", **toy)
    class Toy(nn.Module):
        def __init__(self, config: ToyConfig) -> None:
            super().__init__()
            self.config, self.linear = config, nn.Linear(config.width, 1)

    assert "toy" in list_models()
    assert isinstance(create("toy", width=4), Toy) and create("toy", width=4).linear.in_features == 4
    with pytest.raises(ValueError, match="already registered"):
        register("toy", **toy)(nn.Linear)


def test_create_builds_the_same_weights_as_the_constructor():
    from revbits.models import GPT, GPTConfig

    torch.manual_seed(0)
    direct = GPT(GPTConfig(vocab_size=17, block_size=12, n_layer=3, n_head=2, d_model=16, memory="bdia"))
    made = build("gpt", "bdia")
    assert all(torch.equal(a, b) for a, b in zip(direct.state_dict().values(), made.state_dict().values()))


def test_translator_encoder_learns_through_the_reversible_decoder():
    model = build("translator", "bdia").double()
    inputs, targets = example("translator", model)
    model(*inputs, targets=targets).loss.backward()
    assert model.encoder.blocks[0].mlp.fc.weight.grad.abs().sum() > 0


def test_gpt_generates_within_its_vocabulary():
    model = build("gpt", "bdia").eval()
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, top_k=5)
    assert out.shape == (2, 21) and int(out.max()) < 17


def test_translator_greedy_and_beam_decode():
    model = build("translator", "bdia").eval()
    src = example("translator", model)[0][0]
    greedy, beam = model.greedy(src, max_len=8), model.beam(src, beam_size=3, max_len=8)
    assert len(greedy) == len(beam) == 3
    assert all(len(s) <= 8 and all(0 < t < 11 and t != 2 for t in s) for s in greedy + beam)


def test_vit_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 8, 8\]"):
        build("vit", "standard")(torch.rand(2, 3, 8, 8))


def test_revnet_petra_pieces_share_the_models_modules_and_names():
    from revbits.petra.pieces.revnet import revnet_pieces

    model = build("revnet", "standard")
    pieces = revnet_pieces(model)
    assert len(pieces) == len(model.pieces)
    for piece, plain in zip(pieces, model.pieces):
        names = dict(piece.named_parameters())
        assert {id(p) for p in names.values()} == {id(p) for p in plain.parameters()}
        assert set(names) == {n for n, _ in plain.named_parameters()}  # as PETRA stage states of 0.1 name them
    inputs, targets = example("revnet", model)
    x = inputs[0]
    for piece in pieces[:-1]:
        x = piece(x, 0)
    assert torch.equal(pieces[-1](x, targets), model(*inputs, targets=targets).loss)
