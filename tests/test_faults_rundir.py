"""One run, one directory, and only revbits' own files touched (issue 24, points 1 and 2), with real
processes: a run stopped (SIGSTOP) while it holds its directory keeps a second run and a --resume out,
each refused in one line naming its PID and host; a killed run's lock is taken over; two runs started
together leave exactly one trained run; a user's files in a run directory survive every start, resume
and refusal; a folder that is not a run is refused without a change."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

import pytest

from fault_tools import GPT, assert_same_weights, cli, leftovers, one_line, records, snapshot, start, straight_run  # noqa: F401
from revbits.train.checkpoint import checkpoint_dirs
from test_train import TINY, run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = pytest.mark.usefixtures("one_thread")
LOCK = ".revbits-lock"


def stopped(process, log: Path, timeout: float = 60) -> None:
    """Wait until ``process`` is stopped (it sent itself SIGSTOP at a fault point)."""
    deadline = time.monotonic() + timeout
    while Path(f"/proc/{process.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert process.exitcode is None and time.monotonic() < deadline, log.read_text()
        time.sleep(0.02)


def user_files(folder: Path) -> None:
    """Files a user keeps beside a run: hidden ones with .tmp in their names, as revbits' old
    leftovers had, and one of their own."""
    (folder / ".my-notes.tmpdir").mkdir(parents=True)
    (folder / ".my-notes.tmpdir" / "notes.md").write_text("keep me")
    (folder / ".env.tmp").write_text("SECRET=1\n")
    (folder / "README.txt").write_text("my run\n")


def user_snapshot(folder: Path) -> dict:
    keep = (".my-notes.tmpdir", ".env.tmp", "README.txt")
    return {name: data for name, data in snapshot(folder).items() if name.split("/")[0] in keep}


def test_a_live_run_keeps_a_second_run_and_a_resume_out_and_ends_as_if_alone(tmp_path, straight):
    out = tmp_path / "run"
    first, log = start(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": "train.step@3:STOP"})
    stopped(first, log)  # at step 3, checkpoint 2 saved, holding the lock
    user_files(out)  # the user's own files beside the run
    before = user_snapshot(out)
    (out / "checkpoints" / ".revbits-tmp-1-dead-step_00000009").mkdir()  # a leftover: not for a refused run
    holding = snapshot(out)
    for argv in ([*GPT, "--seed", "1", "--out", out], [*GPT, "--out", out, "--resume"]):
        code, text = cli(tmp_path, *argv)
        line = one_line(text)
        assert code == 2 and f"PID {first.pid} on host {socket.gethostname()}" in line and "in use" in line, text
        assert snapshot(out) == holding  # the refused run wrote and removed nothing
    os.kill(first.pid, signal.SIGCONT)
    first.join(120)
    assert first.exitcode == 0, log.read_text()
    assert_same_weights(out, straight)
    assert records(out) == records(straight)  # no record twice
    assert json.loads((out / "config.json").read_text())["seed"] == 0
    assert json.loads((out / LOCK).read_text())["state"] == "released"
    assert user_snapshot(out) == before


def test_a_killed_runs_lock_is_taken_over_and_the_resume_is_bit_for_bit(tmp_path, straight):
    out = tmp_path / "run"
    code, text = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": "checkpoint.state@2"})
    assert code == -signal.SIGKILL, text
    user_files(out)
    before = user_snapshot(out)
    holder = json.loads((out / LOCK).read_text())
    assert holder["state"] == "running" and holder["host"] == socket.gethostname()  # never released
    assert leftovers(out)  # step 4's half-written checkpoint
    code, text = cli(tmp_path, *GPT, "--out", out)  # not --resume: refused, nothing removed
    assert code == 2 and "already holds a run" in one_line(text) and leftovers(out)
    code, text = cli(tmp_path, *GPT, "--out", out, "--resume")
    assert code == 0, text
    assert f"note: taking over {out} from revbits train, PID {holder['pid']}" in text
    assert leftovers(out) == []
    assert_same_weights(out, straight)
    assert records(out) == records(straight)
    assert user_snapshot(out) == before


def test_two_runs_started_together_leave_exactly_one_trained_run(tmp_path):
    out = tmp_path / "run"
    runs = [start(tmp_path, *GPT, "--seed", str(seed), "--out", out) for seed in (1, 2)]
    for process, _ in runs:
        process.join(120)
    codes = [process.exitcode for process, _ in runs]
    assert sorted(codes) == [0, 2], [log.read_text() for _, log in runs]
    winner = codes.index(0)
    loser_line = one_line(runs[1 - winner][1].read_text())
    assert "in use by" in loser_line or "already holds a run" in loser_line
    assert json.loads((out / "config.json").read_text())["seed"] == winner + 1
    steps = [(step, split) for step, split, _ in records(out)]
    assert len(steps) == len(set(steps))  # no duplicate records
    assert [p.name for p in checkpoint_dirs(out)] == ["step_00000004", "step_00000006"]


def test_a_folder_that_is_not_a_run_is_refused_without_a_change(tmp_path):
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "config.json").write_text('{"name": "my project", "version": 3}\n')
    (project / ".env.tmp").write_text("TOKEN=x\n")
    (project / ".cache.tmp").mkdir()
    (project / "src" / "main.py").write_text("print('hi')\n")
    before = snapshot(project)
    for extra in ([], ["--resume"]):
        code, text = cli(tmp_path, *GPT, "--out", project, *extra)
        line = one_line(text)
        assert code == 2 and "not a revbits run directory" in line and "nothing was changed" in line, text
        assert snapshot(project) == before
    hidden_only = tmp_path / "hidden"
    hidden_only.mkdir()
    (hidden_only / ".notes.tmp").write_text("mine")
    assert run(*GPT, "--out", hidden_only) == 2  # not empty, not a run
    assert [p.name for p in hidden_only.iterdir()] == [".notes.tmp"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert run(*GPT, "--out", empty) == 0  # an empty folder is fine


def test_a_run_written_before_the_lock_is_still_a_run(tmp_path, straight):
    """A run directory of revbits 0.2 (no lock file) resumes; its config.json is read as before."""
    out = tmp_path / "old"
    assert run(*GPT, "--out", out, "--stop-at", "4") == 0
    (out / LOCK).unlink()
    assert run(*GPT, "--out", out, "--resume") == 0
    assert_same_weights(out, straight)


VIT = ["train", "--model", "vit", "--memory", "bdia", *TINY, "--patch-size", "7"]
PETRA = ["--parallel", "petra", "--stages", "2"]


def saved_config(argv: list[str], out: Path) -> None:
    """A run killed before its first checkpoint: its lock file and the config.json ``argv`` trains."""
    from revbits.cli import build_parser
    from revbits.train.commands import _config_from_args

    config = _config_from_args(build_parser(["train"]).parse_args([*argv, "--out", str(out)]))
    out.mkdir(parents=True)
    (out / LOCK).write_text("")
    (out / "config.json").write_text(json.dumps(config.to_dict()))


def with_metrics(argv: list[str], out: Path) -> None:
    """A run that logged its first step and was killed before its first checkpoint."""
    saved_config(argv, out)
    (out / "metrics.jsonl").write_text('{"step": 1, "split": "train", "loss": 3.0}\n')


def with_checkpoint(argv: list[str], out: Path, damage: str) -> None:
    """A run with a checkpoint whose file ``damage`` is cut short ("state.pt") or missing ("model.safetensors")."""
    from torch import nn

    from revbits.train.checkpoint import save_checkpoint

    saved_config(argv, out)
    step = save_checkpoint(out, 2, nn.Linear(2, 2), {"config": json.loads((out / "config.json").read_text())})
    if damage == "state.pt":
        (step / damage).write_bytes((step / damage).read_bytes()[:20])
    else:
        (step / damage).unlink()


REFUSALS = {  # how each refused directory is made, the flags given, and what the one line says
    "not a run": (lambda argv, out: user_files(out), [], "holds files but is not a revbits run directory"),
    "a run there": (lambda argv, out: with_metrics(argv, out), [], "already holds a run; pass --resume"),
    "nothing to resume": (lambda argv, out: out.mkdir(parents=True), ["--resume"], "holds no run to continue"),
    "changed options": (lambda argv, out: saved_config(argv, out), ["--resume", "--lr", "0.5"], "(lr: 0.001 -> 0.5;"),
    "damaged checkpoint": (
        lambda argv, out: with_checkpoint(argv, out, "state.pt"),
        ["--resume"],
        "checkpoint step_00000002 cannot be used: <out>/checkpoints/step_00000002/state.pt is 20 bytes",
    ),
    "missing checkpoint file": (
        lambda argv, out: with_checkpoint(argv, out, "model.safetensors"),
        ["--resume"],
        "checkpoint step_00000002 cannot be used: <out>/checkpoints/step_00000002/model.safetensors",
    ),
}


@pytest.mark.parametrize("case", [*REFUSALS, "in use"])
def test_petra_refuses_what_a_single_process_run_refuses_in_the_same_line(tmp_path, capsys, case):
    """One run-directory rule for every training command (issue 23, point 5): ``--parallel petra``
    refuses each directory a single-process run refuses, before any stage starts, in the same line."""
    from revbits.train.rundir import RunLock

    lines = []
    for name, argv in (("single", VIT), ("petra", [*VIT, *PETRA])):
        out = tmp_path / name / "run"
        if case == "in use":
            saved_config(argv, out)
            lock = RunLock.acquire(out)  # another open file: flock keeps out even this process
            lock.note(started="then")
            extra, expected = [], "is in use by revbits train, PID"
        else:
            make, extra, expected = REFUSALS[case]
            make(argv, out)
        before = snapshot(out)
        code = run(*argv, *extra, "--out", out)
        if case == "in use":
            lock.release()
        line = one_line(capsys.readouterr().err).replace(str(out), "<out>")
        assert code == 2 and expected in line, line
        assert {k: v for k, v in snapshot(out).items() if k != LOCK} == {k: v for k, v in before.items() if k != LOCK}
        lines.append(line)
    assert lines[0] == lines[1]
