"""revbits.hf on the decoder families people fine-tune (Llama, Mistral, Qwen, Gemma, Phi3 and the
families that share their layer call), each on a tiny random config with its defaults as shipped
(``use_cache=True``) and a left-padded batch:

- evaluation is bitwise the original model's (``quantize_eval=False``), and so is ``generate()``;
- BDIA's reversible gradients equal the same forward under plain autograd, and checkpointing's
  equal the original model's, in every case where a cache reaches the layers;
- a model saved while converted, or after ``restore``, loads into plain transformers with the
  trained weights.
Where the families alternate attention kinds (Qwen2/3, Gemma 2/3) the config mixes sliding-window
and full-attention layers, so every layer needs its own mask."""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

from helpers import tiny_decoder_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from revbits import hf  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {
    "llama": transformers.LlamaConfig,
    "mistral": transformers.MistralConfig,
    "qwen2": transformers.Qwen2Config,
    "qwen3": transformers.Qwen3Config,
    "gemma": transformers.GemmaConfig,
    "gemma2": transformers.Gemma2Config,
    "gemma3_text": transformers.Gemma3TextConfig,
    "phi3": transformers.Phi3Config,
    "olmo2": transformers.Olmo2Config,
    "granite": transformers.GraniteConfig,
    "starcoder2": transformers.Starcoder2Config,
}
# Gemma 2's own eager attention gives NaN in float64 on a padded batch (the unconverted model too),
# so it is tested in float32, with float32's tolerance.
FLOAT32_ONLY = {"gemma2"}


def test_every_decoder_family_is_tested_here():
    decoders = next(f for f in hf.FAMILIES if f.name == "Llama-style decoders")
    assert sorted(CONFIGS) == sorted(decoders.model_types)


def tiny_decoder(model_type: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A 3-layer random model of ``model_type`` in eval mode, and a left-padded batch of 2 x 9."""
    torch.manual_seed(0)
    config = tiny_decoder_config(CONFIGS[model_type], head_dim=8)
    if getattr(config, "layer_types", None) is not None:  # a different mask for the middle layer
        config.layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        config.sliding_window = 4
        config.use_sliding_window = True
    assert config.use_cache, "the default config as shipped hands every layer a cache"
    dtype = torch.float32 if model_type in FLOAT32_ONLY else torch.float64
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    ids[1, :3] = 0
    return model, {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def tolerance(model: nn.Module) -> float:
    return 1e-10 if next(model.parameters()).dtype == torch.float64 else 1e-5


def gradients(model: nn.Module, batch: dict[str, torch.Tensor], seed: int = 3) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_close(grads: dict[str, torch.Tensor], reference: dict[str, torch.Tensor], tol: float) -> None:
    assert grads.keys() == reference.keys()
    scale = max(g.abs().max().item() for g in reference.values())
    for name, g in reference.items():
        assert (grads[name] - g).abs().max().item() <= tol * max(g.abs().max().item(), 1e-3 * scale), name


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_eval_and_generation_are_bitwise_the_original(model_type):
    model, batch = tiny_decoder(model_type)
    reference = copy.deepcopy(model)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    hf.convert(model, "bdia", quantize_eval=False)
    with torch.no_grad():
        assert torch.equal(model(**inputs).logits, reference(**inputs).logits)
    options = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(**inputs, **options), reference.generate(**inputs, **options))


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_reversible_gradients_equal_plain_autograd(model_type):
    """The regression of transformers 5's renamed cache argument: a cache reaching the layers in
    training made the recomputation append keys twice (key/value gradients exactly 0)."""
    model, batch = tiny_decoder(model_type)
    hf.convert(model, "bdia", check=True)
    reversible = gradients(model, batch)
    stack = hf.revbits_stack(model)
    stack.reversible = False
    plain = gradients(model, batch)
    inside = {id(p) for p in stack.parameters()}
    layer_params = {n for n, p in model.named_parameters() if id(p) in inside}
    assert len(layer_params) == len(inside) > 0
    assert layer_params <= plain.keys(), "every layer parameter gets a gradient"
    assert all(plain[n].abs().max() > 0 for n in layer_params if n.endswith(("k_proj.weight", "v_proj.weight")))
    assert_close(reversible, plain, tolerance(model))


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text"])
def test_checkpoint_gives_the_original_gradients(model_type):
    model, batch = tiny_decoder(model_type)
    reference = copy.deepcopy(model)
    expected = gradients(reference, batch)
    hf.convert(model, "checkpoint", fused_loss=False)  # the original loss too, for a bitwise comparison
    got = gradients(model, batch)
    assert_close(got, expected, 0)


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_saved_while_converted_loads_into_plain_transformers(model_type, tmp_path):
    """A training step while converted, then save_pretrained without restore(): the directory is a
    plain transformers checkpoint with the trained weights. After restore() the same."""
    model, batch = tiny_decoder(model_type)
    hf.convert(model, "bdia")
    gradients(model, batch)
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    assert not any("stack" in k for k in trained)
    model.save_pretrained(tmp_path / "converted")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "converted", dtype=next(model.parameters()).dtype)
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in trained.items())
    hf.restore(model).save_pretrained(tmp_path / "restored")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "restored", dtype=next(model.parameters()).dtype)
    assert all(torch.equal(again.state_dict()[k], v) for k, v in trained.items())


def test_plain_state_dict_loads_into_a_converted_model():
    model, batch = tiny_decoder("llama")
    other, _ = tiny_decoder("llama")
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    hf.convert(model, "bdia")
    model.load_state_dict(other.state_dict())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in other.state_dict().items())


def test_a_stateful_layer_argument_is_refused_in_training():
    """An object a layer could change, other than a transformers cache, would see the second run of
    the layer in backward; it is refused with its name, and allowed at evaluation."""

    class Counter:
        calls = 0

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = nn.Linear(4, 4)

        def forward(self, hidden_states, counter=None):
            if counter is not None:
                counter.calls += 1
            return hidden_states + self.linear(hidden_states)

    layers = nn.ModuleList(Layer() for _ in range(3))
    hf.layers.convert_layer_list(layers, "bdia")
    converted = layers.train()
    x = torch.randn(2, 4)

    def loop(counter):
        h = x
        for layer in converted:
            h = layer(h, counter=counter)
        return h

    with pytest.raises(TypeError, match="`counter` = a Counter object"):
        loop(Counter())
    converted.eval()
    counter = Counter()
    loop(counter)
    assert counter.calls == 3
