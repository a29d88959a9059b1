"""The data layer's cache, registry and command line, on a toy data set: no network, no real data."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys

import pytest

import data_files
from data_files import sha256
from revbits.cli import main
from revbits.data import (
    DataFormatError,
    FetchError,
    MissingDataError,
    SourceError,
    UnknownDatasetError,
    cache,
    registry,
)
from revbits.data.sources import Source, run_tool

cache_dir = data_files.cache_dir  # the cache fixture (autouse): every networked or system source off

# --- cache ---------------------------------------------------------------------------------------


def test_data_root_follows_the_environment(cache_dir, monkeypatch, tmp_path):
    assert cache.data_root() == cache_dir
    assert cache.dataset_dir("shakespeare") == cache_dir / "shakespeare"
    monkeypatch.delenv("REVBITS_DATA")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.data_root() == tmp_path / "home" / ".cache" / "revbits"


def test_atomic_write_leaves_no_temporary_and_keeps_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "sub" / "file.json"
    cache.atomic_write_text(target, "first")
    assert target.read_text() == "first"

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(cache.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        cache.atomic_write_text(target, "second")
    assert target.read_text() == "first"
    assert [p.name for p in target.parent.iterdir()] == ["file.json"]


def test_external_tools_fail_with_a_source_error(tmp_path):
    with pytest.raises(SourceError, match="`no-such-tool-xyz` is not installed"):
        run_tool(["no-such-tool-xyz"], cwd=tmp_path, timeout=5, what="test")
    with pytest.raises(SourceError, match=r"test failed \(exit 1\):\nboom"):
        run_tool([sys.executable, "-c", "import sys; sys.exit('boom')"], cwd=tmp_path, timeout=30, what="test")


def test_sha256_file_matches_hashlib(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 << 20))
    assert cache.sha256_file(path) == hashlib.sha256(path.read_bytes()).hexdigest()


# --- registry, with a toy data set ---------------------------------------------------------------


@pytest.fixture
def toy(monkeypatch):
    """A registered toy data set whose three sources are: broken, delivering bad files, good."""
    calls = []

    def broken(staging):
        calls.append("broken")
        raise SourceError("the mirror is down")

    def bad(staging):
        calls.append("bad")
        (staging / "numbers.txt").write_text("not numbers")
        return {}

    def good(staging):
        calls.append("good")
        (staging / "numbers.txt").write_text("1 2 3")
        return {"origin": "toy"}

    def verify(folder):
        if not (folder / "numbers.txt").read_text().replace(" ", "").isdigit():
            raise DataFormatError("numbers.txt holds something other than numbers")

    def loader():
        return [int(x) for x in (registry.require("toy") / "numbers.txt").read_text().split()]

    dataset = registry.Dataset(
        name="toy",
        description="three numbers",
        files=("numbers.txt",),
        sources=(Source("broken mirror", broken), Source("bad mirror", bad), Source("good mirror", good)),
        verify=verify,
        loader=loader,
        needs="Fetching needs nothing.",
    )
    monkeypatch.setitem(registry._REGISTRY, "toy", dataset)
    return calls


def test_fetch_tries_sources_in_order_and_writes_a_manifest(toy, cache_dir):
    assert not registry.is_cached("toy")
    folder = registry.fetch("toy")
    assert toy == ["broken", "bad", "good"]
    assert registry.is_cached("toy") and registry.load("toy") == [1, 2, 3]
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["source"] == "good mirror" and manifest["notes"] == {"origin": "toy"}
    assert manifest["files"]["numbers.txt"] == {"size": 5, "sha256": sha256(folder / "numbers.txt")}
    assert [p.name for p in cache_dir.iterdir()] == ["toy"]  # no staging folder left behind

    registry.fetch("toy")  # cached: no source is asked again
    assert toy == ["broken", "bad", "good"]
    registry.fetch("toy", force=True)
    assert toy == ["broken", "bad", "good"] * 2


def test_a_failed_fetch_names_every_source_and_keeps_the_cached_copy(toy, monkeypatch):
    registry.fetch("toy")
    before = sha256(cache.dataset_dir("toy") / "numbers.txt")
    only_bad = registry.get("toy").sources[:2]
    monkeypatch.setitem(registry._REGISTRY, "toy", dataclasses.replace(registry.get("toy"), sources=only_bad))
    with pytest.raises(FetchError) as info:
        registry.fetch("toy", force=True)
    message = str(info.value)
    assert "broken mirror: the mirror is down" in message
    assert "bad mirror: numbers.txt holds something other than numbers" in message
    assert sha256(cache.dataset_dir("toy") / "numbers.txt") == before


def test_an_interrupted_install_leaves_no_stale_manifest(toy, monkeypatch):
    registry.fetch("toy")
    assert cache.read_manifest("toy") is not None

    def disk_full(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(registry, "atomic_move", disk_full)
    with pytest.raises(OSError, match="disk full"):
        registry.fetch("toy", force=True)
    assert cache.read_manifest("toy") is None  # it would vouch for files that may have changed
    assert registry.describe("toy")["source"].startswith("unknown")


def test_missing_data_error_says_how_to_get_it(toy):
    with pytest.raises(MissingDataError) as info:
        registry.load("toy")
    assert "revbits data fetch toy" in str(info.value) and "Fetching needs nothing." in str(info.value)
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_names_list_the_known_ones():
    for call in (registry.get, registry.fetch, registry.is_cached, registry.load, registry.require):
        with pytest.raises(UnknownDatasetError) as info:
            call("imagenet")
        assert "'imagenet'" in str(info.value)
        assert all(name in str(info.value) for name in ("fashion-mnist", "cifar10", "shakespeare", "bible-en-fr"))


def test_list_datasets_reports_cache_state(toy):
    rows = {row["name"]: row for row in registry.list_datasets()}
    assert set(rows) >= {"fashion-mnist", "cifar10", "shakespeare", "bible-en-fr", "toy"}
    assert not rows["toy"]["cached"] and rows["toy"]["size"] == 0 and rows["toy"]["source"] is None
    registry.fetch("toy")
    row = {row["name"]: row for row in registry.list_datasets()}["toy"]
    assert row["cached"] and row["size"] == 5 and row["source"] == "good mirror"
    assert row["path"] == str(cache.dataset_dir("toy"))


# --- command line --------------------------------------------------------------------------------


def test_cli_fetch_and_list(toy, capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert "toy: three numbers" in out and "revbits data fetch toy" in out and "cifar10" in out

    assert main(["data", "fetch", "toy"]) == 0
    out = capsys.readouterr().out
    assert "trying broken mirror" in out and "good mirror" in out and str(cache.dataset_dir("toy")) in out

    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    toy_part = out[out.index("toy: three numbers") :]
    assert "cached   yes, 5 B" in toy_part and "good mirror" in toy_part


def test_cli_errors_exit_2_with_a_message(capsys):
    assert main(["data", "fetch", "imagenet"]) == 2
    err = capsys.readouterr().err
    assert "unknown data set 'imagenet'" in err and "shakespeare" in err
    assert main(["data", "fetch", "cifar10"]) == 2
    err = capsys.readouterr().err
    assert "every source failed" in err and "REVBITS_CIFAR10" in err and "Traceback" not in err
