"""Resuming against the options the checkpoint was trained with (issue 24, point 5), with real
processes: an edited config.json is refused naming the option that differs from the checkpoint, before
any weight is loaded; a deleted config.json is rebuilt from the newest checkpoint (and the run resumes
bit for bit), or refused in one line when there is no checkpoint to rebuild it from."""

from __future__ import annotations

import json
import signal

import pytest

from fault_tools import GPT, assert_same_weights, cli, one_line, records, snapshot, straight_run  # noqa: F401
from test_train import run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = pytest.mark.usefixtures("one_thread")


def test_an_edited_config_is_refused_naming_what_differs_from_the_checkpoint(tmp_path):
    out = tmp_path / "run"
    assert run(*GPT, "--out", out, "--stop-at", "4") == 0
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "n_layer": 4, "d_model": 32, "steps": 8}))
    before = snapshot(out)
    code, log = cli(tmp_path, *GPT[:1], "--out", out, "--resume")  # the options come from config.json
    line = one_line(log)
    assert code == 2 and "cannot resume with changed options (d_model: 16 -> 32, n_layer: 3 -> 4;" in line, log
    assert "the one checkpoint step_00000004 holds" in line and "size mismatch" not in log
    assert snapshot(out) == before  # nothing was written, nothing removed
    (out / "config.json").write_text(json.dumps({**config, "steps": 8}))  # steps may change on resume
    assert run("train", "--out", out, "--resume") == 0


def test_a_deleted_config_is_rebuilt_from_the_checkpoint_and_the_run_resumes_bit_for_bit(tmp_path, straight):
    out = tmp_path / "run"
    assert run(*GPT, "--out", out, "--stop-at", "4") == 0
    saved = json.loads((out / "config.json").read_text())
    (out / "config.json").unlink()
    code, log = cli(tmp_path, "eval", out)  # read from the checkpoint, nothing written
    assert code == 0 and not (out / "config.json").exists(), log
    code, log = cli(tmp_path, "train", "--out", out, "--resume")
    assert code == 0 and "config.json was missing; rebuilt from step_00000004" in log, log
    assert json.loads((out / "config.json").read_text()) == {**saved, "stop_at": None}
    assert_same_weights(out, straight)
    assert records(out) == records(straight)


def test_a_deleted_config_without_a_checkpoint_is_refused_in_one_line(tmp_path):
    out = tmp_path / "run"
    code, _ = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": "train.step@1"})
    assert code == -signal.SIGKILL
    (out / "config.json").unlink()
    code, log = cli(tmp_path, "train", "--out", out, "--resume")
    assert code == 2 and "holds no run to continue (no config.json)" in one_line(log), log
    code, log = cli(tmp_path, "eval", out)
    assert code == 2 and "no config.json, no checkpoint" in one_line(log, "eval"), log
