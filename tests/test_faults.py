"""Fault injection: real processes stopped by real signals at each write point, damaged files of every
kind, divergence and bad options. Each test asserts that nothing saved is lost (a resumed run ends bit
for bit where the straight one does) and that the message names the cause. (The run directory's lock
and the user's files: test_faults_rundir.py; failed writes and incomplete manifests:
test_faults_writes.py; resuming against the checkpoint's options and untrusted model directories:
test_faults_resume.py; PETRA: test_faults_petra.py.)
"""

from __future__ import annotations

import json
import math
import signal

import pytest
import torch

from fault_tools import GPT, assert_same_weights, cli, flip_byte, leftovers, newest_weights, straight_run  # noqa: F401
from revbits.data import cache, shakespeare
from revbits.io import MANIFEST
from revbits.train.checkpoint import checkpoint_dirs, verify_checkpoint
from revbits.train.loop import DivergenceError, check_finite
from revbits.train.metrics import perplexity
from test_train import run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = pytest.mark.usefixtures("one_thread")


# (point, visit, the newest complete checkpoint after the kill, whether a temporary is left behind)
WRITE_POINTS = [
    ("checkpoint.weights", 2, 2, True),  # step 4's weights written, nothing else
    ("checkpoint.state", 2, 2, True),  # its state too, no manifest
    ("checkpoint.manifest", 2, 2, True),  # complete, not yet renamed into place
    ("checkpoint.rename", 2, 4, False),  # in place, latest still names step 2
    ("checkpoint.latest", 2, 4, False),  # latest written, older ones not yet pruned
    ("remove_tree", 1, 6, True),  # step 6 saved, step 2 renamed away but not yet deleted
]


@pytest.mark.parametrize("point, visit, newest, left", WRITE_POINTS)
def test_a_kill_at_each_write_point_of_a_checkpoint_loses_nothing(tmp_path, straight, point, visit, newest, left):
    out = tmp_path / "killed"
    code, log = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": f"{point}@{visit}"})
    assert code == -signal.SIGKILL, log
    complete = checkpoint_dirs(out)
    assert complete[-1].name == f"step_{newest:08d}"
    for path in complete:
        verify_checkpoint(path)  # every step_* directory is whole
    assert bool(leftovers(out)) == left
    assert run(*GPT, "--out", out, "--resume") == 0
    assert leftovers(out) == []
    assert_same_weights(out, straight)


def test_a_run_killed_before_its_first_checkpoint_resumes_from_the_start(tmp_path, straight):
    out = tmp_path / "early"
    code, log = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": "train.step@1"})
    assert code == -signal.SIGKILL and checkpoint_dirs(out) == []
    code, log = cli(tmp_path, *GPT, "--out", out, "--resume")
    assert code == 0 and "starting from step 0" in log
    assert_same_weights(out, straight)


@pytest.mark.parametrize("sig, step, code", [("INT", 3, 130), ("TERM", 5, 143)])
def test_sigint_and_sigterm_save_the_current_step_and_resume_bit_for_bit(tmp_path, straight, sig, step, code):
    out = tmp_path / "stopped"
    got, log = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": f"train.step@{step}:{sig}"})
    assert got == code, log
    message = [line for line in log.splitlines() if line.startswith("revbits train:")]
    assert len(message) == 1 and f"SIG{sig} at step {step}" in message[0] and "--resume" in message[0]
    assert "Traceback" not in log
    assert checkpoint_dirs(out)[-1].name == f"step_{step:08d}"
    assert run(*GPT, "--out", out, "--resume") == 0
    assert_same_weights(out, straight)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    expected = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["split"], r["loss"]) for r in records] == [
        (r["step"], r["split"], r["loss"]) for r in expected
    ]


def test_a_flipped_byte_in_each_checkpoint_file_is_refused_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*GPT, "--out", out) == 0
    newest = checkpoint_dirs(out)[-1]
    for name, offset in [("model.safetensors", -7), ("state.pt", -200)]:
        original = (newest / name).read_bytes()
        flip_byte(newest / name, offset)
        capsys.readouterr()
        assert run("eval", out) == 2
        err = capsys.readouterr().err
        assert f"{newest.name}/{name} is damaged" in err and "step_00000004" in err  # the way out, not used
        assert run(*GPT, "--steps", "8", "--out", out, "--resume") == 2
        assert name in capsys.readouterr().err
        (newest / name).write_bytes(original)
    (newest / "state.pt").unlink()
    assert run("eval", out) == 2
    assert "state.pt is missing" in capsys.readouterr().err
    (newest / "state.pt").write_bytes(original)
    manifest = (newest / MANIFEST).read_bytes()
    (newest / MANIFEST).write_bytes(manifest[: len(manifest) // 2])
    assert run("eval", out) == 2
    assert f"{MANIFEST} is damaged" in capsys.readouterr().err
    (newest / MANIFEST).write_bytes(manifest)
    (out / "checkpoints" / "latest").unlink()  # a hint only
    assert run("eval", out) == 0
    capsys.readouterr()
    config = (out / "config.json").read_bytes()
    (out / "config.json").write_bytes(config[: len(config) // 2])
    assert run("eval", out) == 2
    assert "config.json is damaged" in capsys.readouterr().err
    (out / "config.json").write_bytes(config)
    (out / "metrics.jsonl").write_bytes(b"\x80\xff" * 40)
    assert run(*GPT, "--steps", "8", "--out", out, "--resume") == 2
    assert "metrics.jsonl is damaged" in capsys.readouterr().err


def test_damaged_data_cache_is_refused_by_name_and_reported_by_verify(tmp_path, tiny_data, capsys):  # noqa: F811
    folder = tiny_data / shakespeare.NAME
    cache.write_manifest(shakespeare.NAME, "test copy", {shakespeare.TEXT_FILE: folder / shakespeare.TEXT_FILE})
    text = (folder / shakespeare.TEXT_FILE).read_bytes()
    assert run("data", "verify", shakespeare.NAME) == 0
    (folder / shakespeare.TEXT_FILE).write_bytes(text[: len(text) // 2])  # cut in half
    capsys.readouterr()
    assert run(*GPT, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert shakespeare.TEXT_FILE in err and "manifest records" in err and "revbits data fetch shakespeare" in err
    assert run("data", "list") == 0
    assert "DAMAGED" in capsys.readouterr().out
    assert run("data", "verify") == 1
    assert shakespeare.TEXT_FILE in capsys.readouterr().out
    (folder / shakespeare.TEXT_FILE).write_bytes(text)
    flip_byte(folder / shakespeare.TEXT_FILE, 1000)  # same size: only the sha256 tells
    assert run(*GPT, "--out", tmp_path / "y") == 2
    assert "sha256" in capsys.readouterr().err
    assert not (tmp_path / "y" / "checkpoints").exists()


def test_divergence_stops_the_run_naming_the_step_and_keeps_the_finite_checkpoints(tmp_path, capsys):
    out = tmp_path / "diverged"
    assert run(*GPT, "--lr", "1e30", "--min-lr", "0", "--warmup", "0", "--eval-interval", "1", "--out", out) == 2
    err = capsys.readouterr().err
    assert [line.count("revbits train: error: step ") for line in err.splitlines() if "revbits" in line] == [1]
    assert any(cause in err for cause in ("training loss is", "gradient norm is", "non-finite", "overflows"))
    diverged_at = int(err.split("step ")[1].split(":")[0])
    saved = checkpoint_dirs(out)
    assert saved and all(int(p.name[5:]) < diverged_at for p in saved)  # the steps before it were kept
    verify_checkpoint(saved[-1])
    assert all(torch.isfinite(t).all() for t in newest_weights(out).values())
    assert run("eval", out) == 0  # the newest checkpoint is usable


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--lr", "inf"], "--lr: must be a finite number"),
        (["--weight-decay", "nan"], "--weight-decay: must be a finite number"),
        (["--grad-clip", "nan"], "--grad-clip: must be a finite number"),
        (["--dropout", "nan"], "--dropout: must be a finite number"),
    ],
)
def test_non_finite_options_are_refused_when_parsed(tmp_path, capsys, flags, message):
    with pytest.raises(SystemExit):
        run(*GPT, *flags, "--out", tmp_path / "x")
    assert message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_non_finite_and_out_of_range_config_values_are_named(tmp_path, capsys):
    config = tmp_path / "c.json"
    for text, message in [('{"lr": NaN}', "lr must be a finite number"), ('{"seed": -1}', "seed must be from 0")]:
        config.write_text(text)
        assert run("train", "--config", config, "--out", tmp_path / "x") == 2
        assert message in capsys.readouterr().err


def test_perplexity_overflow_is_inf_not_an_error():
    assert perplexity(1e6) == math.inf and perplexity(0.0) == 1.0


def test_an_unusable_out_gets_one_line(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert run(*GPT, "--out", tmp_path / "file") == 2
    err = capsys.readouterr().err
    assert "is a file" in err and "Traceback" not in err and err.count("\n") == 1
    assert run(*GPT, "--out", tmp_path / "file" / "run") == 2  # under a file: no directory can be made
    err = capsys.readouterr().err
    assert "cannot write there" in err and err.count("\n") == 1


def test_each_divergence_cause_is_named_with_its_step():
    model = torch.nn.Linear(2, 2)
    finite, nan = torch.tensor(1.0), torch.tensor(float("nan"))
    check_finite(7, finite, finite, model)  # all finite: nothing happens
    with torch.no_grad():
        model.weight.mul_(1e30)  # huge but finite: the fused norm overflows, the exact check clears it
    check_finite(7, finite, finite, model)
    for loss, grad_norm, cause in [(nan, finite, "training loss is nan"), (finite, nan, "gradient norm is nan")]:
        with pytest.raises(DivergenceError, match=f"step 7: the {cause}"):
            check_finite(7, loss, grad_norm, model)
    with torch.no_grad():
        model.bias[1] = float("inf")
    with pytest.raises(DivergenceError, match="step 7: weight bias holds non-finite values"):
        check_finite(7, finite, finite, model)
