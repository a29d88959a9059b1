"""TRL's trainers on a converted model, on their default configs (``gradient_checkpointing=True``, bf16
autocast; the tests run on the CPU): SFT full fine-tuning and LoRA, GRPO and DPO train a converted tiny Qwen3, and SFT's
first-step gradients are those of the unconverted model (memory="checkpoint", bitwise) or of the
same forward under plain autograd (memory="bdia", to float32 rounding under bf16 autocast).
Everything is local: a word-level tokenizer built here, datasets from dicts, no network."""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
from torch import nn

from helpers import tiny_decoder_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import transformers  # noqa: E402
from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast, TrainerCallback  # noqa: E402
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer, SFTConfig, SFTTrainer  # noqa: E402

from revbits import hf  # noqa: E402

transformers.logging.set_verbosity_error()
pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(60)]


def tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer of 63 entries: <pad> 0, <eos> 1, <unk> 2, then the words w0 .. w59."""
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{w: i + 3 for i, w in enumerate(WORDS)}}
    model = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    model.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    model.decoder = decoders.WordPiece()  # joins the words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=model, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def sentences(count: int, seed: int) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(3, 9, (count,), generator=g).tolist()
    return [" ".join(WORDS[j] for j in torch.randint(0, 60, (n,), generator=g).tolist()) for n in lengths]


def tiny_qwen3() -> nn.Module:
    torch.manual_seed(0)
    config = tiny_decoder_config(transformers.Qwen3Config, head_dim=8, eos_token_id=1, bos_token_id=None)
    return AutoModelForCausalLM.from_config(config)


class FirstGradients(TrainerCallback):
    """Keeps the gradients the optimiser is about to apply at the first step, by parameter name."""

    def __init__(self) -> None:
        self.grads: dict[str, torch.Tensor] = {}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 0:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def train_sft(model: nn.Module, tmp_path, name: str, lora: bool) -> tuple[nn.Module, float, dict[str, torch.Tensor]]:
    """Two steps of SFTTrainer on its default SFTConfig; (trained model, loss, first-step gradients)."""
    args = SFTConfig(str(tmp_path / name), report_to=[], max_steps=2, per_device_train_batch_size=4, use_cpu=True)
    assert args.gradient_checkpointing, "TRL's default asks for transformers' checkpointing"
    first = FirstGradients()
    torch.manual_seed(1)  # the LoRA initialisation, the data order and BDIA's gamma signs
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_dict({"text": sentences(8, seed=2)}),
        processing_class=tokenizer(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]) if lora else None,
        callbacks=[first],
    )
    result = trainer.train()
    return trainer.model, result.training_loss, first.grads


def trainable(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("memory", ["checkpoint", "bdia"])
def test_sft_default_config_trains_a_converted_qwen3(memory, lora, tmp_path):
    converted = hf.convert(tiny_qwen3(), memory)
    if memory == "checkpoint":  # the unconverted model, under transformers' own checkpointing
        reference, tolerance = tiny_qwen3(), 0.0
    else:  # the same converted model, its forward under plain autograd
        reference, tolerance = hf.convert(tiny_qwen3(), memory), 1e-5
        hf.revbits_stack(reference).reversible = False
    start = trainable(tiny_qwen3())
    trained, loss, grads = train_sft(converted, tmp_path, "converted", lora)
    _, reference_loss, reference_grads = train_sft(reference, tmp_path, "reference", lora)

    assert math.isfinite(loss)
    if memory == "checkpoint":
        assert loss == reference_loss
    after = trainable(trained)
    changed = [n for n, p in after.items() if n not in start or not torch.equal(p, start[n])]
    assert changed and (lora or len(changed) == len(after)), "the trainable weights moved"
    assert grads.keys() == reference_grads.keys() and grads
    if lora:
        assert all("lora_" in n for n in grads)
    scale = max(g.abs().max().item() for g in reference_grads.values())
    for name, g in reference_grads.items():
        assert (grads[name] - g).abs().max().item() <= tolerance * scale, name


def test_grpo_trains_a_converted_qwen3(tmp_path):
    """GRPO generates its rollouts in train mode without gradients: there the converted model is the plain
    one (g = 0), and the policy update runs BDIA."""
    model = hf.convert(tiny_qwen3(), "bdia")
    start = trainable(model)

    def reward(completions, **kwargs):  # any reward that tells completions apart
        return [float(sum(map(ord, text)) % 7) for text in completions]

    args = GRPOConfig(
        output_dir=str(tmp_path),
        report_to=[],
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=4,
        use_cpu=True,
        logging_steps=1,
    )
    torch.manual_seed(1)
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=Dataset.from_dict({"prompt": sentences(4, seed=3)}),
        processing_class=tokenizer(),
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    norms = [h["grad_norm"] for h in trainer.state.log_history if "grad_norm" in h]
    assert len(norms) == 2 and all(math.isfinite(n) and n > 0 for n in norms)
    assert any(not torch.equal(p, start[n]) for n, p in trainable(model).items()), "the policy moved"


def test_dpo_trains_a_converted_qwen3(tmp_path):
    model = tiny_qwen3()
    reference = copy.deepcopy(model)  # the frozen reference policy, plain
    hf.convert(model, "bdia")
    start = trainable(model)
    data = {"prompt": sentences(4, seed=4), "chosen": sentences(4, seed=5), "rejected": sentences(4, seed=6)}
    args = DPOConfig(str(tmp_path), report_to=[], max_steps=2, per_device_train_batch_size=2, use_cpu=True)
    torch.manual_seed(1)
    trainer = DPOTrainer(
        model=model,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_dict(data),
        processing_class=tokenizer(),
    )
    result = trainer.train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    assert all(not torch.equal(p, start[n]) for n, p in trainable(model).items() if ".layers." in n)
