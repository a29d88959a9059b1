"""PEFT's LoRA on a converted model, in either order, with LoraConfig's defaults: only the adapters
train, their gradients are those of plain autograd on the same forward, an adapter saved while
converted loads into a plain model, and after restore() merge_and_unload gives the fine-tuned plain
model."""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from helpers import tiny_llama_config
from revbits import hf

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config()
    return AutoModelForCausalLM.from_config(config).double().eval()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def lora(model):
    return get_peft_model(model, LoraConfig(task_type="CAUSAL_LM"))  # defaults: r=8, q_proj and v_proj


def step(model, seed: int = 3) -> dict[str, torch.Tensor]:
    """One training forward/backward; the gradients by parameter name."""
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    model(**batch()).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def sgd(model, lr: float = 0.5) -> None:
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= lr * p.grad


def check_adapter_gradients(model) -> None:
    """Only LoRA tensors get gradients, equal to those of the same forward under plain autograd.
    One step first, so LoRA's B (zero at initialisation) is not zero and A's gradient is not."""
    step(model)
    sgd(model)
    reversible = step(model)
    assert reversible and all("lora_" in n for n in reversible)
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)
    hf.revbits_stack(model).reversible = False
    plain = step(model)
    hf.revbits_stack(model).reversible = True
    assert reversible.keys() == plain.keys()
    for name, g in plain.items():
        assert g.abs().max() > 0, name
        assert (reversible[name] - g).abs().max() <= 1e-10 * g.abs().max(), name


def test_lora_then_convert():
    model = lora(tiny_llama())
    hf.convert(model, "bdia")
    check_adapter_gradients(model)


def test_convert_then_lora():
    model = tiny_llama()
    hf.convert(model, "bdia")
    model = lora(model)
    check_adapter_gradients(model)


def test_adapter_saved_while_converted_loads_into_a_plain_model(tmp_path):
    model = lora(tiny_llama())
    hf.convert(model, "bdia")
    for _ in range(2):
        step(model)
        sgd(model)
    trained = {k: v.clone() for k, v in model.state_dict().items() if "lora_" in k}
    model.save_pretrained(tmp_path)  # the adapter only, without restore()
    plain = PeftModel.from_pretrained(tiny_llama(), tmp_path)
    loaded = {k: v for k, v in plain.state_dict().items() if "lora_" in k}
    assert loaded.keys() == trained.keys() and not any("stack" in k for k in loaded)
    assert all(torch.equal(loaded[k], v) for k, v in trained.items())


def test_merge_and_unload_after_restore_gives_the_fine_tuned_plain_model():
    model = lora(tiny_llama())
    hf.convert(model, "bdia")
    for _ in range(2):
        step(model)
        sgd(model)
    twin = lora(tiny_llama())  # never converted, given the same adapter weights
    twin.load_state_dict(model.state_dict())
    merged = hf.restore(model).merge_and_unload()
    expected = twin.merge_and_unload()
    assert type(merged) is type(expected) and not hf.is_converted(merged)
    assert merged.state_dict().keys() == expected.state_dict().keys()
    assert all(torch.equal(merged.state_dict()[k], v) for k, v in expected.state_dict().items())
    changed = [k for k, v in expected.state_dict().items() if not torch.equal(v, tiny_llama().state_dict()[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)
    copy.deepcopy(merged)  # a plain module again
