"""The models under every memory mode: BDIA gradients equal reversible=False, weights move between modes."""

from __future__ import annotations

import pytest
import torch

import revbits
from helpers import relative_error
from revbits.models import GPT, GPTConfig, Translator, TranslatorConfig, ViT, ViTConfig


def make(kind: str, memory: str, **options):
    torch.manual_seed(0)
    opts = dict(memory=memory, memory_options=options)
    if kind == "gpt":
        return GPT(GPTConfig(vocab_size=17, block_size=12, n_layer=3, n_head=2, d_model=16, **opts))
    if kind == "vit":
        return ViT(
            ViTConfig(image_size=8, patch_size=4, channels=1, num_classes=5, n_layer=3, n_head=2, d_model=16, **opts)
        )
    return Translator(
        TranslatorConfig(
            src_vocab=13, tgt_vocab=11, max_len=16, n_enc_layer=2, n_dec_layer=3, n_head=2, d_model=16, **opts
        )
    )


def batch(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "gpt":
        idx = torch.randint(0, 17, (3, 12), generator=g)
        return (idx, torch.roll(idx, -1, 1))
    if kind == "vit":
        return (torch.rand(4, 1, 8, 8, generator=g),)
    src = torch.randint(3, 13, (3, 7), generator=g)
    src[0, 5:] = 0  # padding
    tgt = torch.randint(3, 11, (3, 6), generator=g)
    return (src, tgt[:, :-1], tgt[:, 1:])


def loss_of(kind: str, model, inputs):
    if kind == "vit":
        logits = model(*inputs)
        return torch.nn.functional.cross_entropy(logits, torch.arange(logits.shape[0]) % 5)
    return model(*inputs)[1]


def stacks(model):
    return [m for m in model.modules() if isinstance(m, revbits.BDIAStack)]


KINDS = ["gpt", "vit", "translator"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("memory", revbits.MEMORY_MODES)
def test_every_model_trains_under_every_memory_mode(kind, memory):
    model = make(kind, memory)
    loss = loss_of(kind, model, batch(kind))
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("kind", KINDS)
def test_bdia_gradients_equal_the_plain_autograd_reference(kind):
    model = make(kind, "bdia").double()
    inputs = [t.double() if t.is_floating_point() else t for t in batch(kind)]
    grads = []
    for reversible in (True, False):
        for s in stacks(model):
            s.reversible = reversible
        model.zero_grad()
        torch.manual_seed(7)  # same gamma signs and dropout masks for both
        loss_of(kind, model, inputs).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    worst = max(relative_error(grads[0][n], grads[1][n]) for n in grads[1])
    assert worst <= 1e-10


def test_translator_encoder_learns_through_the_reversible_decoder():
    model = make("translator", "bdia").double()
    loss_of("translator", model, batch("translator")).backward()
    assert model.encoder.blocks[0].mlp.fc.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", KINDS)
def test_bdia_weights_load_into_the_standard_model_with_the_same_outputs(kind):
    trained = make(kind, "bdia", quantize_eval=False)
    opt = torch.optim.SGD(trained.parameters(), lr=0.1)
    loss_of(kind, trained, batch(kind)).backward()
    opt.step()  # the weights are no longer the initial ones
    plain = make(kind, "standard")
    plain.load_state_dict(trained.state_dict())
    trained.eval(), plain.eval()
    inputs = batch(kind)
    with torch.no_grad():
        out_bdia = trained(*inputs[:2]) if kind == "translator" else trained(inputs[0])
        out_plain = plain(*inputs[:2]) if kind == "translator" else plain(inputs[0])
    first = lambda o: o[0] if isinstance(o, tuple) else o  # noqa: E731
    assert torch.equal(first(out_bdia), first(out_plain))


def test_gpt_generates_within_its_vocabulary():
    model = make("gpt", "bdia").eval()
    out = model.generate(torch.zeros(2, 1, dtype=torch.long), 20, top_k=5)
    assert out.shape == (2, 21) and int(out.max()) < 17


def test_translator_greedy_and_beam_decode():
    model = make("translator", "bdia").eval()
    src = batch("translator")[0]
    greedy, beam = model.greedy(src, max_len=8), model.beam(src, beam_size=3, max_len=8)
    assert len(greedy) == len(beam) == 3
    assert all(len(s) <= 8 and all(0 < t < 11 and t != 2 for t in s) for s in greedy + beam)


def test_vit_rejects_wrong_image_shape():
    with pytest.raises(ValueError, match=r"expected images of shape \[B, 1, 8, 8\]"):
        make("vit", "standard")(torch.rand(2, 3, 8, 8))
