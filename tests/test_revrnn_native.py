"""The reversible RNNs' native operators (revbits/native/revrnn.cpp) against the Python path.

Every state, buffer word, spill decision, output and gradient must be the Python path's, bit for bit.
CI machines have a C++ compiler, so a kernel that cannot be built fails here instead of skipping.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import revbits.revrnn.cells as cells
import revbits.revrnn.fused as fused
from revbits import native
from revbits.revrnn import RevGRU, RevLSTM
from revbits.revrnn.fixed_point import to_float
from revbits.revrnn.info_buffer import InfoBuffer
from revbits.revrnn.layers import _Run

NATIVE_CELLS = [RevGRU, RevLSTM]


def test_the_kernel_builds_here():
    assert native.load("revrnn"), "the native kernel did not build (see the warning): CI has g++"


def training_run(cls, use_native, monkeypatch, dtype, forget_bits, masked, hidden=10, inputs=5, steps=30):
    """Outputs, final states, the buffers after the forward, and every gradient, with ``use_native``."""
    monkeypatch.setattr(fused, "use_native", use_native)
    calls = []
    monkeypatch.setattr(cells, "native_ops", lambda *a: calls.append(fused.native_ops(*a)) or calls[-1])
    torch.manual_seed(0)
    rnn = cls(inputs, hidden, num_layers=2, forget_bits=forget_bits).to(dtype)
    x = (torch.randn(steps, 3, inputs, dtype=dtype) * 2).requires_grad_()
    lengths = torch.tensor([steps, 7, 19]) if masked else None
    initial = tuple(torch.randn(2, 3, hidden, dtype=dtype) * 0.5 for _ in range(rnn.cells[0].state_parts))
    out, finals = rnn(x, initial, lengths=lengths)
    buffers = [(b.word.clone(), list(b._spilled), [w.clone() for w in b._stack]) for b in rnn.last_run.buffers]
    (out.square().sum() + sum(f.sin().sum() for f in finals)).backward()
    assert all(b.empty for b in rnn.last_run.buffers)
    native_calls = sum(c is not None for c in calls)
    grads = [x.grad] + [p.grad for p in rnn.parameters()]
    return out.detach(), [f.detach() for f in finals], buffers, grads, native_calls


@pytest.mark.parametrize("cls", NATIVE_CELLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("forget_bits", [1, 3, None])
@pytest.mark.parametrize("masked", [False, True])
def test_native_steps_give_the_python_paths_bits(cls, dtype, forget_bits, masked, monkeypatch):
    fast = training_run(cls, True, monkeypatch, dtype, forget_bits, masked)
    slow = training_run(cls, False, monkeypatch, dtype, forget_bits, masked)
    assert fast[4] > 0 and slow[4] == 0  # the native operators ran in one and not in the other
    assert torch.equal(fast[0], slow[0])
    assert all(torch.equal(a, b) for a, b in zip(fast[1], slow[1]))
    for (word_a, spills_a, stack_a), (word_b, spills_b, stack_b) in zip(fast[2], slow[2]):
        assert torch.equal(word_a, word_b) and spills_a == spills_b
        assert len(stack_a) == len(stack_b) and all(torch.equal(a, b) for a, b in zip(stack_a, stack_b))
    if forget_bits is None:
        assert any(spills for _, spills, _ in fast[2])  # the runs spilled words
    assert all(torch.equal(a, b) for a, b in zip(fast[3], slow[3]))


@pytest.mark.parametrize("cls", NATIVE_CELLS)
@pytest.mark.parametrize("host_decides", [True, False])
def test_a_python_reversal_is_back_propagated_by_the_python_path(cls, host_decides, monkeypatch):
    """Information tracking and device spill decisions reverse in Python; their backward must read the
    Python path's gates (all five numerators), whatever the native operators could do."""
    import functools

    import revbits.revrnn.layers as layers

    results = []
    for use_native in (True, False):
        monkeypatch.setattr(fused, "use_native", use_native)
        monkeypatch.setattr(layers, "InfoBuffer", functools.partial(InfoBuffer, host_decides=host_decides))
        torch.manual_seed(3)
        rnn = cls(4, 8, num_layers=2, forget_bits=5)
        rnn.track_information = host_decides  # with host decisions, tracking sends the steps to Python
        x = torch.randn(40, 3, 4, requires_grad=True)
        rnn(x, lengths=torch.tensor([40, 9, 33]))[0].square().sum().backward()
        results.append([x.grad] + [p.grad for p in rnn.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("cls", NATIVE_CELLS)
def test_native_steps_reverse_to_every_earlier_state(cls, monkeypatch):
    """The reversal by native operators rebuilds each step's states, for an odd width and a mask."""
    torch.manual_seed(1)
    rnn = cls(3, 6, num_layers=1, forget_bits=None)
    x, mask = torch.randn(25, 4, 3), torch.arange(25)[:, None] < torch.tensor([25, 3, 11, 24])[None, :]
    run = _Run(rnn, x, mask, [torch.randn(1, 4, 6) * 0.5 for _ in range(rnn.cells[0].state_parts)])
    cell, buffer = rnn.cells[0], run.buffers[0]
    history = []
    with torch.no_grad():
        assert fused.native_ops(x, buffer) is not None
        for t in range(25):
            history.append([s.clone() for s in run.states[0]])
            floats = [to_float(s) for s in run.states[0]]
            run.states[0], _ = cell.step(buffer, x[t], run.states[0], floats, mask[t])
        for t in range(24, -1, -1):
            run.states[0] = cell.inverse(buffer, x[t], run.states[0], mask[t])
            assert all(torch.equal(a, b) for a, b in zip(run.states[0], history[t]))
    assert buffer.empty


def test_without_a_compiler_the_python_path_runs_with_one_warning(monkeypatch, tmp_path):
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path))
    monkeypatch.setattr(native, "_loaded", {})

    def no_compiler():
        raise native.NativeBuildError("no C++ compiler found (set CXX, or install g++)")

    monkeypatch.setattr(native, "_compiler", no_compiler)
    with pytest.warns(UserWarning, match="native kernel 'revrnn' unavailable.*no C\\+\\+ compiler"):
        assert native.load("revrnn") is False
    assert native.load("revrnn") is False  # decided once per process
    assert fused.native_ops(torch.zeros(2, 2)) is None
    assert not list(tmp_path.iterdir())  # nothing half-written left in the cache


def test_a_source_that_does_not_compile_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    (tmp_path / "broken.cpp").write_text("this is not C++\n")
    with pytest.raises(native.NativeBuildError, match="compiling broken.cpp failed: .*error"):
        native.build("broken")
    assert not list((tmp_path / "cache").iterdir())


def test_revbits_native_0_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv(native.ENV_SWITCH, "0")
    monkeypatch.setattr(native, "_loaded", {})
    assert native.load("revrnn") is False
    monkeypatch.setenv(native.ENV_SWITCH, "1")
    assert native.load("revrnn") is True  # the switch is read at every call, not remembered


def test_the_library_name_follows_the_source_and_the_cpu(monkeypatch):
    path = native.library_path("revrnn")
    assert path.name.startswith("revrnn-") and torch.__version__.replace("+", "_") in path.name
    monkeypatch.setattr(native, "_cpu_features", lambda: "another cpu")
    assert native.library_path("revrnn") != path


def test_an_edited_header_names_another_library(monkeypatch, tmp_path):
    for source in list(native.SOURCES.glob("*.cpp")) + list(native.SOURCES.glob("*.h")):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    before = native.library_path("revrnn")
    (tmp_path / "revrnn_fixed.h").write_text((tmp_path / "revrnn_fixed.h").read_text() + "\n// edited\n")
    assert native.library_path("revrnn") != before


@pytest.mark.parametrize("cls", NATIVE_CELLS)
def test_a_cell_step_traced_by_dynamo_takes_the_python_path(cls):
    """A cell step called inside a compiled function takes the Python path (the native operators have no fake
    kernels to trace) and gives the eager step's bits. (A whole RevGRU/RevLSTM under torch.compile runs
    eagerly: tests/test_revrnn_paths.py.)"""
    torch.manual_seed(0)
    rnn = cls(3, 4, num_layers=1)
    cell, x = rnn.cells[0], torch.randn(2, 3)

    def one_step():
        run = _Run(rnn, x[None], None, [torch.full((1, 2, 4), 0.25) for _ in range(cell.state_parts)])
        return cell.step(run.buffers[0], x, run.states[0], run.initial_floats()[0], None)[0]

    with torch.no_grad():
        eager = one_step()
        torch._dynamo.reset()
        compiled = torch.compile(one_step, backend="eager", fullgraph=False)()
    assert all(torch.equal(a, b) for a, b in zip(compiled, eager))


@pytest.mark.parametrize("cls", NATIVE_CELLS)
def test_turning_the_kernels_off_between_forward_and_backward_changes_nothing(cls, monkeypatch):
    """A half reversed by the native operators is back-propagated by them, whatever the switch says then."""
    results = []
    for switch_off_before_backward in (False, True):
        monkeypatch.setattr(fused, "use_native", True)
        torch.manual_seed(2)
        rnn = cls(4, 6, num_layers=2)
        x = torch.randn(9, 2, 4, requires_grad=True)
        loss = rnn(x)[0].square().sum()
        if switch_off_before_backward:
            monkeypatch.setattr(fused, "use_native", False)
        loss.backward()
        results.append([x.grad] + [p.grad for p in rnn.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*results))


@pytest.mark.parametrize("cls", NATIVE_CELLS)
def test_flop_counter_sees_the_products_inside_the_native_operators(cls, monkeypatch):
    """FlopCounterMode counts the products a native operator dispatches as it counts the Python path's."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for use_native in (True, False):
        monkeypatch.setattr(fused, "use_native", use_native)
        torch.manual_seed(0)
        rnn = cls(16, 16, num_layers=2)
        x = torch.randn(5, 3, 16, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            rnn(x)[0].sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] > 0


FAKE_COMPILER = """#!/bin/sh
# Logs its call, takes a second, and writes an empty library where -o says.
echo call >> "{log}"
sleep 1
while [ "$#" -gt 0 ]; do
  if [ "$1" = "-o" ]; then : > "$2"; fi
  shift
done
"""

BUILD_AFTER_BARRIER = """
import sys, time
from pathlib import Path
from revbits import native
ready = Path(sys.argv[1])
(ready / sys.argv[2]).touch()
while len(list(ready.iterdir())) < 2:  # both processes start building at once
    time.sleep(0.01)
print(native.build("revrnn"))
"""


def test_processes_starting_together_on_an_empty_cache_compile_once(tmp_path):
    """Two ranks on an empty cache: one compiles, the other waits for it and gets the same library."""
    log, ready = tmp_path / "calls.log", tmp_path / "ready"
    ready.mkdir()
    compiler = tmp_path / "fake-cxx"
    compiler.write_text(FAKE_COMPILER.format(log=log))
    compiler.chmod(0o755)
    package_root = str(Path(native.__file__).parents[2])  # where ``import revbits`` finds this revbits
    env = {**os.environ, "CXX": str(compiler), native.ENV_CACHE: str(tmp_path / "cache"), "PYTHONPATH": package_root}
    ranks = [
        subprocess.Popen(
            [sys.executable, "-c", BUILD_AFTER_BARRIER, str(ready), str(rank)],
            env=env,
            stdout=subprocess.PIPE,
            text=True,
        )
        for rank in range(2)
    ]
    paths = [rank.communicate(timeout=120)[0].strip() for rank in ranks]
    assert all(rank.returncode == 0 for rank in ranks)
    assert paths[0] == paths[1] and Path(paths[0]).exists()
    assert log.read_text().splitlines() == ["call"]  # compiled once
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(paths[0]).name]  # no lock or scratch left


def test_a_cache_on_a_file_system_without_locks_still_builds(monkeypatch, tmp_path):
    """flock refused (as on some network file systems): the build goes on unlocked instead of failing."""
    import fcntl

    def refuse(descriptor, operation):
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", refuse)
    monkeypatch.setattr(native, "SOURCES", tmp_path)
    monkeypatch.setenv(native.ENV_CACHE, str(tmp_path / "cache"))
    (tmp_path / "tiny.cpp").write_text("int revbits_tiny() { return 1; }\n")
    built = native.build("tiny")
    assert built.exists() and built.parent == tmp_path / "cache"
