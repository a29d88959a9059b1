"""Writes that fail and manifests that cannot vouch for their files (issue 24, points 3 and 4), with real
processes. A write fails as a full disk (ENOSPC), an exceeded quota (EDQUOT), a read-only file system
(EROFS) or an I/O error (EIO) does, injected at each file of a checkpoint, the metrics, the pointer and
the run's configuration (``REVBITS_FAULT=write:<file>@n:<errno>``), and for real: a file size limit
(RLIMIT_FSIZE) makes the kernel refuse torch's and safetensors' own writes (EFBIG). Each ends in one
line naming the file, the error and the latest good checkpoint; nothing saved before is changed, and
the resumed run ends bit for bit where the straight one does. The same for the data cache."""

from __future__ import annotations

import dataclasses
import errno
import json
import os

import pytest

from fault_tools import (  # noqa: F401
    FILE_SIZE_LIMIT,
    GPT,
    assert_same_weights,
    cli,
    flip_byte,
    leftovers,
    one_line,
    records,
    snapshot,
    straight_run,
)
from revbits.data import cache, registry, shakespeare
from revbits.data.errors import SourceError
from revbits.data.sources import Source
from revbits.io import MANIFEST
from revbits.train.checkpoint import checkpoint_dirs, verify_checkpoint
from test_train import run, tiny_data  # noqa: F401 (tiny_data: the cache fixture, autouse)

pytestmark = pytest.mark.usefixtures("one_thread")

# (file, visit, errno, the newest checkpoint left, where the resumed run starts)
WRITES = [
    ("model.safetensors", 2, "ENOSPC", 2),  # step 4's weights
    ("state.pt", 2, "EDQUOT", 2),  # step 4's optimiser state
    ("manifest.json", 3, "EROFS", 4),  # step 6's manifest (4 is complete)
    ("metrics.jsonl", 3, "EIO", 2),  # step 4's train record
    ("latest", 2, "ENOSPC", 4),  # step 4 in place, the pointer not written
]


@pytest.mark.parametrize("name, visit, code, newest", WRITES)
def test_a_failed_write_is_one_line_and_the_resumed_run_is_bit_for_bit(tmp_path, straight, name, visit, code, newest):
    out = tmp_path / "run"
    got, log = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": f"write:{name}@{visit}:{code}"})
    line = one_line(log)
    assert got == 2, log
    assert f"{name}: {os.strerror(getattr(errno, code))} ({code})" in line
    assert ".revbits-tmp-" not in line  # the file as it is called, not its temporary name
    assert f"the latest good checkpoint is {out / 'checkpoints' / f'step_{newest:08d}'}" in line
    assert f"then continue with revbits train --out {out} --resume" in line
    assert ("free space" in line) == (code in ("ENOSPC", "EDQUOT"))
    assert checkpoint_dirs(out)[-1].name == f"step_{newest:08d}"
    for path in checkpoint_dirs(out):
        verify_checkpoint(path)
    assert leftovers(out) == []
    saved = snapshot(out / "checkpoints")
    assert run(*GPT, "--out", out, "--resume") == 0  # once there is space again
    assert_same_weights(out, straight)
    assert records(out) == records(straight)
    assert all(saved[k] == v for k, v in snapshot(out / "checkpoints").items() if k in saved and k != "latest")


def test_a_failed_write_before_the_first_checkpoint_says_so(tmp_path, straight):
    out = tmp_path / "run"
    got, log = cli(tmp_path, *GPT, "--out", out, env={"REVBITS_FAULT": "write:config.json@1:ENOSPC"})
    line = one_line(log)
    assert got == 2 and f"cannot write {out / 'config.json'}: No space left on device (ENOSPC)" in line
    assert "no checkpoint was saved yet" in line
    assert run(*GPT, "--out", out) == 0
    assert_same_weights(out, straight)


@pytest.mark.parametrize("limit, name", [(20_000, "model.safetensors"), (100_000, "state.pt")])
def test_the_kernels_refusal_of_torchs_and_safetensors_writes_is_one_line(tmp_path, straight, limit, name):
    """A file size limit makes the kernel itself refuse the writes of safetensors (Rust) and of
    torch.save (C++) with EFBIG: each is named by its file and its OS error, not the library's text."""
    out = tmp_path / "run"
    got, log = cli(tmp_path, *GPT, "--out", out, env={FILE_SIZE_LIMIT: str(limit)})
    line = one_line(log)
    assert got == 2 and f"step_00000002/{name}: File too large (EFBIG)" in line, log
    assert "no checkpoint was saved yet" in line and leftovers(out) == []
    assert run(*GPT, "--out", out, "--resume") == 0
    assert_same_weights(out, straight)


def test_an_incomplete_checkpoint_manifest_refuses_the_checkpoint_by_name(tmp_path, capsys):
    out = tmp_path / "run"
    assert run(*GPT, "--out", out) == 0
    newest = checkpoint_dirs(out)[-1]
    manifest = json.loads((newest / MANIFEST).read_text())
    for name, field in [("model.safetensors", "sha256"), ("state.pt", "size")]:
        edited = json.loads(json.dumps(manifest))
        del edited["files"][name][field]
        (newest / MANIFEST).write_text(json.dumps(edited))
        flip_byte(newest / name, -9)  # what a manifest without the field could not catch
        for argv in (["eval", out], [*GPT, "--steps", "8", "--out", out, "--resume"]):
            capsys.readouterr()
            assert run(*argv) == 2
            err = capsys.readouterr().err
            assert f"checkpoint {newest.name} cannot be used" in err
            assert f"{MANIFEST} is incomplete: its entry for {name} has no {field}" in err
        flip_byte(newest / name, -9)
    (newest / MANIFEST).write_text(json.dumps(manifest))
    assert run("eval", out) == 0


def test_an_incomplete_data_manifest_refuses_the_data_set(tmp_path, capsys):
    folder = cache.dataset_dir(shakespeare.NAME)
    cache.write_manifest(shakespeare.NAME, "test copy", {shakespeare.TEXT_FILE: folder / shakespeare.TEXT_FILE})
    manifest = json.loads((folder / MANIFEST).read_text())
    del manifest["files"][shakespeare.TEXT_FILE]["sha256"]
    (folder / MANIFEST).write_text(json.dumps(manifest))
    flip_byte(folder / shakespeare.TEXT_FILE, 100)
    assert run(*GPT, "--out", tmp_path / "x") == 2
    err = capsys.readouterr().err
    assert f"its entry for {shakespeare.TEXT_FILE} has no sha256" in err and err.count("\n") == 1
    assert run("data", "verify", shakespeare.NAME) == 1
    assert "has no sha256" in capsys.readouterr().out


@pytest.fixture
def toy(monkeypatch):
    """A toy data set (inherited by the forked commands) whose first source fills the disk."""
    tried = []

    def full(staging):
        tried.append("full")
        raise SourceError("download failed") from OSError(errno.ENOSPC, "No space left on device", str(staging / "x"))

    def good(staging):
        tried.append("good")
        (staging / "numbers.txt").write_text("1 2 3")
        return {}

    dataset = registry.Dataset(
        name="toy",
        description="three numbers",
        files=("numbers.txt",),
        sources=(Source("full disk", full), Source("good mirror", good)),
        verify=lambda folder: None,
        loader=lambda: None,
        needs="Fetching needs nothing.",
    )
    monkeypatch.setitem(registry._REGISTRY, "toy", dataset)
    return dataset


def test_a_full_disk_stops_a_data_fetch_in_one_line_and_keeps_the_cached_copy(tmp_path, toy, monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "toy", dataclasses.replace(toy, sources=toy.sources[1:]))
    assert run("data", "fetch", "toy") == 0
    before = snapshot(cache.dataset_dir("toy"))
    monkeypatch.setitem(registry._REGISTRY, "toy", toy)
    code, log = cli(tmp_path, "data", "fetch", "toy", "--force")
    line = one_line(log, "data fetch")
    assert code == 2 and "No space left on device (ENOSPC)" in line and "the cached copy of toy is unchanged" in line
    assert "trying good mirror" not in log  # a full disk is not a reason to try the next source
    assert snapshot(cache.dataset_dir("toy")) == before
    monkeypatch.setitem(registry._REGISTRY, "toy", dataclasses.replace(toy, sources=toy.sources[1:]))
    code, log = cli(tmp_path, "data", "fetch", "toy", "--force", env={"REVBITS_FAULT": "write:manifest.json@1:EIO"})
    line = one_line(log, "data fetch")
    assert code == 2 and f"cannot write {cache.dataset_dir('toy') / MANIFEST}: Input/output error (EIO)" in line
    assert "fetch it again with revbits data fetch toy --force" in line
    assert run("data", "fetch", "toy", "--force") == 0
