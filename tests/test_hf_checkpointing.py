"""transformers' own activation checkpointing asked of a converted model (``gradient_checkpointing_enable()``,
``TrainingArguments(gradient_checkpointing=True)``, TRL's default): honoured as what the revbits stack
already does, with one info line, never a crash, and no transformers checkpointing layered on top."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from torch import nn

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from helpers import tiny_llama_config  # noqa: E402
from revbits import hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(tiny_llama_config()).double()


def checkpointing(model: nn.Module, on: bool) -> None:
    """transformers' own activation checkpointing on or off, under the name this version uses."""
    name = "activation_checkpointing" if hasattr(model, "activation_checkpointing_enable") else "gradient_checkpointing"
    getattr(model, f"{name}_{'enable' if on else 'disable'}")()


BATCH = {"input_ids": torch.randint(1, 64, (4, 10), generator=torch.Generator().manual_seed(1))}


def gradients(model: nn.Module) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(3)
    model(**BATCH, labels=BATCH["input_ids"]).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def forbid_transformers_checkpointing(model: nn.Module) -> None:
    """Make every layer's checkpointing function raise, so a test fails if transformers checkpoints a layer."""

    def refuse(*args, **kwargs):
        raise AssertionError("transformers' checkpointing ran on a converted layer")

    for layer in model.model.layers:
        layer._gradient_checkpointing_func = refuse


def info_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "revbits.hf" and r.levelno == logging.INFO]


@pytest.mark.parametrize("memory", ["bdia", "checkpoint"])
def test_checkpointing_enabled_after_converting_is_the_stacks_job(memory, caplog):
    model = hf.convert(tiny_llama(), memory)
    expected = gradients(model)
    with caplog.at_level(logging.INFO, logger="revbits.hf"):
        checkpointing(model, True)
        checkpointing(model, False)
        checkpointing(model, True)  # TRL turns it off and on around generation
    lines = info_lines(caplog)
    assert len(lines) == 1, lines
    assert f"memory={memory!r}" in lines[0] and "not added on top" in lines[0]
    forbid_transformers_checkpointing(model)
    got = gradients(model)
    assert got.keys() == expected.keys() and all(torch.equal(got[n], g) for n, g in expected.items())


def test_checkpointing_enabled_before_converting_is_kept_for_the_restored_model(caplog):
    model = tiny_llama()
    checkpointing(model, True)
    with caplog.at_level(logging.INFO, logger="revbits.hf"):
        hf.convert(model, "bdia")
    assert len(info_lines(caplog)) == 1
    assert not any(layer.gradient_checkpointing for layer in model.model.layers)
    plain = hf.convert(tiny_llama(), "bdia")
    forbid_transformers_checkpointing(model)
    expected, got = gradients(plain), gradients(model)
    assert all(torch.equal(got[n], g) for n, g in expected.items())

    hf.restore(model)  # the plain model checkpoints as it was asked to
    assert all(layer.gradient_checkpointing for layer in model.model.layers)
    calls = []
    for layer in model.model.layers:
        layer._gradient_checkpointing_func = lambda fn, *args, **kwargs: calls.append(1) or fn(*args, **kwargs)
    gradients(model)
    assert len(calls) == len(model.model.layers)


class Windows(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(1, 64, (8, 10), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_trainer_with_gradient_checkpointing_trains_a_converted_model(tmp_path, caplog):
    model = hf.convert(tiny_llama().float(), "bdia")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = TrainingArguments(
        str(tmp_path),
        max_steps=2,
        per_device_train_batch_size=4,
        report_to=[],
        use_cpu=True,
        gradient_checkpointing=True,  # the name every transformers 5.x release takes
    )
    with caplog.at_level(logging.INFO, logger="revbits.hf"):
        result = Trainer(model=model, args=args, train_dataset=Windows()).train()
    assert len(info_lines(caplog)) == 1
    assert torch.isfinite(torch.tensor(result.training_loss))
    layers = [n for n in before if ".layers." in n]
    assert all(not torch.equal(model.get_parameter(n), before[n]) for n in layers), "every layer weight trained"
