"""The command line starts without torch where it can (``revbits --help``), keeps its commands' parsers
as they were when it builds them lazily, and sets torch's thread policy (OpenMP's wait policy before
torch is imported, ``--threads``)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from helpers import benchmark_script
from revbits.cli import COMMANDS, build_parser, main
from revbits.threads import prefer_passive_waiting


def run_python(code: str) -> str:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@pytest.mark.parametrize("module", ["revbits.cli", "revbits"])
@pytest.mark.parametrize("argv", [["--help"], ["--version"], [], ["trian"]])
def test_the_top_level_and_its_errors_do_not_import_torch(argv, module):
    """``revbits --help`` (and --version, a missing or mistyped command) never loads torch: 3 to 7 s of
    start-up before, most of it torch._dynamo. ``python -m revbits`` is the same command line."""
    printed = run_python(
        f"""
        import runpy, sys
        sys.argv = ["revbits", *{argv!r}]
        try:
            runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
        except SystemExit:
            pass
        print("torch" in sys.modules)
        """
    )
    assert printed.splitlines()[-1] == "False"


def test_import_revbits_does_not_import_torch():
    assert run_python("import sys, revbits; print('torch' in sys.modules)") == "False"


def test_every_public_name_resolves_lazily_to_its_defining_module():
    import revbits
    import revbits.bdia
    import revbits.modes
    import revbits.train  # noqa: F401
    from revbits import stack

    assert revbits.stack is stack is revbits.modes.stack  # the function; its module is revbits.modes
    assert "revbits.stack" not in sys.modules
    assert revbits.BDIAStack is revbits.bdia.BDIAStack and revbits.models is sys.modules["revbits.models"]
    assert all(getattr(revbits, name) is not None for name in revbits.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Stack'"):
        revbits.Stack  # noqa: B018


def test_every_command_is_registered_by_its_row_of_the_table():
    """One way to register a command (issue 23, point 8): a row of COMMANDS names the function that adds its
    flags and handler; the full parser lists each with the row's help, in the table's order, and every
    command that computes takes --threads."""
    full = build_parser()
    listed = {action.dest: action.help for action in full._subparsers._group_actions[0]._choices_actions}
    assert list(listed) == list(COMMANDS) and listed == {name: row.help for name, row in COMMANDS.items()}
    parsers = full._subparsers._group_actions[0].choices
    for name, row in COMMANDS.items():
        has_threads = any(action.dest == "threads" for action in parsers[name]._actions)
        assert has_threads == row.computes, name
        assert parsers[name].get_default("run") is not None or parsers[name]._subparsers is not None, name


def test_memory_and_bench_say_apart_what_they_measure():
    """``revbits memory`` measures a model you train; ``revbits bench`` compares the modes on a bare block stack,
    with time. Each help line says which, and both take --modes and --json from one definition."""
    assert "your model" in COMMANDS["memory"].help and "time" not in COMMANDS["memory"].help
    assert "step time" in COMMANDS["bench"].help and "GPT-block stack" in COMMANDS["bench"].help
    parsers = build_parser(["memory", "bench"])._subparsers._group_actions[0].choices
    for name in ("memory", "bench"):
        options = {option for action in parsers[name]._actions for option in action.option_strings}
        assert {"--modes", "--json", "--threads"} <= options, name


@pytest.mark.parametrize(
    "argv",
    [
        ["train", "--model", "gpt", "--steps", "3", "--threads", "1"],
        ["memory", "--modes", "standard", "bdia"],
        ["eval", "runs/x", "--split", "test"],
        ["data", "list"],
        ["bench", "--depths", "2", "--threads", "2"],
    ],
)
def test_a_commands_lazy_parser_reads_its_line_as_the_full_parser_does(argv):
    assert vars(build_parser([argv[0]]).parse_args(argv)) == vars(build_parser().parse_args(argv))


def test_threads_sets_torchs_thread_count(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        tiny = ["--depths", "2", "--seq-len", "8", "--batch", "1", "--d-model", "16", "--heads", "2"]
        assert main(["bench", *tiny, "--repeats", "1", "--modes", "standard", "--threads", "1"]) == 0
        assert "(1 threads)" in capsys.readouterr().out
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_threads_must_be_positive(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--threads", "0"])
    assert exit_info.value.code == 2
    assert "--threads: must be at least 1" in capsys.readouterr().err


def test_passive_waiting_is_set_before_torch_loads():
    """OpenMP reads OMP_WAIT_POLICY once, when torch loads its runtime: the command line must set it first.
    The subprocess records the variable when torch is first imported, and stops there."""
    printed = run_python(
        """
        import os, sys
        os.environ.pop("OMP_WAIT_POLICY", None)
        seen = []

        class Watch:
            def find_spec(self, name, path=None, target=None):
                if name == "torch":
                    seen.append(os.environ.get("OMP_WAIT_POLICY"))
                    raise ImportError("stopped at torch")

        sys.meta_path.insert(0, Watch())
        from revbits.cli import main
        try:
            main(["train", "--help"])
        except ImportError:
            pass
        print(seen)
        """
    )
    assert printed.splitlines()[-1] == "['PASSIVE']"


@pytest.mark.parametrize(
    "environ, expected",
    [
        ({}, {"OMP_WAIT_POLICY": "PASSIVE"}),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, {"OMP_WAIT_POLICY": "ACTIVE"}),  # the user's choice is kept
        ({"GOMP_SPINCOUNT": "10000"}, {"GOMP_SPINCOUNT": "10000"}),
    ],
)
def test_passive_waiting_keeps_a_users_wait_setting(environ, expected):
    was_unset = environ == {}
    assert prefer_passive_waiting(environ) == was_unset
    assert environ == expected


def test_the_main_jobs_model_is_what_the_overhead_benchmark_trains(monkeypatch):
    """benchmarks/cli_overhead.py reads scripts/main.sh's model=(...) line; the flags build a valid BDIA GPT."""
    from revbits.train.commands import _config_from_args

    args = benchmark_script("cli_overhead", monkeypatch).main_job_args()
    config = _config_from_args(build_parser(["train"]).parse_args(["train", *args, "--memory", "bdia"]))
    assert (config.model, config.memory) == ("gpt", "bdia") and "--n-layer" in args
