"""Fault injection in PETRA runs, with real processes: Ctrl-C, a killed launcher, a killed or stopped
(SIGSTOP) stage, a data set that vanishes before the stages load it, a full disk in a stage, damaged
stage files. Each ends in one line, printed once, naming the stage (and its PID) that caused it; what
was saved is whole and the run resumes. The stages hold the run directory's lock with their launcher.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fault_tools import assert_same_weights, cli, flip_byte, one_line, start
from revbits.io import verify_manifest
from revbits.train.checkpoint import checkpoint_dirs, verify_checkpoint
from test_train import TINY, run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]  # real PETRA runs: 20 to 100 s each
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


def test_petra_stops_on_sigint_dies_with_its_launcher_names_a_killed_stage_and_resumes(tmp_path):
    """One run through every way a PETRA run ends early: Ctrl-C (SIGINT to the process group), the
    launcher killed (its stages keep the run directory until they have saved and exit), stage 0 killed
    (named as killed, not as the stage that lost it); each time what was saved is whole, and the run
    resumes."""
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
    for pid in stages.values():
        os.kill(pid, signal.SIGSTOP)  # the stages outlive their launcher for a while: keep them so
    os.kill(launcher.pid, signal.SIGKILL)
    launcher.join(10)
    code, text = cli(tmp_path, *PETRA, "--out", out, "--resume")
    assert code == 2 and f"PETRA stages PIDs {stages[0]}, {stages[1]}" in one_line(text), text
    for pid in stages.values():
        os.kill(pid, signal.SIGCONT)  # their SIGTERM (the launcher died) is delivered: they save and exit
    wait_for(lambda: all(gone(pid) for pid in stages.values()), 30, "the stages to exit after their launcher")
    saved = check_saved(out, saved + 1)

    launcher, log = start(tmp_path, *PETRA, "--out", out, "--resume", session=True)
    wait_for(lambda: progress_step(out) > saved and len(stage_pids(launcher.pid)) == 2, 240, "a resumed segment")
    stages = stage_pids(launcher.pid)
    os.kill(stages[0], signal.SIGKILL)
    launcher.join(60)
    text = log.read_text()
    assert launcher.exitcode == 1, text
    line = one_line(text)
    assert f"PETRA stage 0 of 2 failed (PID {stages[0]}): process was killed by SIGKILL" in line
    wait_for(lambda: gone(stages[1]), 10, "stage 1 to be stopped")
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


def state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "X"


def test_a_stopped_stage_is_named_with_its_pid_and_the_stages_hold_the_lock(tmp_path):
    """A stage stopped by SIGSTOP is named with its PID (not a neighbour that gave up waiting on it)
    within --petra-timeout seconds and a grace, wherever the others wait for it. A run cannot start
    beside the live one; the refusal names the launcher and the stages."""
    out = tmp_path / "petra"
    argv = [*PETRA, "--petra-timeout", "3", "--out", out]
    launcher, log = start(tmp_path, *argv, session=True)
    lock = out / ".revbits-lock"
    started = lambda: lock.exists() and "stages" in lock.read_text() and len(stage_pids(launcher.pid)) == 2  # noqa: E731
    wait_for(started, 240, "the stages to start")
    stages = stage_pids(launcher.pid)
    code, text = cli(tmp_path, *argv, "--resume")
    line = one_line(text)
    assert code == 2 and f"PID {launcher.pid} on host {socket.gethostname()}" in line, text
    assert f"PETRA stages PIDs {stages[0]}, {stages[1]}" in line

    os.kill(stages[0], signal.SIGSTOP)
    stopped_at = time.monotonic()
    launcher.join(60)
    text = log.read_text()
    assert launcher.exitcode == 1, text
    line = one_line(text)
    assert f"PETRA stage 0 of 2 stopped responding (PID {stages[0]}) (it is stopped, as by SIGSTOP)" in line
    assert time.monotonic() - stopped_at < 3 + 20  # the timeout, the launcher's grace, and a loaded machine
    wait_for(lambda: all(gone(pid) for pid in stages.values()), 30, "the stages to be killed")


def test_a_stages_data_error_and_a_full_disk_in_a_stage_are_one_line(tmp_path, tiny_data):  # noqa: F811
    out = tmp_path / "petra"
    argv = [*PETRA, "--steps", "8", "--out", out]
    launcher, log = start(tmp_path, *argv, env={"REVBITS_FAULT": "petra.launch@1:STOP"})
    wait_for(lambda: state(launcher.pid) == "T", 120, "the launcher to stop before it starts the stages")
    shutil.move(tiny_data / "fashion-mnist", tmp_path / "aside")  # the data vanishes: the stages cannot load it
    os.kill(launcher.pid, signal.SIGCONT)
    launcher.join(120)
    text = log.read_text()
    line = one_line(text)
    assert launcher.exitcode == 1 and "Traceback" not in text, text
    assert "PETRA stage 0 of 2 failed" in line and "data set 'fashion-mnist' is not in the cache" in line
    assert "then stage 1: the same error" in line and "PETRA stage 1:" not in text  # printed once
    shutil.move(tmp_path / "aside", tiny_data / "fashion-mnist")

    code, text = cli(tmp_path, *argv, "--resume", env={"REVBITS_FAULT": "write:stage0.state.pt@1:ENOSPC"})
    line = one_line(text)
    assert code == 1 and "PETRA stage 0 of 2 failed" in line, text
    assert "stage0.state.pt: No space left on device (ENOSPC); no checkpoint was saved yet" in line
