"""Untrusted files (issue 24, point 6), with real processes: an ``--hf`` directory whose model needs its
own Python code is refused in one line without a prompt and without running it; pickle weights
(``pytorch_model.bin``) are refused unless ``--allow-pickle``, and then a pickle that asks to run code
is refused naming the file; so is one planted in a checkpoint (its manifest updated to match)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from fault_tools import GPT, cli, one_line, snapshot
from revbits.io import write_manifest
from revbits.train.checkpoint import FILES, checkpoint_dirs
from revbits.train.tasks.hf import resolve_model_path
from test_train import run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = pytest.mark.usefixtures("one_thread")
HF = ["train", "--data", "shakespeare", "--batch-size", "2", "--block-size", "16", "--eval-batches", "1"]
HF += ["--steps", "2", "--eval-interval", "2", "--warmup", "1", "--memory", "standard"]


class Payload:
    """Unpickled, it would run a shell command that leaves a file behind."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def gpt2_dir(tmp_path) -> Path:
    """A tiny local GPT-2 (safetensors weights) with the MiniLM tokenizer."""
    folder = tmp_path / "gpt2"
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("all-MiniLM-L6-v2"))
    torch.manual_seed(0)
    config = GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=len(tokenizer), n_positions=32)
    GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def test_a_model_that_needs_its_own_code_is_refused_without_a_prompt(tmp_path, gpt2_dir):
    marker = tmp_path / "code-ran"
    config = json.loads((gpt2_dir / "config.json").read_text())
    config |= {"model_type": "evil", "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.M"}}
    (gpt2_dir / "config.json").write_text(json.dumps(config))
    code = f"open({str(marker)!r}, 'w').close()\nfrom transformers import GPT2Config as EvilConfig\n"
    (gpt2_dir / "evil.py").write_text(code)
    before = snapshot(gpt2_dir)
    code, log = cli(tmp_path, *HF, "--hf", gpt2_dir, "--out", tmp_path / "run")
    line = one_line(log)
    assert code == 2 and "needs its own Python code" in line and "never runs" in line, log
    assert "Do you wish to run the custom code" not in log and not marker.exists()
    assert snapshot(gpt2_dir) == before


def test_pickle_weights_need_allow_pickle_and_a_pickle_that_runs_code_is_refused_by_name(tmp_path, gpt2_dir):
    weights = load_file(str(gpt2_dir / "model.safetensors"))
    (gpt2_dir / "model.safetensors").unlink()
    torch.save(weights, gpt2_dir / "pytorch_model.bin")
    code, log = cli(tmp_path, *HF, "--hf", gpt2_dir, "--out", tmp_path / "refused")
    line = one_line(log)
    assert code == 2 and f"its weights are a pickle ({gpt2_dir / 'pytorch_model.bin'})" in line, log
    assert "--allow-pickle" in line and "cannot be built" not in line
    code, log = cli(tmp_path, *HF, "--hf", gpt2_dir, "--allow-pickle", "--out", tmp_path / "allowed")
    assert code == 0, log

    marker = tmp_path / "code-ran"
    torch.save({"transformer.wte.weight": Payload(marker)}, gpt2_dir / "pytorch_model.bin")
    code, log = cli(tmp_path, *HF, "--hf", gpt2_dir, "--allow-pickle", "--out", tmp_path / "malicious")
    line = one_line(log)
    assert code == 2 and f"{gpt2_dir / 'pytorch_model.bin'} is refused" in line and "system" in line, log
    assert not marker.exists()


def test_a_pickle_that_runs_code_planted_in_a_checkpoint_is_refused_by_name(tmp_path):
    out = tmp_path / "run"
    assert run(*GPT, "--out", out) == 0
    newest = checkpoint_dirs(out)[-1]
    marker = tmp_path / "code-ran"
    torch.save({"step": 6, "optimizer": Payload(marker)}, newest / "state.pt")
    write_manifest(newest, FILES, {"step": 6})  # the manifest vouches for it: only the loader can refuse it
    for argv in (["eval", out], [*GPT, "--steps", "8", "--out", out, "--resume"]):
        code, log = cli(tmp_path, *argv)
        line = one_line(log, argv[0])
        assert code == 2 and f"{newest / 'state.pt'} is refused: it is a pickle that asks to run code" in line, log
        assert "system" in line and not marker.exists()
