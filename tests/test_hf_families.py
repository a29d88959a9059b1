"""revbits.hf on every supported non-decoder model type and on the layer loops transformers writes: each
tiny random model converts, evaluates as the original and trains one reversible step; loops of every style
run unchanged; converted layers keep their names and state dict. (The Llama-style decoders:
test_hf_llama.py; the three models compared in depth: test_hf.py.)"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402

from revbits import hf  # noqa: E402

transformers.logging.set_verbosity_error()


# The Llama-style decoder families are tested in test_hf_llama.py.
ENCODER_TYPES = sorted(
    t for family in hf.FAMILIES if family.name != "Llama-style decoders" for t in family.model_types
)


def tiny_model(model_type: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    sizes = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32)
    ids = torch.randint(3, 50, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    text = {"input_ids": ids, "attention_mask": mask}
    pixels = {"pixel_values": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))}
    image = dict(image_size=16, patch_size=4, **sizes)
    makers = {
        "bert": lambda: (transformers.BertModel(transformers.BertConfig(vocab_size=50, **sizes)), text),
        "roberta": lambda: (transformers.RobertaModel(transformers.RobertaConfig(vocab_size=50, **sizes)), text),
        "xlm-roberta": lambda: (
            transformers.XLMRobertaModel(transformers.XLMRobertaConfig(vocab_size=50, **sizes)),
            text,
        ),
        "camembert": lambda: (transformers.CamembertModel(transformers.CamembertConfig(vocab_size=50, **sizes)), text),
        "electra": lambda: (
            transformers.ElectraModel(transformers.ElectraConfig(vocab_size=50, embedding_size=16, **sizes)),
            text,
        ),
        "distilbert": lambda: (
            transformers.DistilBertModel(transformers.DistilBertConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2)),
            text,
        ),
        "gpt2": lambda: (
            transformers.GPT2Model(transformers.GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2)),
            text,
        ),
        "vit": lambda: (transformers.ViTModel(transformers.ViTConfig(**image)), pixels),
        "deit": lambda: (transformers.DeiTModel(transformers.DeiTConfig(**image)), pixels),
    }
    assert sorted(makers) == ENCODER_TYPES, "every supported non-decoder model type is tested here"
    model, inputs = makers[model_type]()
    assert model.config.model_type == model_type
    return model.eval(), inputs


@pytest.mark.parametrize("model_type", ENCODER_TYPES)
def test_every_supported_model_type_converts(model_type):
    model, inputs = tiny_model(model_type)
    reference = copy.deepcopy(model)
    hf.convert(model, "bdia", quantize_eval=False, check=True)
    with torch.no_grad():
        assert torch.equal(model(**inputs).last_hidden_state, reference(**inputs).last_hidden_state)
    model.train()
    model(**inputs).last_hidden_state.square().mean().backward()  # check=True: every state rebuilt exactly
    assert all(p.grad is not None for p in hf.revbits_stack(model).parameters())
    hf.restore(model)
    assert model.state_dict().keys() == reference.state_dict().keys()


def test_layer_loops_of_every_style_run_unchanged():
    """Loops that read item 0 of a tuple output (older transformers) and loops that give every
    layer its own arguments (per-layer head masks, alternating attention masks) compute what the
    original list computes, in evaluation and in training; the last slot answers in the layers'
    own structure, and using an intermediate output for anything else is an error."""

    class TupleLayer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(8, 8)

        def forward(self, hidden_states, attention_mask=None, head_mask=None, output_attentions=False):
            scale = 1.0 if head_mask is None else head_mask
            return (hidden_states + torch.tanh(self.linear(hidden_states)) * attention_mask * scale, None)

    torch.manual_seed(0)
    layers = nn.ModuleList(TupleLayer() for _ in range(3)).double()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    masks = [torch.rand(2, 5, 1, dtype=torch.float64) for _ in range(3)]
    head_masks = [torch.tensor(float(k + 1), dtype=torch.float64) for k in range(3)]

    def loop(layer_list, **kwargs):
        h = x
        for k, layer in enumerate(layer_list):
            out = layer(h, masks[k], head_mask=head_masks[k], **kwargs)
            h = out[0]
        assert isinstance(out, tuple) and len(out) == 2 and out[1] is None
        return h

    expected = loop(layers)
    conversion = hf.layers.convert_layer_list(layers, "bdia", quantize_eval=False)
    converted = layers.eval()
    assert torch.equal(loop(converted), expected)
    assert torch.equal(loop(converted, output_attentions=False), expected)
    converted.train()
    stack = conversion.stack
    for m in masks:
        m.requires_grad_()
    torch.manual_seed(1)  # the same gamma signs in both runs
    loop(converted).sum().backward()
    reversible = [m.grad.clone() for m in masks] + [p.grad.clone() for p in layers.parameters()]
    for t in masks + list(layers.parameters()):
        t.grad = None
    stack.reversible = False
    torch.manual_seed(1)
    loop(converted).sum().backward()
    plain = [m.grad for m in masks] + [p.grad for p in layers.parameters()]
    for a, b in zip(reversible, plain):
        assert (a - b).abs().max() <= 1e-10 * b.abs().max()
    with pytest.raises(RuntimeError, match="used the output of layer 0"):
        converted[0](x, masks[0]).shape  # noqa: B018


def test_converted_layers_keep_their_names_and_state_dict():
    """Converted layers stay where they were: the list's state_dict() and module names are the plain
    ones, load_state_dict() reaches the layers, and detaching gives the original classes back."""
    torch.manual_seed(0)
    layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(3))
    plain_keys = list(layers.state_dict())
    names = [n for n, _ in layers.named_modules()]
    conversion = hf.layers.convert_layer_list(layers, "bdia")
    assert list(layers.state_dict()) == plain_keys and [n for n, _ in layers.named_modules()] == names
    assert all(isinstance(layer, nn.Linear) for layer in layers)
    layers.load_state_dict({k: torch.full_like(v, 7.0) for k, v in layers.state_dict().items()})
    assert all(torch.equal(p, torch.full_like(p, 7.0)) for p in conversion.stack.parameters())
    conversion.detach()
    assert all(type(layer) is nn.Linear for layer in layers)
