"""The command line as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from revbits.cli import main


def test_bench_prints_measured_rows_and_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    code = main(
        [
            "bench",
            "--depths",
            "2",
            "4",
            "--seq-len",
            "16",
            "--batch",
            "2",
            "--d-model",
            "32",
            "--repeats",
            "1",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "| 4 | bdia |" in printed and "its floor" in printed
    rows = json.loads(out.read_text())
    expected = {(d, m) for d in (2, 4) for m in ("standard", "checkpoint", "mesa", "bdia", "bdia+mesa")}
    assert {(r["depth"], r["mode"]) for r in rows} == expected
    bdia = [r for r in rows if r["mode"] == "bdia" and r["depth"] == 4][0]
    assert bdia["held_after_forward"] >= bdia["floor_bytes"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["bench", "--depths", "1"], "at least 2 blocks"),
        (["bench", "--batch", "0"], "positive integer"),
        (["bench", "--modes", "fast"], "invalid choice"),
    ],
)
def test_bad_flags_are_named(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_heads_must_divide_width(capsys):
    assert main(["bench", "--d-model", "30", "--heads", "4"]) == 2
    assert "not divisible" in capsys.readouterr().err


def test_bench_flags_build_the_config_in_one_place():
    """``revbits bench`` and benchmarks/memory_modes.py add the same flags and read them with
    BenchConfig.from_args; each keeps its own defaults (the CLI's quicker run, the script's full one)."""
    import argparse

    from revbits import bench
    from revbits.cli import build_parser
    from revbits.stack import MEMORY_MODES

    cli = bench.BenchConfig.from_args(build_parser().parse_args(["bench"]))
    assert cli == bench.BenchConfig(depths=(6, 12, 24), modes=MEMORY_MODES, d_model=256, n_heads=4, seq_len=256,
                                    batch=8, repeats=3, device="cpu", seed=0)
    script = argparse.ArgumentParser()
    bench.add_arguments(script, bench.BenchConfig(), variants=True)
    assert bench.BenchConfig.from_args(script.parse_args([])) == bench.BenchConfig()
    flags = ["--depths", "3", "--modes", "bdia (chunks=1)", "--heads", "2", "--seed", "5", "--seq-len", "9"]
    got = bench.BenchConfig.from_args(script.parse_args(flags))
    assert (got.depths, got.modes, got.n_heads, got.seed, got.seq_len) == ((3,), ("bdia (chunks=1)",), 2, 5, 9)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "--modes", "bdia (chunks=1)"])  # variants are the script's only


def test_console_script_is_installed():
    result = subprocess.run([sys.executable, "-m", "revbits.cli", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("revbits ")


def test_every_mesa_option_reaches_the_command_line(capsys):
    """Each MesaConfig field but the seed (the run's own) is a --mesa-* flag of revbits train, and
    MesaConfig checks the values."""
    from revbits.mesa import MesaConfig
    from revbits.train import TrainConfig
    from revbits.train.config import ConfigError

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for name in MesaConfig.option_names() - {"seed"}:
        assert f"--mesa-{name.replace('_', '-')}" in text, name
    options = TrainConfig(model="gpt", memory="mesa", mesa_min_numel=10, mesa_stochastic=False).memory_options
    assert options["min_numel"] == 10 and options["stochastic"] is False and options["check_finite"] is True
    with pytest.raises(ConfigError, match="mesa option: min_numel"):
        TrainConfig(model="gpt", memory="mesa", mesa_min_numel=-1)
