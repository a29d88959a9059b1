"""Fault injection: real processes stopped by real signals at each write point, damaged files of every
kind, divergence, bad options, and killed PETRA launchers and stages. Each test asserts that nothing
saved is lost (a resumed run ends bit for bit where the straight one does) and that the message names
the cause.

Training processes are forked from the test process (so they skip the import of torch), or for PETRA
also spawn their stage processes as the command does. ``REVBITS_FAULT=point@n[:SIGNAL]`` makes a
process send itself the signal (default SIGKILL) the n-th time it reaches a named point of a write.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import signal
import sys
import time
import traceback
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from revbits.cli import main
from revbits.data import cache, shakespeare
from revbits.io import MANIFEST, verify_manifest
from revbits.train.checkpoint import checkpoint_dirs, verify_checkpoint
from revbits.train.loop import DivergenceError, check_finite
from revbits.train.metrics import perplexity
from test_train import TINY, run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = pytest.mark.usefixtures("one_thread")
GPT = ["train", "--model", "gpt", "--memory", "standard", *TINY, "--eval-interval", "2"]  # checkpoints at 2, 4, 6


def _child(argv: list[str], env: dict[str, str], log: str, session: bool) -> None:
    stream = open(log, "w", buffering=1)  # noqa: SIM115 (the process ends with os._exit)
    os.dup2(stream.fileno(), 1)
    os.dup2(stream.fileno(), 2)
    sys.stdout = sys.stderr = stream  # the test's capture replaced them
    if session:
        os.setsid()
    os.environ.update(env)
    try:
        code = main(argv)
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else 2
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def start(tmp_path: Path, *argv: object, env: dict[str, str] | None = None, session: bool = False):
    """Start ``revbits argv`` in a forked process; returns (process, path of its output)."""
    log = tmp_path / f"log-{time.monotonic_ns()}.txt"
    ctx = multiprocessing.get_context("fork")
    process = ctx.Process(target=_child, args=([str(a) for a in argv], env or {}, str(log), session))
    process.start()
    return process, log


def cli(tmp_path: Path, *argv: object, env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """(exit code, negative for a signal; output) of ``revbits argv`` run in a forked process."""
    process, log = start(tmp_path, *argv, env=env)
    process.join(timeout)
    assert process.exitcode is not None, f"revbits {argv} still running after {timeout} s"
    return process.exitcode, log.read_text()


def newest_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(checkpoint_dirs(run_dir)[-1] / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = newest_weights(a), newest_weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def leftovers(run_dir: Path) -> list[str]:
    return [p.name for d in (run_dir, run_dir / "checkpoints") if d.is_dir() for p in d.iterdir() if ".tmp-" in p.name]


@pytest.fixture
def straight(tmp_path) -> Path:
    out = tmp_path / "straight"
    assert run(*GPT, "--out", out) == 0
    return out


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


def flip_byte(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x01
    path.write_bytes(bytes(data))


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


# --- PETRA ---------------------------------------------------------------------------------------------

PETRA = ["train", "--model", "revnet", *TINY, "--d-model", "8", "--n-layer", "1", "--steps", "400"]
PETRA += ["--eval-interval", "4", "--parallel", "petra", "--stages", "2", "--stage-split", "2,3"]


def progress_step(out: Path) -> int:
    try:
        return json.loads((out / "progress.json").read_text())["step"]
    except (OSError, ValueError):
        return -1


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def stage_pids(launcher: int) -> dict[int, int]:
    """{stage: pid} of the PETRA stage processes whose parent is ``launcher`` (named by prctl)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            comm = (entry / "comm").read_text().strip()
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == launcher and comm.startswith("petra-stage-"):
            found[int(comm.rsplit("-", 1)[1])] = int(entry.name)
    return found


def gone(pid: int) -> bool:
    """The process has exited (a zombie counts: nothing may reap an orphan in a container)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except OSError:
        return True


def check_saved(out: Path, at_least: int) -> int:
    """The saved PETRA state is whole and not older than ``at_least``; returns its step."""
    progress = json.loads((out / "progress.json").read_text())
    assert progress["step"] >= at_least
    verify_manifest(out / progress["stages_dir"])
    verify_checkpoint(checkpoint_dirs(out)[-1])
    # the gathered weights are saved just before progress.json, so a kill between the two leaves a newer one
    assert int(checkpoint_dirs(out)[-1].name[5:]) >= progress["step"]
    return progress["step"]


@pytest.mark.slow
def test_petra_stops_on_sigint_dies_with_its_launcher_names_a_killed_stage_and_resumes(tmp_path):
    """One run through every way a PETRA run ends early: Ctrl-C (SIGINT to the process group), the
    launcher killed, a stage killed; each time what was saved is whole, and the run resumes."""
    out = tmp_path / "petra"
    launcher, log = start(tmp_path, *PETRA, "--out", out, session=True)
    wait_for(lambda: progress_step(out) >= 4, 240, "the first PETRA segment")
    os.killpg(launcher.pid, signal.SIGINT)
    launcher.join(120)
    text = log.read_text()
    assert launcher.exitcode == 130, text
    assert "SIGINT: every PETRA stage stopped and saved at step" in text and "Traceback" not in text
    saved = check_saved(out, 4)
    assert f"at step {saved} " in text

    launcher, log = start(tmp_path, *PETRA, "--out", out, "--resume", session=True)
    wait_for(lambda: progress_step(out) > saved and len(stage_pids(launcher.pid)) == 2, 240, "a resumed segment")
    stages = stage_pids(launcher.pid)
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.join(10)
    wait_for(lambda: all(gone(pid) for pid in stages.values()), 30, "the stages to exit after their launcher")
    saved = check_saved(out, saved + 1)

    launcher, log = start(tmp_path, *PETRA, "--out", out, "--resume", session=True)
    wait_for(lambda: progress_step(out) > saved and len(stage_pids(launcher.pid)) == 2, 240, "a resumed segment")
    stages = stage_pids(launcher.pid)
    os.kill(stages[1], signal.SIGKILL)
    launcher.join(60)
    text = log.read_text()
    assert launcher.exitcode == 1, text
    message = [line for line in text.splitlines() if line.startswith("revbits train:")]
    assert len(message) == 1 and "PETRA stage 1 of 2 failed" in message[0] and "SIGKILL" in message[0]
    wait_for(lambda: gone(stages[0]), 10, "stage 0 to be stopped")
    saved = check_saved(out, saved + 1)

    code, text = cli(tmp_path, *PETRA, "--out", out, "--resume", "--stop-at", str(saved + 2))
    assert code == 0, text
    assert check_saved(out, saved + 2) == saved + 2
    assert len(list(out.glob("stages-*"))) == 1

    # damaged PETRA files are refused by name before any stage starts
    stages_dir = next(out.glob("stages-*"))
    for name in ("stage0.state.pt", "stage1.safetensors"):
        original = (stages_dir / name).read_bytes()
        flip_byte(stages_dir / name, -3)
        code, text = cli(tmp_path, *PETRA, "--out", out, "--resume", "--stop-at", str(saved + 4))
        assert code == 2 and f"{name} is damaged" in text and "Traceback" not in text, text
        (stages_dir / name).write_bytes(original)
    progress = (out / "progress.json").read_bytes()
    (out / "progress.json").write_bytes(progress[:10])
    code, text = cli(tmp_path, *PETRA, "--out", out, "--resume", "--stop-at", str(saved + 4))
    assert code == 2 and "progress.json is damaged" in text, text


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


@pytest.mark.slow
def test_a_petra_run_interrupted_mid_segment_stops_where_stop_at_would(tmp_path):
    """SIGINT reaching stage 0 at its second micro-batch (the end of the first accumulation window)
    stops every stage after update 1, drained: the saved weights and stage states are the ones
    --stop-at 1 gives, bit for bit."""
    flags = ["train", "--model", "revnet", *TINY, "--d-model", "8", "--n-layer", "1", "--accumulation", "2"]
    flags += ["--parallel", "petra", "--stages", "2", "--stage-split", "2,3"]
    code, text = cli(tmp_path, *flags, "--out", tmp_path / "signal", env={"REVBITS_FAULT": "petra.stage0.input@2:INT"})
    assert code == 130 and "SIGINT: every PETRA stage stopped and saved at step 1 " in text, text
    assert run(*flags, "--stop-at", "1", "--out", tmp_path / "stop-at") == 0
    assert_same_weights(tmp_path / "signal", tmp_path / "stop-at")
    for name in ("stage0.safetensors", "stage1.safetensors", "stage0.state.pt", "stage1.state.pt"):
        a, b = (next((tmp_path / run_dir).glob("stages-*")) / name for run_dir in ("signal", "stop-at"))
        if name.endswith(".safetensors"):  # (the header's metadata order differs from process to process)
            ta, tb = load_file(str(a)), load_file(str(b))
            assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
        else:
            sa, sb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
            assert sa["scheduler"] == sb["scheduler"]
            for key, state in sa["optimizer"]["state"].items():
                assert all(torch.equal(state[k], sb["optimizer"]["state"][key][k]) for k in state)
