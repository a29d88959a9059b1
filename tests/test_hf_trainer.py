"""A converted model under ``transformers.Trainer`` with its default arguments: it trains, resumes
from its own checkpoint to the weights of the uninterrupted run, and the checkpoint loads into
plain transformers with the trained weights."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from transformers import AutoModelForCausalLM, Trainer, TrainingArguments  # noqa: E402

from helpers import tiny_llama_config
from revbits import hf  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_llama() -> AutoModelForCausalLM:
    torch.manual_seed(0)
    config = tiny_llama_config()
    return AutoModelForCausalLM.from_config(config)


class Windows(torch.utils.data.Dataset):
    """16 random token windows, the last four of each padded."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, 64, (16, 12), generator=g)
        self.mask = torch.ones_like(self.ids)
        self.mask[::2, -4:] = 0

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = self.ids[i].masked_fill(self.mask[i] == 0, 0)
        return {"input_ids": ids, "attention_mask": self.mask[i], "labels": ids.masked_fill(self.mask[i] == 0, -100)}


def train(out, resume=None) -> AutoModelForCausalLM:
    model = hf.convert(tiny_llama(), "bdia")
    args = TrainingArguments(
        output_dir=str(out), max_steps=4, save_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True
    )
    Trainer(model=model, args=args, train_dataset=Windows()).train(resume_from_checkpoint=resume)
    return model


def test_trainer_trains_resumes_and_writes_plain_checkpoints(tmp_path):
    straight = train(tmp_path / "straight")
    assert hf.is_converted(straight)
    start = tiny_llama().state_dict()
    final = straight.state_dict()
    assert any(not torch.equal(final[k], v) for k, v in start.items() if ".layers." in k), "the layers trained"

    # a checkpoint written while converted is a plain transformers checkpoint of the trained weights
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "checkpoint-4")
    assert not hf.is_converted(plain)
    assert plain.state_dict().keys() == final.keys()
    assert all(torch.equal(plain.state_dict()[k], v) for k, v in final.items())

    # resuming from step 2 reaches the uninterrupted run's weights bit for bit
    resumed = train(tmp_path / "straight", resume=str(tmp_path / "straight" / "checkpoint-2"))
    assert all(torch.equal(resumed.state_dict()[k], v) for k, v in final.items())
