"""The training command end to end on tiny format-true data: train, resume, eval, sample, plot, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from data_files import write_fashion
from revbits.cli import main
from revbits.data import bible, shakespeare
from revbits.train.tasks import make_task, read_run_config

TINY = [
    "--steps",
    "6",
    "--eval-interval",
    "3",
    "--eval-batches",
    "2",
    "--batch-size",
    "4",
    "--block-size",
    "16",
    "--n-layer",
    "3",
    "--n-head",
    "2",
    "--d-model",
    "16",
    "--warmup",
    "2",
    "--log-interval",
    "2",
]
BOOKS = ["Genesis", "Exodus", "Joshua", "John", "Judges", "Romans"]  # train, train, valid, valid, test, test


@pytest.fixture(autouse=True)
def tiny_data(tmp_path, monkeypatch):
    """A cache with a small text, a small Fashion-MNIST and a small set of verse pairs."""
    root = tmp_path / "cache"
    monkeypatch.setenv("REVBITS_DATA", str(root))
    rng = np.random.default_rng(0)
    words = ["thou", "art", "the", "king", "and", "I", "shall", "speak", "no", "more", "lord", "night"]
    text = "\n".join(" ".join(rng.choice(words, 8)) + "." for _ in range(600))
    (root / shakespeare.NAME).mkdir(parents=True)
    (root / shakespeare.NAME / shakespeare.TEXT_FILE).write_text(text)
    write_fashion(root / "fashion-mnist", n_train=60, n_test=20)
    fr = {
        "thou": "tu",
        "art": "es",
        "the": "le",
        "king": "roi",
        "and": "et",
        "I": "je",
        "shall": "vais",
        "speak": "parler",
        "no": "ne",
        "more": "plus",
        "lord": "seigneur",
        "night": "nuit",
    }
    rows = ["book\tchapter\tverse\ten\tfr"]
    for i in range(240):
        en = list(rng.choice(words, rng.integers(3, 7)))
        rows.append(f"{BOOKS[i % 6]}\t1\t{i + 1}\t{' '.join(en)}.\t{' '.join(fr[w] for w in en)}.")
    (root / bible.NAME).mkdir(parents=True)
    (root / bible.NAME / bible.PAIRS_FILE).write_text("\n".join(rows) + "\n")
    return root


def run(*argv: str) -> int:
    return main([str(a) for a in argv])


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    return load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))


def test_gpt_trains_evaluates_samples_and_plots(tmp_path, capsys):
    out = tmp_path / "gpt"
    assert run("train", "--model", "gpt", "--memory", "bdia", *TINY, "--out", out) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "valid"] == [3, 6]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in records if r["split"] == "train")
    capsys.readouterr()
    assert run("eval", out, "--split", "test") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["split"] == "test" and metrics["perplexity"] > 1
    assert run("sample", out, "--prompt", "thou", "--tokens", "20") == 0
    assert capsys.readouterr().out.startswith("thou")
    assert run("plot", out, "--out", tmp_path / "curves.png") == 0
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("memory", ["bdia", "standard", "mesa", "bdia+mesa"])
def test_resume_continues_bit_for_bit(tmp_path, memory):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "--model", "gpt", "--memory", memory, "--dropout", "0.1", *TINY]
    assert run(*common, "--out", straight) == 0
    assert run(*common, "--out", resumed, "--stop-at", "3") == 0
    assert len(weights(resumed)) and run(*common, "--out", resumed, "--resume") == 0
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def records(run_dir):  # everything but the timings and the process's memory
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if not k.endswith("_per_s") and k != "peak_mib"} for r in rows]

    assert records(straight) == records(resumed)


@pytest.mark.parametrize("memory", ["mesa", "bdia+mesa"])
@pytest.mark.parametrize("model", ["gpt", "vit"])
def test_models_learn_with_8bit_activations(tmp_path, memory, model):
    """The loss falls, and ends where training with every activation exact ends."""
    flags = ["--steps", "40", "--lr", "3e-3", "--log-interval", "5", "--eval-interval", "40", "--dropout", "0"]
    extra = ["--patch-size", "7"] if model == "vit" else []
    losses = {}
    for mode in (memory, memory.replace("+mesa", "").replace("mesa", "standard")):
        out = tmp_path / mode
        assert run("train", "--model", model, "--memory", mode, *TINY, *flags, *extra, "--out", out) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r["split"] == "train"]
    compressed, exact = losses.values()
    assert compressed[-1] < 0.95 * compressed[0]
    assert abs(compressed[-1] - exact[-1]) < 0.01 * exact[-1]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
@pytest.mark.slow
def test_word_rnn_lm_trains_reversibly_and_as_standard(tmp_path, capsys, cell):
    """Both arms train; the reversible one learns like the standard one does (same data, steps)."""
    flags = ["--model", "rnnlm", "--cell", cell, *TINY, "--steps", "30", "--lr", "3e-3", "--eval-interval", "30"]
    losses = {}
    for memory in ("reversible", "standard"):
        out = tmp_path / memory
        assert run("train", *flags, "--memory", memory, "--out", out) == 0
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[memory] = [r["loss"] for r in records if r["split"] == "train"]
        capsys.readouterr()
        assert run("eval", out, "--split", "test") == 0
        assert json.loads(capsys.readouterr().out)["perplexity"] > 1
    # the tiny text is random words, so the loss can only fall to about log(vocabulary)
    assert losses["reversible"][-1] < losses["reversible"][0] - 0.1
    assert losses["reversible"][-1] < 1.05 * losses["standard"][-1]


def test_vit_trains_on_images(tmp_path, capsys):
    out = tmp_path / "vit"
    assert run("train", "--model", "vit", "--memory", "bdia", *TINY, "--patch-size", "7", "--out", out) == 0
    capsys.readouterr()
    assert run("eval", out, "--split", "test", "--no-quantize-eval") == 0
    assert 0 <= json.loads(capsys.readouterr().out)["accuracy"] <= 1


@pytest.mark.parametrize("decode", ["greedy", "beam"])
def test_translator_trains_and_scores_bleu(tmp_path, capsys, decode):
    out = tmp_path / "translator"
    assert run("train", "--model", "translator", "--memory", "bdia", *TINY, "--n-layer", "4", "--out", out) == 0
    capsys.readouterr()
    assert run("eval", out, "--decode", decode, "--max-sentences", "8") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["decode"] == decode and metrics["sentences"] == 8 and 0 <= metrics["bleu"] <= 100


@pytest.mark.parametrize("memory", ["reversible", "standard"])
def test_rnn_translator_trains_and_scores_bleu(tmp_path, capsys, memory):
    out = tmp_path / memory
    flags = ["--model", "rnn-translator", "--memory", memory, *TINY, "--n-layer", "1", "--attention-slice", "4"]
    assert run("train", *flags, "--out", out) == 0
    capsys.readouterr()
    assert run("eval", out, "--max-sentences", "8") == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["sentences"] == 8 and 0 <= metrics["bleu"] <= 100 and metrics["perplexity"] > 1
    assert run("eval", out, "--decode", "beam", "--max-sentences", "8") == 2
    assert "greedily" in capsys.readouterr().err


@pytest.mark.slow
def test_vit_trains_with_petra_stages_and_evaluates_like_any_run(tmp_path, capsys):
    out = tmp_path / "petra"
    petra = ["--parallel", "petra", "--stages", "2", "--accumulation", "2"]
    assert run("train", "--model", "vit", "--memory", "bdia", *TINY, "--patch-size", "7", *petra, "--out", out) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["split"] == "train"] == [2, 4, 6]
    valid = [r for r in records if r["split"] == "valid"][-1]
    capsys.readouterr()
    assert run("eval", out, "--split", "valid") == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(valid["loss"], rel=1e-6)
    config = read_run_config(out)
    torch.manual_seed(config.seed)
    initial = make_task(config).build_model().state_dict()
    trained = weights(out)
    assert all(not torch.equal(trained[name], initial[name]) for name in ("patch_embedding.weight", "head.weight"))
    assert run("train", "--model", "gpt", *TINY, *petra, "--out", tmp_path / "gpt") == 2
    assert "vit" in capsys.readouterr().err


@pytest.mark.slow
def test_petra_run_stops_and_resumes_as_if_uninterrupted(tmp_path, capsys):
    """A run drains and saves at every --eval-interval boundary, so a run stopped at one and resumed
    must equal the straight one, bit for bit, even with two stages: data offsets, optimiser and
    schedule carry over, and the drain is where the straight run drains too."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = ["train", "--model", "vit", "--memory", "bdia", *TINY, "--patch-size", "7"]
    petra = ["--parallel", "petra", "--stages", "2", "--accumulation", "2"]
    assert run(*common, *petra, "--out", straight) == 0
    assert run(*common, *petra, "--out", resumed, "--stop-at", "3") == 0
    assert run(*common, *petra, "--out", resumed, "--resume") == 0
    a, b = weights(straight), weights(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    train_steps = [json.loads(line)["step"] for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert train_steps == [2, 3, 4, 6, 6]  # train 2, valid 3, train 4 and 6, valid 6
    assert len(list(resumed.glob("stages-*"))) == 1  # the first segment's states were replaced
    capsys.readouterr()
    assert run(*common, *petra, "--out", tmp_path / "new", "--resume") == 2
    assert "holds no run to continue (no config.json)" in capsys.readouterr().err  # as without --parallel


@pytest.mark.slow
def test_revnet_trains_plainly_and_with_petra_split_by_measured_time(tmp_path, capsys):
    shape = [*TINY, "--d-model", "8", "--n-layer", "1"]
    assert run("train", "--model", "revnet", *shape, "--out", tmp_path / "plain") == 0
    assert set(weights(tmp_path / "plain")) == set(weights_of_fresh_model(tmp_path / "plain"))
    petra = ["train", "--model", "revnet", *shape, "--parallel", "petra", "--stages", "2"]
    assert run(*petra, "--out", tmp_path / "timed", "--stop-at", "3") == 0
    progress = json.loads((tmp_path / "timed" / "progress.json").read_text())
    assert len(progress["sizes"]) == 2 and sum(progress["sizes"]) == 5  # stem, 2 coupling, downsampling, head
    assert run(*petra, "--out", tmp_path / "timed", "--resume") == 0  # resumes on the split it was trained with
    assert json.loads((tmp_path / "timed" / "progress.json").read_text())["sizes"] == progress["sizes"]
    assert run(*petra, "--stage-split", "1,4", "--out", tmp_path / "given") == 0
    assert json.loads((tmp_path / "given" / "progress.json").read_text())["sizes"] == [1, 4]
    trained, initial = weights(tmp_path / "given"), weights_of_fresh_model(tmp_path / "given")
    assert all(not torch.equal(trained[name], initial[name]) for name in trained)
    capsys.readouterr()
    assert run(*petra, "--stage-split", "1,2,2", "--out", tmp_path / "bad") == 2
    assert "2 positive piece counts" in capsys.readouterr().err
    assert run("train", "--model", "revnet", *shape, "--memory", "bdia", "--out", tmp_path / "bdia") == 2
    assert "standard" in capsys.readouterr().err


@pytest.mark.slow
def test_petra_under_torchrun_equals_the_self_launched_run(tmp_path):
    """``torchrun --nproc-per-node 2 -m revbits.cli train --parallel petra --stages 2`` runs one stage per
    torchrun process and trains exactly what ``revbits train`` does when it starts the processes itself."""
    args = ["--model", "revnet", *TINY, "--d-model", "8", "--n-layer", "1", "--parallel", "petra", "--stages", "2"]
    args += ["--stage-split", "2,3"]
    assert run("train", *args, "--out", tmp_path / "spawned") == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command = [*torchrun, "-m", "revbits.cli", "train", *args, "--out", str(tmp_path / "torchrun")]
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"}
    )
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = weights(tmp_path / "spawned"), weights(tmp_path / "torchrun")
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
    assert done.stdout.count('"run"') == 1  # only the last stage reports


def weights_of_fresh_model(run_dir: Path) -> dict[str, torch.Tensor]:
    """The state dict of the run's model as built before training."""
    config = read_run_config(run_dir)
    torch.manual_seed(config.seed)
    return make_task(config).build_model().state_dict()


def test_config_file_is_read_and_flags_override_it(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'model = "gpt"\nmemory = "checkpoint"\nsteps = 2\nd_model = 16\nn_head = 2\nn_layer = 2\n'
        "block_size = 16\nbatch_size = 4\neval_batches = 1\nwarmup = 1\n"
    )
    out = tmp_path / "from-file"
    assert run("train", "--config", config, "--steps", "3", "--out", out) == 0
    saved = json.loads((out / "config.json").read_text())
    assert saved["memory"] == "checkpoint" and saved["steps"] == 3 and saved["d_model"] == 16


def test_missing_data_set_says_how_to_get_it(tmp_path, tiny_data, capsys):
    (tiny_data / shakespeare.NAME / shakespeare.TEXT_FILE).unlink()
    assert run("train", "--model", "gpt", *TINY, "--out", tmp_path / "x") == 2
    assert "revbits data fetch shakespeare" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--d-model", "30", "--n-head", "4"], "not divisible"),
        (["--stop-at", "99"], "stop_at must be between"),
        (["--memory", "bdia", "--n-layer", "1"], "n_layer >= 2"),
        (["--model", "vit", "--patch-size", "5"], "is not a multiple of patch_size"),  # the model's own check
        (["--block-size", "4000"], "fewer than block_size + 2"),
    ],
)
def test_bad_options_are_named(tmp_path, capsys, flags, message):
    assert run("train", "--model", "gpt", *TINY, *flags, "--out", tmp_path / "x") == 2
    assert message in capsys.readouterr().err


def test_unknown_choice_and_config_keys_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        run("train", "--memory", "fast")
    assert "invalid choice" in capsys.readouterr().err
    config = tmp_path / "bad.json"
    config.write_text('{"modle": "gpt"}')
    assert run("train", "--config", config, "--out", tmp_path / "x") == 2
    assert "unknown option(s) modle" in capsys.readouterr().err


def test_existing_runs_are_never_overwritten_and_changed_resumes_refused(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", "gpt", *TINY, "--out", out) == 0
    before = weights(out)
    assert run("train", "--model", "gpt", *TINY, "--out", out) == 2
    assert "pass --resume" in capsys.readouterr().err
    assert run("train", "--model", "gpt", *TINY, "--d-model", "32", "--out", out, "--resume") == 2
    assert "cannot resume with changed options (d_model" in capsys.readouterr().err
    after = weights(out)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_corrupt_checkpoint_is_reported(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", "gpt", *TINY, "--out", out) == 0
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text().strip()
    data = (latest / "model.safetensors").read_bytes()
    (latest / "model.safetensors").write_bytes(data[: len(data) // 2])
    capsys.readouterr()
    assert run("eval", out) == 2
    err = capsys.readouterr().err
    assert "model.safetensors is" in err and "cut short" in err
    (latest / "model.safetensors").write_bytes(data)
    (latest / "state.pt").write_bytes(b"not a checkpoint")
    assert run("train", "--model", "gpt", *TINY, "--out", out, "--resume", "--steps", "8") == 2
    err = capsys.readouterr().err
    assert "state.pt is 16 bytes, its manifest records" in err and "move step_00000006 aside" in err


def test_a_blank_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("train", "--model", "gpt", *TINY, "--out", out) == 0
    (out / "checkpoints" / "latest").write_text("")
    capsys.readouterr()
    assert run("eval", out) == 0
    assert json.loads(capsys.readouterr().out)["loss"] > 0


def test_a_run_directory_with_metrics_but_no_checkpoint_is_not_reused(tmp_path, capsys):
    out = tmp_path / "crashed"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')
    assert run("train", "--model", "gpt", *TINY, "--out", out) == 2
    assert "not a revbits run directory" in capsys.readouterr().err  # without a config.json it is not a run
    assert (out / "metrics.jsonl").read_text().count("\n") == 1
    (out / "config.json").write_text(json.dumps({"model": "gpt"}))  # a run killed before its first checkpoint
    assert run("train", "--model", "gpt", *TINY, "--out", out) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert (out / "metrics.jsonl").read_text().count("\n") == 1


def test_config_values_of_the_wrong_type_are_named(tmp_path, capsys):
    config = tmp_path / "typed.json"
    config.write_text('{"quantize_eval": "false"}')
    assert run("train", "--config", config, "--out", tmp_path / "x") == 2
    assert "quantize_eval must be bool" in capsys.readouterr().err


def test_a_run_saved_before_an_option_existed_resumes_with_its_default():
    from revbits.train.config import TrainConfig
    from revbits.train.rundir import check_resumable

    config = TrainConfig(model="vit", steps=10)
    older = {k: v for k, v in config.to_dict().items() if k != "stage_split"}  # written before the option
    check_resumable(older, config)  # the missing option counts as its default: no error
    with pytest.raises(ValueError, match="stage_split"):
        check_resumable(older, TrainConfig(model="vit", steps=10, stage_split="params"))


def test_the_timed_petra_split_is_measured_once_and_reused(tiny_data):
    """Issue 15, point 8: the same command trains the same split. The measured split is stored per model
    shape, device, stage count and machine; a later run reads it instead of timing again."""
    from dataclasses import replace

    from revbits.train.config import TrainConfig
    from revbits.train.petra import TaskBatches, stage_sizes

    config = TrainConfig(model="revnet", d_model=8, n_layer=1, batch_size=4, parallel="petra", stages=2)
    data = TaskBatches(config, 1)
    first = stage_sizes(config, data)
    stored = list((tiny_data / "petra-splits").glob("*.json"))
    assert len(stored) == 1 and json.loads(stored[0].read_text())["sizes"] == first
    planted = [1, 4] if first != [1, 4] else [2, 3]  # proves the file is read, not the pieces timed again
    stored[0].write_text(json.dumps({"sizes": planted}))
    assert stage_sizes(config, data) == planted
    assert stage_sizes(replace(config, seed=3, lr=3e-3, steps=50, out="elsewhere"), data) == planted
    assert sum(stage_sizes(replace(config, d_model=16), data)) == 5  # another shape: measured afresh
    assert len(list((tiny_data / "petra-splits").glob("*.json"))) == 2
    stored[0].write_text("{not json")  # a damaged record is measured again, not trusted
    assert sum(stage_sizes(config, data)) == 5


@pytest.mark.parametrize("model", ["gpt", "vit", "revnet", "translator", "rnnlm", "rnn-translator"])
def test_every_task_builds_its_registered_model_for_any_configuration_without_changing_itself(model):
    from dataclasses import replace

    from revbits.models import memory_modes
    from revbits.train.config import TrainConfig
    from revbits.train.kinds import model_kind

    assert model_kind(model).task.name == model
    config = TrainConfig(model=model, n_layer=2, n_head=2, d_model=16, block_size=16, patch_size=7, attention_slice=4)
    task = make_task(config)
    for memory in memory_modes(model):
        other = replace(config, memory=memory)
        torch.manual_seed(0)
        built = task.build_model(other)
        assert task.config is config  # nothing swapped
        assert getattr(built.config, "memory", "standard") == memory
        batch = task.train_batch(torch.Generator().manual_seed(0), torch.device("cpu"))
        assert torch.isfinite(task.loss(built.train(), batch))
    torch.manual_seed(0)
    default = task.build_model().state_dict()
    torch.manual_seed(0)
    given = task.build_model(config).state_dict()
    assert all(torch.equal(default[k], given[k]) for k in default)


def test_memory_measures_the_model_train_builds_under_each_mode(tmp_path, capsys):
    """``revbits memory`` takes train's options and measures one step per mode; BDIA holds less between
    forward and backward than standard training, and --json (shared with bench) writes the rows."""
    rows_path = tmp_path / "rows" / "gpt.json"
    flags = ["--model", "gpt", *TINY, "--n-layer", "4", "--modes", "standard", "bdia", "--json", rows_path]
    assert run("memory", *flags) == 0
    printed = capsys.readouterr().out
    assert "one training step of gpt" in printed and f"rows written to {rows_path}" in printed
    rows = {row["memory"]: row for row in json.loads(rows_path.read_text())}
    assert list(rows) == ["standard", "bdia"]
    assert 0 < rows["bdia"]["held_after_forward"] < rows["standard"]["held_after_forward"]
