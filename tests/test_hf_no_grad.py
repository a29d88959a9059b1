"""Forwards without gradients, and evaluation, of a converted model compute the plain model.

The rule: when autograd is not recording (``torch.no_grad``, ``torch.inference_mode``, ``generate``,
scoring), a BDIA stack computes g = 0, the layers in sequence, whatever the module's train/eval
mode; dropout still follows the mode. A converted pretrained model evaluates without the grid
rounding by default (``quantize_eval=False``), so the Trainer's eval loss is the deployed model's.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache, GPT2Config, GPT2LMHeadModel  # noqa: E402

import revbits  # noqa: E402
from helpers import gpt_blocks, random_signs, tiny_decoder_config  # noqa: E402
from revbits import hf  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

CONFIGS = {"llama": transformers.LlamaConfig, "qwen3": transformers.Qwen3Config}
ROWS, CHUNKS = 8, 4  # BDIA runs a training forward on 4 slices of 2 rows


def tiny_decoder(model_type: str) -> nn.Module:
    """A 3-layer random decoder on its shipped defaults (use_cache=True, no dropout), in float64."""
    torch.manual_seed(0)
    config = tiny_decoder_config(CONFIGS[model_type], head_dim=8)
    assert config.use_cache
    return AutoModelForCausalLM.from_config(config).double()


def left_padded(rows: int = ROWS, length: int = 10) -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (rows, length), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    for r in range(0, rows, 3):  # every third row padded on the left, by a different amount
        mask[r, : 1 + r % 4] = 0
    return {"input_ids": ids.masked_fill(mask == 0, 0), "attention_mask": mask}


# ------------------------------------------------------------------------------------------------
# The rule on the stack itself.


def test_a_bdia_stack_without_gradients_is_its_evaluation_function_in_either_mode():
    torch.manual_seed(0)
    stack = revbits.BDIAStack(gpt_blocks(3), batch_chunks=2).double()
    x = torch.randn(4, 5, 32, dtype=torch.float64)
    expected = stack.eval()(x)
    stack.train()
    with torch.no_grad():
        assert torch.equal(stack(x), expected)
    with torch.inference_mode():
        assert torch.equal(stack(x), expected)
    # explicit gammas still ask for the training function, with or without gradients
    signs = random_signs(3, 4)
    with torch.no_grad():
        trained = stack(x, gammas=signs)
    assert torch.equal(trained, stack(x, gammas=signs).detach())
    assert not torch.equal(trained, expected)


# ------------------------------------------------------------------------------------------------
# A converted decoder in train mode, without gradients: the plain model, cache and padding included.


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_no_grad_forward_in_train_mode_is_bitwise_the_plain_model(model_type):
    """The bug: every batch chunk ran each layer against the one DynamicCache of the default
    use_cache=True, so later chunks attended to earlier chunks' keys (and left padding crashed)."""
    model = tiny_decoder(model_type)
    reference = copy.deepcopy(model).train()
    hf.convert(model, "bdia", batch_chunks=CHUNKS).train()
    batch = left_padded()
    for context in (torch.no_grad, torch.inference_mode):
        with context():
            got, want = model(**batch), reference(**batch)
        assert torch.equal(got.logits, want.logits)
        assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length() == 10
        assert torch.equal(got.past_key_values.layers[2].keys, want.past_key_values.layers[2].keys)
    unpadded = {"input_ids": batch["input_ids"].clamp(min=1)}
    with torch.no_grad():
        assert torch.equal(model(**unpadded).logits, reference(**unpadded).logits)


@pytest.mark.parametrize("model_type", sorted(CONFIGS))
def test_generate_in_train_mode_is_bitwise_the_plain_model(model_type):
    model = tiny_decoder(model_type)
    reference = copy.deepcopy(model).train()
    hf.convert(model, "bdia").train()
    batch = left_padded()
    options = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    got, want = model.generate(**batch, **options), reference.generate(**batch, **options)
    assert torch.equal(got.sequences, want.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, want.logits, strict=True))


def test_a_training_forward_with_gradients_does_not_write_the_cache():
    """With gradients, BDIA runs each layer once per batch chunk and again in backward: each run gets a
    fresh copy of the empty cache, so the model's cache stays empty and no chunk sees another's keys
    (the chunked forward is bitwise the unchunked one). A cache holding past tokens is refused."""
    model = tiny_decoder("llama")
    hf.convert(model, "bdia", batch_chunks=CHUNKS, check=True, fused_loss=False).train()  # logits to compare
    stack = hf.revbits_stack(model)
    batch = left_padded()
    outputs = []
    for chunks in (CHUNKS, 1):
        stack.batch_chunks = chunks
        cache = DynamicCache(config=model.config)
        torch.manual_seed(5)  # the same gamma signs
        out = model(**batch, past_key_values=cache, use_cache=True, labels=batch["input_ids"])
        out.loss.backward()  # check=True: every state rebuilt bit for bit
        assert cache.get_seq_length() == 0 and out.past_key_values.get_seq_length() == 0
        outputs.append(out.logits.detach())
    assert torch.equal(*outputs)
    with torch.no_grad():
        past = model(**batch, use_cache=True).past_key_values
    assert past.get_seq_length() == 10
    with pytest.raises(ValueError, match="already holds 10 tokens while training with gradients"):
        model(input_ids=batch["input_ids"][:, :1], past_key_values=past, use_cache=True)


def test_standard_training_forward_fills_the_cache_as_the_plain_model_does():
    """memory='standard' runs each layer once on the whole batch, so the call reaches the layers unchanged."""
    model = tiny_decoder("llama")
    reference = copy.deepcopy(model).train()
    hf.convert(model, "standard").train()
    batch = left_padded()
    got, want = model(**batch, use_cache=True), reference(**batch, use_cache=True)
    assert torch.equal(got.logits, want.logits)
    assert got.past_key_values.get_seq_length() == want.past_key_values.get_seq_length() == 10


# ------------------------------------------------------------------------------------------------
# Evaluate what you deploy.


class Windows(torch.utils.data.Dataset):
    """12 right-padded token windows with their labels."""

    def __init__(self) -> None:
        self.ids = torch.randint(1, 64, (12, 10), generator=torch.Generator().manual_seed(2))
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, -3:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i].masked_fill(self.mask[i] == 0, 0)
        return {"input_ids": ids, "attention_mask": self.mask[i], "labels": ids.masked_fill(self.mask[i] == 0, -100)}


def test_trainer_eval_loss_is_the_exported_models(tmp_path):
    """hf.convert of a pretrained model evaluates without rounding to the grid (quantize_eval=False), so
    the Trainer's eval_loss is bitwise that of the model restore() and save_pretrained() ship.
    Models built from scratch by revbits keep quantize_eval=True: their trained function."""
    from transformers import Trainer, TrainingArguments

    model = tiny_decoder("llama").float()
    hf.convert(model, "bdia")
    assert hf.revbits_stack(model).quantize_eval is False
    assert revbits.stack(gpt_blocks(2), "bdia").quantize_eval is True

    def eval_loss(m: nn.Module, name: str) -> float:
        args = TrainingArguments(str(tmp_path / name), per_device_eval_batch_size=4, report_to=[], use_cpu=True)
        return Trainer(model=m, args=args, eval_dataset=Windows()).evaluate()["eval_loss"]

    converted = eval_loss(model, "converted")
    hf.restore(model).save_pretrained(tmp_path / "exported")
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert converted == eval_loss(exported, "exported")


# ------------------------------------------------------------------------------------------------
# GPT-2 with its default dropout: checkpointing is bitwise the plain model.


def test_gpt2_checkpoint_with_attention_dropout_gives_the_plain_gradients_bitwise():
    """GPT-2 in training reads its keys through the cache it is handed (a concatenated copy); a layer run
    without the cache read them as strided views, and under attention dropout (SDPA's math path) the
    gradients came out 8.8e-16 off in float64 while the loss was bitwise."""
    torch.manual_seed(0)
    config = GPT2Config(n_layer=3, n_embd=64, n_head=4, vocab_size=100, n_positions=64)
    assert config.attn_pdrop > 0 and config.resid_pdrop > 0 and config.use_cache
    plain = GPT2LMHeadModel(config).double().train()
    ids = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(1))

    def step(model: nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        torch.manual_seed(3)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    for memory in ("checkpoint", "bdia"):
        converted = hf.convert(copy.deepcopy(plain), memory, fused_loss=False).train()  # HF's own loss, as plain
        if memory == "bdia":  # BDIA's forward is its own function; reversible against plain autograd, same forward
            hf.revbits_stack(converted).reversible = False
            reference = step(converted)
            hf.revbits_stack(converted).reversible = True
        else:
            reference = step(plain)
        loss, grads = step(converted)
        assert torch.equal(loss, reference[0])
        for name, g in reference[1].items():
            tolerance = 0 if memory == "checkpoint" else 1e-10 * g.abs().max().item()
            assert (grads[name] - g).abs().max().item() <= tolerance, (memory, name)


# ------------------------------------------------------------------------------------------------
# The guard hook is removed through its handle.


def test_restore_removes_the_guard_hook_through_its_handle():
    model = tiny_decoder("llama")
    base = model.model
    own = base.register_forward_pre_hook(lambda module, args: None)
    hf.convert(model, "bdia")
    guard = hf.layers.conversion_of(model.model.layers[0]).guard
    assert guard is not None and guard.id in base._forward_pre_hooks and guard.id in base._forward_pre_hooks_with_kwargs
    twin = copy.deepcopy(model)  # converted on its own: its guard is its own
    hf.restore(model)
    assert list(base._forward_pre_hooks) == [own.id] and not base._forward_pre_hooks_with_kwargs
    assert len(twin.model._forward_pre_hooks) == 2
    hf.restore(twin)
    assert len(twin.model._forward_pre_hooks) == 1


def test_fresh_cache_copies_share_nothing_a_run_changes():
    """Each run of a layer gets a copy of the (empty) cache: its writes reach neither the model's cache nor
    another run's copy, for a growing cache with sliding-window slots, a preallocated (static) cache written
    in place, and an encoder-decoder cache; a run copies only the slot it uses."""
    from transformers import EncoderDecoderCache, StaticCache

    from revbits.hf.caches import FreshCache

    config = transformers.Gemma3TextConfig(num_hidden_layers=6, num_attention_heads=2, num_key_value_heads=2)
    ones, zeros = torch.ones(1, 2, 3, 4), torch.zeros(1, 2, 3, 4)
    where = {"cache_position": torch.arange(3)}
    caches = [
        DynamicCache(config=config),
        StaticCache(config=config, max_cache_len=8),
        EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config)),
    ]
    for cache in caches:
        fresh = FreshCache(cache)
        first, second = fresh.new(), fresh.new()
        target = first.self_attention_cache if isinstance(first, EncoderDecoderCache) else first
        keys, _ = target.update(ones, ones, 1, where)
        assert keys[..., :3, :].sum().item() == ones.sum().item()
        other = second.self_attention_cache if isinstance(second, EncoderDecoderCache) else second
        keys, _ = other.update(zeros, zeros, 1, where)
        assert keys.sum().item() == 0, type(cache).__name__
        assert cache.get_seq_length() == 0 and fresh.template.get_seq_length() == 0
        assert sum(target.layers.copied) == 1, "only the slot the run used was copied"
