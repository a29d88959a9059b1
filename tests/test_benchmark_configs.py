"""The benchmark experiments are configuration files (benchmarks/configs/*.toml) that ``revbits train
--config`` reads, and the scripts build from them exactly the settings they held as Python literals
before (the literals are kept here, as they were in the scripts)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers import BENCHMARKS, benchmark_script
from revbits.cli import build_parser
from revbits.train import TrainConfig
from revbits.train.commands import _config_from_args
from revbits.train.config import read_config_file

CONFIGS = BENCHMARKS / "configs"

# The literals of benchmarks/quality.py before its experiments moved to configs/quality-<name>.toml.
QUALITY = {
    "vit": dict(model="vit", data="fashion-mnist", train_subset=10_000, steps=2000, batch_size=64, lr=1e-3,
                min_lr=1e-5, warmup=100, eval_interval=500, n_layer=4, n_head=4, d_model=64, patch_size=7,
                dropout=0.1, weight_decay=0.05),
    "gpt": dict(model="gpt", data="shakespeare", train_subset=20_000, steps=2500, batch_size=16, block_size=64,
                lr=1e-3, min_lr=1e-4, warmup=100, eval_interval=250, eval_batches=20, n_layer=4, n_head=4,
                d_model=128, dropout=0.1),
    "translator": dict(model="translator", data="bible-en-fr", steps=800, batch_size=32, block_size=64, lr=1e-3,
                       min_lr=1e-4, warmup=100, eval_interval=500, eval_batches=20, n_layer=4, n_head=4,
                       d_model=128, dropout=0.1),
    "rnnlm": dict(model="rnnlm", data="shakespeare", steps=1000, batch_size=32, block_size=35, lr=3e-3, min_lr=3e-4,
                  warmup=50, eval_interval=250, eval_batches=40, n_layer=2, d_model=256, dropout=0.2, cell="gru",
                  forget_bits=3),
    "rnn-translator": dict(model="rnn-translator", data="bible-en-fr", steps=600, batch_size=32, block_size=64,
                           lr=3e-3, min_lr=3e-4, warmup=50, eval_interval=300, eval_batches=20, n_layer=1,
                           d_model=128, dropout=0.2, cell="gru", forget_bits=3, attention_slice=16),
}
QUALITY["rnnlm-500"] = {**QUALITY["rnnlm"], "steps": 500}
QUALITY["rnnlm-3000"] = {**QUALITY["rnnlm"], "steps": 3000, "eval_interval": 500}
# benchmarks/petra_accuracy.py: COMMON and MODELS.
PETRA_COMMON = dict(data="fashion-mnist", train_subset=10_000, steps=2000, batch_size=64, lr=1e-3, min_lr=1e-5,
                    warmup=100, eval_interval=500, weight_decay=0.05, grad_clip=0.0)
PETRA = {
    "vit": dict(model="vit", memory="bdia", n_layer=4, n_head=4, d_model=64, patch_size=7, dropout=0.1,
                **PETRA_COMMON),
    "revnet": dict(model="revnet", memory="standard", n_layer=2, n_head=1, d_model=16, **PETRA_COMMON),
}
# benchmarks/hf_llama_finetune.py: FINETUNE (its hf was a placeholder main() replaced) and pretrain()'s flags.
FINETUNE = dict(model="hf", hf="placeholder", data="shakespeare", steps=150, batch_size=8, block_size=64, lr=3e-4,
                min_lr=3e-5, warmup=15, weight_decay=0.01, eval_interval=50, eval_batches=20, log_interval=25)


def old_pretrain_argv(start: Path, run: Path, steps: int) -> list[str]:
    argv = ["train", "--hf", str(start), "--data", "wiki-extract", "--memory", "standard", "--steps", str(steps)]
    argv += ["--batch-size", "16", "--block-size", "64", "--lr", "1e-3", "--warmup", "30", "--eval-interval"]
    argv += [str(max(steps // 4, 1)), "--eval-batches", "20", "--log-interval", "50", "--out", str(run)]
    return argv


# The measurement scripts: (script, its name for the setting) -> the literal.
MEASURED = {
    ("mesa_gradients", "gpt"): dict(model="gpt", n_layer=6, n_head=4, d_model=128, block_size=128, batch_size=16,
                                    dropout=0.1),
    ("mesa_gradients", "vit"): dict(model="vit", n_layer=6, n_head=4, d_model=128, patch_size=4, batch_size=64,
                                    dropout=0.1),
    ("revrnn_memory", "BASE"): dict(model="rnnlm", memory="reversible", d_model=256, n_layer=2, block_size=35,
                                    batch_size=32, lr=3e-3),
    ("revrnn_translator_memory", "BASE"): dict(model="rnn-translator", memory="reversible", d_model=256, n_layer=1,
                                               attention_slice=20, batch_size=32, block_size=64, lr=3e-3, dropout=0.2),
    ("revrnn_speed", "RNNLM"): dict(model="rnnlm", d_model=256, n_layer=2, block_size=35, batch_size=32, dropout=0.2),
    ("revrnn_speed", "TRANSLATOR"): dict(model="rnn-translator", d_model=128, n_layer=1, attention_slice=16,
                                         block_size=64, batch_size=32, dropout=0.2),
}
MEASURED_FILES = ["mesa-gradients-gpt", "mesa-gradients-vit", "revrnn-memory", "revrnn-translator-memory",
                  "revrnn-speed-rnnlm", "revrnn-speed-rnn-translator"]
# benchmarks/run_model_memory.sh's flags.
MODEL_MEMORY = {
    "vit": "--model vit --n-layer 6 --d-model 128 --patch-size 4 --batch-size 128",
    "gpt": "--model gpt --n-layer 6 --d-model 128 --block-size 256 --batch-size 32",
}


def from_command_line(*argv: str | Path) -> TrainConfig:
    """The configuration ``revbits train ARGV`` trains."""
    return _config_from_args(build_parser().parse_args(["train", *map(str, argv)]))


def test_every_config_file_is_read_by_revbits_train_and_used_by_a_script():
    files = sorted(CONFIGS.glob("*.toml"))
    expected = [f"quality-{n}" for n in QUALITY] + [f"petra-accuracy-{n}" for n in PETRA]
    expected += ["hf-llama-finetune", "hf-llama-pretrain"] + [f"model-memory-{n}" for n in MODEL_MEMORY]
    expected += MEASURED_FILES
    assert sorted(f.stem for f in files) == sorted(expected)
    for path in files:
        config = from_command_line("--config", path)
        assert config == TrainConfig.from_dict(read_config_file(path)), path.name
        assert config.out == TrainConfig.out, f"{path.name}: the scripts choose the run directories"


def test_quality_experiments_are_the_former_literals(monkeypatch):
    quality = benchmark_script("quality", monkeypatch)
    assert list(quality.EXPERIMENTS) == ["vit", "gpt", "translator", "rnnlm", "rnnlm-500", "rnnlm-3000",
                                         "rnn-translator"]  # the default order of --experiments
    for name, literal in QUALITY.items():
        assert quality.EXPERIMENTS[name] == TrainConfig(**literal), name


def test_petra_accuracy_models_are_the_former_literals(monkeypatch):
    petra_accuracy = benchmark_script("petra_accuracy", monkeypatch)
    assert list(petra_accuracy.MODELS) == list(PETRA)
    for name, literal in PETRA.items():
        assert petra_accuracy.MODELS[name] == TrainConfig(**literal), name


@pytest.mark.parametrize("name, setting", MEASURED)
def test_measurement_settings_are_the_former_literals(monkeypatch, name, setting):
    module = benchmark_script(name, monkeypatch)
    got = module.CONFIGS[setting] if name == "mesa_gradients" else getattr(module, setting)
    assert got == TrainConfig(**MEASURED[name, setting])


@pytest.mark.parametrize("name, table", [("quality", QUALITY), ("petra_accuracy", PETRA)])
def test_committed_results_were_run_with_these_files(name, table):
    """results.json records each experiment's options as run (at --scale 1): the files give the same.
    Options added to revbits after a run count as their defaults."""
    saved = json.loads((BENCHMARKS / "results" / name / "results.json").read_text())["configs"]
    prefix = name.replace("_", "-")
    assert saved.keys() == table.keys()
    for experiment, options in saved.items():
        config = TrainConfig.from_dict(read_config_file(CONFIGS / f"{prefix}-{experiment}.toml")).to_dict()
        assert {k: config[k] for k in options} == options, experiment


def test_hf_llama_settings_are_the_former_literals(monkeypatch, tmp_path):
    pytest.importorskip("transformers")
    hf_llama = benchmark_script("hf_llama_finetune", monkeypatch)
    assert hf_llama.FINETUNE == TrainConfig(**{**FINETUNE, "hf": hf_llama.FINETUNE.hf})
    start, run = tmp_path / "init", tmp_path / "pretrain-run"
    for steps in (600, 4):
        new = from_command_line(*hf_llama.pretrain_argv(start, run, steps)[1:])
        assert new == from_command_line(*old_pretrain_argv(start, run, steps)[1:]), steps


@pytest.mark.parametrize("model", MODEL_MEMORY)
def test_model_memory_files_are_the_former_flags(model):
    flags = MODEL_MEMORY[model].split()
    assert from_command_line("--config", CONFIGS / f"model-memory-{model}.toml") == from_command_line(*flags)
    text = (BENCHMARKS / "run_model_memory.sh").read_text()
    assert "benchmarks/configs/model-memory-$model.toml" in text and "for model in vit gpt" in text
