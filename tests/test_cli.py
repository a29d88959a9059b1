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
        (["bench", "--batch", "0"], "--batch: must be at least 1, got 0"),
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
    from revbits.modes import MEMORY_MODES

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
    assert set(options) == MesaConfig.option_names()  # every field is passed on, none invented
    assert options["min_numel"] == 10 and options["stochastic"] is False and options["check_finite"] is True
    with pytest.raises(ConfigError, match="mesa option: min_numel"):
        TrainConfig(model="gpt", memory="mesa", mesa_min_numel=-1)


def module_checks():
    """(TrainConfig options, the same value given to the module that checks it)."""
    from torch import nn

    from revbits.bdia import BDIAStack
    from revbits.models.rnn_translator import RNNTranslatorConfig
    from revbits.petra.config import PetraConfig

    def bdia(**options):
        return lambda: BDIAStack([nn.Identity(), nn.Identity()], **options)

    return [
        (dict(memory="bdia", bits=24), bdia(bits=24)),
        (dict(memory="bdia+mesa", bits=0), bdia(bits=0)),
        (dict(memory="bdia", gamma=0.3), bdia(gamma=0.3)),
        (dict(memory="bdia", batch_chunks="0"), bdia(batch_chunks=0)),
        (dict(model="rnn-translator", d_model=16, attention_slice=17),
         lambda: RNNTranslatorConfig(1, 1, d_model=16, attention_slice=17)),
        (dict(model="gpt", attention_slice=-1), lambda: RNNTranslatorConfig(1, 1, d_model=128, attention_slice=-1)),
        (dict(stages=0), lambda: PetraConfig(stages=0)),
        (dict(accumulation=0), lambda: PetraConfig(accumulation=0)),
    ]


@pytest.mark.parametrize("options, module", module_checks())
def test_options_are_checked_by_the_module_they_configure(options, module, capsys):
    """TrainConfig raises the module's own one-line message (as a ConfigError), and revbits train prints it."""
    from revbits.train.config import ConfigError, TrainConfig

    with pytest.raises(ValueError) as expected:
        module()
    with pytest.raises(ConfigError) as got:
        TrainConfig(**options)
    assert str(got.value) == str(expected.value) and "\n" not in str(got.value)
    name = next(iter(options.keys() - {"memory", "model", "d_model"}))
    assert name in str(got.value)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items()]
    assert main(["train", *flags]) == 2
    assert capsys.readouterr().err.strip() == f"revbits train: error: {expected.value}"


def test_bits_apply_only_under_a_bdia_mode():
    from revbits.train.config import TrainConfig

    assert TrainConfig(memory="standard", bits=40).memory_options == {}  # not BDIA: not checked, not used
    assert TrainConfig(memory="bdia", bits=5).memory_options["bits"] == 5


def test_no_forget_limit_is_none_in_python_and_0_in_text(tmp_path):
    """forget_bits None means no limit, as in RevGRU; flags, config files and config.json spell it 0, so
    `--forget-bits 0` and the config.json of a 0.1 run keep working (and that run resumes)."""
    from revbits.cli import build_parser
    from revbits.revrnn import FORGET_BITS
    from revbits.train.config import TrainConfig, read_config_file
    from revbits.train.rundir import check_resumable

    assert None in FORGET_BITS and 0 not in FORGET_BITS
    flag = build_parser().parse_args(["train", "--model", "rnnlm", "--forget-bits", "0"]).forget_bits
    config = TrainConfig(model="rnnlm", forget_bits=flag)
    assert config.forget_bits is None and TrainConfig(model="rnnlm", forget_bits=None) == config
    assert config.to_dict()["forget_bits"] == 0  # what config.json says, as in 0.1
    file = tmp_path / "run.toml"
    file.write_text('model = "rnnlm"\nforget_bits = 0\n')
    assert TrainConfig.from_dict(read_config_file(file)) == config
    saved = json.loads(json.dumps(config.to_dict()))  # a 0.1 run's config.json
    assert TrainConfig.from_dict(saved) == config
    check_resumable(saved, config)  # raises if any option differs
    assert TrainConfig(model="rnnlm").forget_bits == 3 and TrainConfig(model="rnnlm").to_dict()["forget_bits"] == 3
