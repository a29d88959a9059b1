"""The fused loss in transformers causal LMs (revbits.hf.loss): with labels in training, the loss and
every gradient equal the unconverted model's (float64 to 1e-12 against the loss of its logits; float32
to 1e-6 against transformers' own loss), on every supported family, with padding, tied embeddings,
Gemma 2's soft-capping, Granite's scaling and PEFT LoRA on the head; the logits stay where they are
asked for, restore() removes it, and the peak memory falls."""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from helpers import relative_error  # noqa: E402
from revbits import hf  # noqa: E402
from revbits.hf.loss import PLAIN_HEAD_TYPES, SCALED_TYPES, SOFTCAPPED_TYPES  # noqa: E402
from revbits.measure import LiveBytes  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

SIZES = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)
EXTRA = {  # the post-head transforms set so that they act
    "qwen3": dict(tie_word_embeddings=True),
    "gemma2": dict(final_logit_softcapping=0.05, attn_implementation="eager"),
    "gemma3_text": dict(final_logit_softcapping=0.05),
    "granite": dict(logits_scaling=3.0),
}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(model_type: str, dtype=torch.float64, vocab: int = 64):
    torch.manual_seed(0)
    if model_type == "gpt2":  # with its dropout of 0.1
        config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=vocab, n_positions=64)
    else:
        sizes = {**SIZES, "vocab_size": vocab, **EXTRA.get(model_type, {})}
        config = transformers.AutoConfig.for_model(model_type, **sizes)
    return AutoModelForCausalLM.from_config(config).to(dtype).train()


def batch(vocab: int = 64, length: int = 9) -> dict[str, torch.Tensor]:
    """Two rows, the second right-padded (Gemma 2's eager attention gives NaN on left padding in float64)."""
    ids = torch.randint(1, vocab, (2, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def loss_of_logits(model, data) -> torch.Tensor:
    """The reference: the model's own logits (a call without labels), then its causal LM loss in their dtype."""
    logits = model(input_ids=data["input_ids"], attention_mask=data["attention_mask"]).logits
    labels = F.pad(data["labels"], (0, 1), value=-100)[:, 1:]
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def step(model, loss_fn) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The loss and the gradients by name, from one RNG state (GPT-2 trains with dropout)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    loss = loss_fn(model)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_equal_to(fused, reference, tolerance: float) -> None:
    (loss, grads), (loss_r, grads_r) = fused, reference
    assert relative_error(loss, loss_r) <= tolerance
    assert grads.keys() == grads_r.keys() and grads_r
    errors = {n: relative_error(grads[n], g) for n, g in grads_r.items()}
    assert max(errors.values()) <= tolerance, max(errors.items(), key=lambda kv: kv[1])


def fused_call(model, data):
    out = model(**data)
    assert out.logits is None, "training with labels: the fused loss holds no logits"
    return out.loss


@pytest.mark.parametrize("model_type", PLAIN_HEAD_TYPES + SOFTCAPPED_TYPES + SCALED_TYPES)
def test_every_supported_family_gets_its_own_loss_and_gradients(model_type):
    """float64: the fused loss (enabled on the plain model, in chunks of 5 tokens) against the loss of
    the model's logits; both in float64 (transformers' own loss computes in float32)."""
    model, data = tiny(model_type), batch()
    reference = step(copy.deepcopy(model), lambda m: loss_of_logits(m, data))
    hf.enable_fused_loss(model, chunk_tokens=5)
    assert_equal_to(step(model, lambda m: fused_call(m, data)), reference, 1e-12)


@pytest.mark.parametrize("model_type", ["llama", "qwen3", "gemma2"])
def test_converted_models_use_it_and_match_the_unconverted_model(model_type):
    model, data = tiny(model_type), batch()
    if model_type == "qwen3":
        assert model.lm_head.weight is model.model.embed_tokens.weight, "tied embeddings"
    reference = step(copy.deepcopy(model), lambda m: loss_of_logits(m, data))
    hf.convert(model, "checkpoint")
    assert hf.has_fused_loss(model)
    assert_equal_to(step(model, lambda m: fused_call(m, data)), reference, 1e-12)


@pytest.mark.parametrize("model_type", ["gemma2", "granite"])
def test_the_post_head_transform_matters(model_type):
    """The soft-cap and the scaling change the loss, so the equality above is not vacuous."""
    model, data = tiny(model_type), batch()
    hf.enable_fused_loss(model)
    with_transform = model(**data).loss
    setattr(model.config, "final_logit_softcapping" if model_type == "gemma2" else "logits_scaling", None if
            model_type == "gemma2" else 1.0)
    assert abs(model(**data).loss.item() - with_transform.item()) > 1e-4


@pytest.mark.parametrize("model_type", ["llama", "gemma2"])
def test_float32_loss_equals_transformers_own_loss_with_its_options(model_type):
    """Against model(**batch).loss of the unconverted model: shift, ignore_index, num_items_in_batch, shift_labels."""
    model, data = tiny(model_type, torch.float32), batch()
    reference = copy.deepcopy(model)
    hf.convert(model, "standard")
    shifted = F.pad(data["labels"], (0, 1), value=-100)[:, 1:].contiguous()
    for extra in ({}, {"num_items_in_batch": torch.tensor(7)}, {"shift_labels": shifted}):
        assert_equal_to(step(model, lambda m, e=extra: fused_call(m, {**data, **e})),
                        step(reference, lambda m, e=extra: m(**data, **e).loss), 1e-6)


@pytest.mark.parametrize("order", ["lora then convert", "convert then lora"])
def test_lora_on_every_linear_and_on_the_tied_head(order):
    model, data = tiny("qwen3"), batch()
    config = LoraConfig(r=4, target_modules=[*LINEARS, "lm_head"], init_lora_weights=False)
    reference = get_peft_model(copy.deepcopy(model), copy.deepcopy(config))
    if order == "lora then convert":
        model = hf.convert(get_peft_model(model, config), "checkpoint")
    else:
        model = get_peft_model(hf.convert(model, "checkpoint"), config)
    model.load_state_dict(reference.state_dict())
    fused = step(model, lambda m: fused_call(m, data))
    assert any("lm_head.lora_" in n for n in fused[1]) and all("lora_" in n for n in fused[1])
    assert_equal_to(fused, step(reference, lambda m: loss_of_logits(m, data)), 1e-12)


def test_logits_are_returned_wherever_they_are_asked_for():
    model, data = tiny("llama"), batch()
    reference = copy.deepcopy(model)
    hf.convert(model, "checkpoint")
    inputs = {k: v for k, v in data.items() if k != "labels"}
    with torch.no_grad():
        expected = reference(**data)
        for call in (lambda: model(**inputs), lambda: model.eval()(**data), lambda: model.train()(**data)):
            out = call()  # no labels; evaluation; no gradients: the model's own forward
            assert torch.equal(out.logits, expected.logits)
    assert torch.equal(model.eval()(**data).loss, reference.eval()(**data).loss)
    model.train()
    assert isinstance(model(**data, return_dict=False), tuple), "return_dict=False: the plain forward"
    model.loss_function = lambda logits, labels, vocab_size, **kw: logits.sum()  # a user's own loss reads logits
    out = model(**data)
    assert out.logits is not None and torch.equal(out.loss, out.logits.sum())


def test_restore_and_fused_loss_false_give_the_plain_forward_back():
    model, data = tiny("gpt2"), batch()
    hf.convert(model, "checkpoint")
    assert model(**data).logits is None
    hf.restore(model)
    assert not hf.has_fused_loss(model) and model(**data).logits is not None
    assert not model.lm_head._forward_pre_hooks and not model._forward_hooks
    hf.convert(model, "checkpoint", fused_loss=False)
    assert not hf.has_fused_loss(model) and model(**data).logits is not None
    with pytest.raises(ValueError, match="fused loss supports the causal LMs"):
        hf.enable_fused_loss(transformers.GPT2Model(model.config))
    hf.enable_fused_loss(model)
    with pytest.raises(ValueError, match="already"):
        hf.enable_fused_loss(model)


def test_a_forward_that_raises_leaves_no_hook_on_the_head():
    model, data = tiny("llama"), batch()
    hf.enable_fused_loss(model)
    with pytest.raises(Exception):  # noqa: B017 - whatever transformers raises for a mask of the wrong shape
        model(**{**data, "attention_mask": data["attention_mask"][:, :3, None]})
    assert not model.lm_head._forward_pre_hooks
    assert model(**data).loss.isfinite()


def test_trl_fused_lm_head_runs_its_own_path():
    """TRL's SFTTrainer patches the forward with its own fused head (fused_lm_head=True): that call is left to it."""
    from trl.trainer.utils import add_fused_lm_head

    model, data = tiny("llama", torch.float32), batch()
    expected = copy.deepcopy(model)(**data).loss
    hf.convert(model, "checkpoint")
    add_fused_lm_head(model)
    out = model(**data, fused_lm_head=True)
    assert type(out).__name__ == "FusedCausalLMOutput" and relative_error(out.loss, expected) <= 1e-6
    assert model(**data).logits is None


def test_peak_memory_of_a_step_falls():
    """A 2-layer Llama at vocabulary 8192, 512 tokens: the logits (16 MiB in float32) and their gradient
    dominate the plain step; the fused loss holds one 64-token chunk's at a time."""
    vocab = 8192
    data = batch(vocab, length=256)
    peaks = {}
    for fused in (False, True):
        model = tiny("llama", torch.float32, vocab=vocab)
        hf.convert(model, "checkpoint", fused_loss=False)
        if fused:
            hf.enable_fused_loss(model, chunk_tokens=64)
        tracker = LiveBytes()
        with tracker:
            model(**data).loss.backward()
        peaks[fused] = tracker.peak_total
    assert peaks[True] <= 0.25 * peaks[False], peaks
