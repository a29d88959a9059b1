"""Long-context fine-tuning at real LLM shapes: peak memory, bytes per token, the head and loss's share,
the longest context in 16 and 24 GiB, and step time, per memory mode, side by side in one run.

Models (random weights from the published configs, no download; written out below):

- Qwen3-0.6B: 28 layers, d 1024, SwiGLU 3072, 16 query / 8 key-value heads of 128, vocabulary 151,936,
  tied embeddings, RMSNorm eps 1e-6, rope theta 1e6;
- Llama-3.2-1B: 16 layers, d 2048, SwiGLU 8192, 32 / 8 heads of 64, vocabulary 128,256, tied embeddings,
  RMSNorm eps 1e-5, rope theta 500,000 with llama3 rope scaling (factor 32).

Setups: ``lora`` (PEFT LoRA r = 16, alpha 32, on the seven linears of every layer, base frozen) for both,
and ``full`` (every weight trained) for the 0.6B; AdamW in both. One step is
``zero_grad; model(input_ids, labels=input_ids, use_cache=False).loss.backward(); optimizer.step()``,
float32 weights and activations (``--autocast bf16`` runs the forward under bf16 autocast).

Modes, from the same weights:

- transformers: plain autograd;
- gc: ``gradient_checkpointing_enable(use_reentrant=False)`` (named ``activation_checkpointing_enable``
  in transformers 5.25), the anchor users have;
- gc+offload: checkpointing with each layer's input kept in host memory (Unsloth's offloaded
  checkpointing; ``activation_checkpointing_enable(offload=True)`` in transformers 5.25), emulated so
  that LiveBytes counts device bytes alone on any device: every layer runs without a graph, its input
  is copied to host memory LiveBytes does not count, and backward copies it back, recomputes the layer
  and back-propagates through it. The copies are synchronous, so its step time overstates a pinned,
  overlapped copy;
- gc+fused, gc+offload+fused: the same with the chunked linear cross-entropy (revbits.losses, the
  Liger / Cut Cross-Entropy practice; ``hf.enable_fused_loss``);
- checkpoint, mesa, bdia, bdia+mesa: ``revbits.hf.convert(model, mode)`` with its defaults, without and
  with (``+fused``) the fused loss.

Per mode, batch and length: the peak of one step counted by revbits.measure.LiveBytes (every storage
an operator creates, parameters, gradients and optimizer state included; on CUDA also
torch.cuda.max_memory_allocated), in two phases: forward and backward, and the optimizer step. Per mode
and batch: a line a + b T fitted through the forward-and-backward peaks; bytes per token = b / batch;
the longest context under 16 and 24 GiB with the weights in bf16 is where a - parameters / 2 + b T
reaches the budget (the parameters counted at 2 bytes instead of 4, everything else as measured in
float32), extrapolated along the line (marked * beyond the measured lengths), or 0 where the optimizer
step alone does not fit (the report, benchmarks/real_shapes_report.py, computes these from the JSON). The
head and loss alone (final norm, LM head, loss, back to the hidden states), plain and fused, measured at
the same lengths, give their share of each mode's activations.

Points run length by length (every mode at a length, then the next length). A point is skipped, with its
reason in the JSON, where the line through its mode's two longest measured peaks predicts more than
``--max-gib`` counted, or on CPU more than ``--max-host-gib`` of host memory (with gc+offload's host
copies), or where the mode ran out of memory or failed at a shorter length. A point that raises is
recorded with the first line of its error and the run goes on.

The JSON (``--out``.json) is written after every point and is resumable: a rerun skips the points it
holds (measured or failed) and measures the rest; ``--redo`` measures the selected points again and
replaces their rows (``--runs qwen3-0.6b:lora --batches 1 --modes bdia+fused --redo`` after a change to
BDIA). Step times (``--repeats N``, idle machine only): N interleaved rounds of every selected mode at
``--time-batch`` x ``--time-length``, a warm-up step first, the median, as a ratio to gc in the report.

    python benchmarks/real_shapes.py --runs qwen3-0.6b:lora --batches 1 --idle no      # bytes, resumable
    python benchmarks/real_shapes.py --runs qwen3-0.6b:lora --batches 1 --lengths 2048 --repeats 3 \\
        --modes gc gc+fused gc+offload+fused checkpoint+fused bdia+fused --idle yes    # step times
    python benchmarks/real_shapes.py --layers 2 --vocab 4096 --lengths 64 128 --batches 1 --repeats 1 \\
        --time-length 64 --out runs/real_shapes_smoke                                  # a smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from real_shapes_report import GIB, MODES, write_report
from revbits import hf
from revbits.losses import linear_cross_entropy
from revbits.measure import tracking

#: Qwen3-0.6B's published layer (its depth and vocabulary apart); layer_floor.py and token_slices.py take it from here.
QWEN3_0_6B = dict(
    hidden_size=1024, intermediate_size=3072, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
    rms_norm_eps=1e-6, rope_theta=1_000_000.0, max_position_embeddings=40960,
)
SHAPES: dict[str, Callable[[], object]] = {
    "qwen3-0.6b": lambda: Qwen3Config(
        **QWEN3_0_6B, num_hidden_layers=28, vocab_size=151936, tie_word_embeddings=True, hidden_act="silu",
        attention_bias=False,
    ),
    "llama-3.2-1b": lambda: LlamaConfig(
        num_hidden_layers=16, hidden_size=2048, intermediate_size=8192, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True, rms_norm_eps=1e-5,
        max_position_embeddings=131072, hidden_act="silu", rope_parameters={
            "rope_type": "llama3", "rope_theta": 500_000.0, "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    ),
}
LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=LINEARS)
RUNS = ["qwen3-0.6b:lora", "llama-3.2-1b:lora", "qwen3-0.6b:full"]
def build(shape: str, setup: str, layers: int | None, vocab: int | None, device: str) -> nn.Module:
    """The random model of ``shape`` (seed 0), truncated to ``layers``, LoRA-wrapped for ``setup == "lora"``."""
    config = SHAPES[shape]()
    config.num_hidden_layers = layers or config.num_hidden_layers
    config.vocab_size = vocab or config.vocab_size
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(device)
    if setup == "lora":
        model = get_peft_model(model, LoraConfig(**LORA))
    return model.train()


def task_of(model: nn.Module) -> nn.Module:
    return model.get_base_model() if hasattr(model, "get_base_model") else model


class HostOffloadedLayer(torch.autograd.Function):
    """y = layer(x) with no graph; x kept in host memory; backward copies x back, recomputes the layer and
    back-propagates through it (parameters' gradients accumulate directly, as reentrant checkpointing does).
    ``anchor`` is a tensor that requires grad, so y requires grad even when x does not (frozen embeddings)."""

    @staticmethod
    def forward(ctx, run, anchor, x):  # type: ignore[override]
        ctx.run, ctx.device = run, x.device
        ctx.autocast = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else None
        ctx.host = (x.detach().cpu().contiguous().view(torch.uint8).numpy().copy(), x.dtype, x.shape)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        array, dtype, shape = ctx.host
        x = torch.from_numpy(array).to(ctx.device, copy=True).view(dtype).view(shape).requires_grad_()
        autocast = ctx.autocast is not None
        with torch.enable_grad(), torch.autocast(ctx.device.type, dtype=ctx.autocast, enabled=autocast):
            y = ctx.run(x)
        torch.autograd.backward(y, grad)
        return None, None, x.grad


def offloaded_forward(*args, original, anchor, **kwargs):
    hidden, rest = args[0], args[1:]
    return HostOffloadedLayer.apply(lambda h: original(h, *rest, **kwargs), anchor, hidden)


@contextlib.contextmanager
def mode_applied(model: nn.Module, mode: str) -> Iterator[None]:
    """``model`` runs under ``mode`` inside the block, and as it was afterwards."""
    kind, memory, fused = MODES[mode]
    task = task_of(model)
    layers = task.model.layers
    if kind == "gc":
        if hasattr(task, "activation_checkpointing_enable"):  # transformers 5.25 deprecates gradient_*
            task.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            task.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif kind == "offload":
        anchor = torch.zeros((), device=next(model.parameters()).device, requires_grad=True)
        for layer in layers:
            layer.forward = functools.partial(offloaded_forward, original=layer.forward, anchor=anchor)
    elif kind == "revbits":
        hf.convert(model, memory, fused_loss=False)
    if fused:
        hf.enable_fused_loss(model)
    try:
        yield
    finally:
        hf.disable_fused_loss(model)
        if kind == "gc":
            getattr(task, "activation_checkpointing_disable", task.gradient_checkpointing_disable)()
        elif kind == "offload":
            for layer in layers:
                del layer.forward
        elif kind == "revbits":
            hf.restore(model)


def step_fn(model: nn.Module, ids: torch.Tensor, autocast: bool) -> Callable[[], torch.Tensor]:
    def run() -> torch.Tensor:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            return model(input_ids=ids, labels=ids, use_cache=False).loss

    return run


def tokens(batch: int, length: int, vocab: int, device: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(length)
    return torch.randint(0, vocab, (batch, length), generator=g).to(device)


def key_of(row: dict) -> tuple:
    """A measured point: (run, batch, mode, length); a head-and-loss point: (run, batch, length, fused)."""
    return (row["run"], row["batch"], row["mode"], row["length"]) if "mode" in row else \
        (row["run"], row["batch"], row["length"], row["fused"])


class Results:
    """The JSON of a run, kept on disk after every point (written to a temporary file, then renamed), so an
    interrupted or crashed run keeps what it measured, and a rerun skips the points already there."""

    def __init__(self, path: Path) -> None:
        self.path = path
        raw = json.loads(path.read_text()) if path.exists() else {}
        self.meta: dict = raw.get("meta", {})
        self.rows: list[dict] = raw.get("rows", [])
        self.heads: list[dict] = raw.get("head_and_loss", [])
        self.times: dict = raw.get("step_seconds", {})

    def find(self, key: tuple) -> dict | None:
        return next((r for r in self.rows + self.heads if key_of(r) == key), None)

    def put(self, row: dict) -> None:
        """Add ``row``, replacing the point's earlier row if there is one, and write the file."""
        table = self.rows if "mode" in row else self.heads
        table[:] = [r for r in table if key_of(r) != key_of(row)] + [row]
        self.save()

    def drop(self, keep: Callable[[dict], bool]) -> None:
        self.rows = [r for r in self.rows if keep(r)]

    def save(self) -> None:
        raw = {"meta": self.meta, "rows": self.rows, "head_and_loss": self.heads, "step_seconds": self.times}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_suffix(".json.tmp")
        temporary.write_text(json.dumps(raw, indent=1))
        temporary.replace(self.path)


def predicted_peak(rows: list[dict], length: int) -> float | None:
    """The peak at ``length`` along the line through the two longest measured lengths (None with fewer)."""
    done = sorted((r["length"], r["peak"]) for r in rows if "peak" in r)
    if len(done) < 2:
        return None
    (t0, p0), (t1, p1) = done[-2:]
    return p1 + (p1 - p0) / (t1 - t0) * (length - t1)


def host_copies(model: nn.Module, mode: str, batch: int, length: int) -> int:
    """Bytes gc+offload keeps in host memory (each layer's float32 input), which LiveBytes does not count."""
    if MODES[mode][0] != "offload":
        return 0
    config = task_of(model).config
    return config.num_hidden_layers * batch * length * config.hidden_size * 4


def reason_to_skip(results: Results, model: nn.Module, point: tuple, args) -> str | None:
    """Why the point (run, batch, mode, length) is not run: predicted above ``--max-gib`` of counted bytes or,
    on CPU, above ``--max-host-gib`` of host memory (counted bytes plus gc+offload's host copies); an
    out-of-memory error or a failure at a shorter length; None to run it."""
    run, batch, mode, length = point
    mine = [r for r in results.rows if (r["run"], r["batch"], r["mode"]) == (run, batch, mode) and r["length"] < length]
    if any(r.get("oom") for r in mine):
        return "out of memory at a shorter length"
    if any(r.get("failed") for r in mine):
        return "failed at a shorter length"
    guess = predicted_peak(mine, length)
    if guess is None:
        return None
    if guess > args.max_gib * GIB:
        return f"predicted peak {guess / GIB:.1f} GiB > --max-gib {args.max_gib}"
    host = guess + host_copies(model, mode, batch, length)
    if args.device == "cpu" and host > args.max_host_gib * GIB:
        return f"predicted host memory {host / GIB:.1f} GiB > --max-host-gib {args.max_host_gib}"
    return None


def measure_step(model: nn.Module, loss_fn: Callable[[], torch.Tensor], optimizer) -> dict:
    """Bytes of ``zero_grad; loss_fn().backward(); optimizer.step()``, counted by LiveBytes: ``peak`` and its
    split over the forward and backward (which grows with the context); ``phase_peaks``, the peak of each
    phase: the forward, the backward of the head and loss (until the gradient reaches the final norm's
    input) and the backward of the layers; and ``optimizer_step_peak`` over the optimizer step (which does
    not grow). Each phase's peak grows along its own line, so the phase that holds the step's peak at short
    contexts (a fused loss's fixed chunk buffers) may not be the one at long contexts: the report fits each
    phase. On CUDA also max_memory_allocated."""
    params = list(model.parameters())
    optimizer.zero_grad(set_to_none=True)
    cuda = params[0].is_cuda
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    with tracking(params, optimizer) as tracker:
        phases: dict[str, dict[str, int]] = {}

        def close(name: str) -> None:
            phases[name] = dict(tracker.peak)
            tracker.reset_peak()

        def watch_hidden(module: nn.Module, inputs: tuple) -> None:
            if inputs[0].requires_grad:
                inputs[0].register_hook(lambda grad: close("head_backward"))

        hook = task_of(model).model.norm.register_forward_pre_hook(watch_hidden)
        try:
            loss = loss_fn()
        finally:
            hook.remove()
        held = tracker.current["activations"]
        close("forward")
        loss.backward()
        del loss
        close("layers_backward")
        split = max(phases.values(), key=lambda p: sum(p.values()))
        optimizer.step()
        step_peak = tracker.peak_total
    return {**split, "peak": sum(split.values()), "held_after_forward": held, "optimizer_step_peak": step_peak,
            "phase_peaks": {name: sum(p.values()) for name, p in phases.items()},
            "cuda_max_allocated": torch.cuda.max_memory_allocated() if cuda else None}


def measure_point(model: nn.Module, optimizer, mode: str, batch: int, length: int, args) -> dict:
    """One step of ``mode`` at (batch, length): measure_step's bytes, an out-of-memory flag, or the first
    line of the error that stopped it (the run goes on with the next point)."""
    ids = tokens(batch, length, task_of(model).config.vocab_size, args.device)
    start = time.perf_counter()
    try:
        with mode_applied(model, mode):
            report = measure_step(model, step_fn(model, ids, args.autocast == "bf16"), optimizer)
    except torch.OutOfMemoryError:
        report = {"oom": True}
    except Exception as error:  # noqa: BLE001 - recorded in the row, and the run goes on
        lines = str(error).strip().splitlines()
        report = {"failed": f"{type(error).__name__}: {lines[0] if lines else ''}"[:300]}
    if "peak" not in report:
        model.zero_grad(set_to_none=True)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    return {**report, "seconds_tracked": time.perf_counter() - start,
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def head_and_loss(model: nn.Module, batch: int, length: int, fused: bool, device: str) -> dict:
    """Activation bytes at the peak of the final norm, LM head and loss back to the hidden states, plain or
    fused (the head's weight gradient, in full fine-tuning, counts as a gradient as in the steps)."""
    task = task_of(model)
    config = task.config
    ids = tokens(batch, length, config.vocab_size, device)
    hidden = torch.randn(batch, length, config.hidden_size, device=device, requires_grad=True)
    with tracking(list(task.parameters())) as tracker:
        normed = task.model.norm(hidden)
        if fused:
            loss = linear_cross_entropy(normed, task.lm_head, ids, shift=True)
        else:
            loss = task.loss_function(logits=task.lm_head(normed), labels=ids, vocab_size=config.vocab_size)
        loss.backward()
    task.zero_grad(set_to_none=True)
    return {"batch": batch, "length": length, "fused": fused, "peak": tracker.peak["activations"]}


def step_times(model, optimizer, modes: list[str], batch: int, length: int, args) -> dict[str, float]:
    """Median seconds of one step per mode: ``repeats`` rounds, every mode once per round (a warm-up step
    first in round 0), so drift in machine speed hits every mode alike."""
    ids = tokens(batch, length, task_of(model).config.vocab_size, args.device)
    cuda = args.device.startswith("cuda")
    times: dict[str, list[float]] = {m: [] for m in modes}
    for round_ in range(args.repeats):
        for mode in modes:
            with mode_applied(model, mode):
                for timed in [True] if round_ else [False, True]:
                    optimizer.zero_grad(set_to_none=True)
                    if cuda:
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    step_fn(model, ids, args.autocast == "bf16")().backward()
                    optimizer.step()
                    if cuda:
                        torch.cuda.synchronize()
                    if timed:
                        times[mode].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items() if t}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", default=RUNS, help="model:setup, setup lora or full")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--lengths", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    parser.add_argument("--redo", action="store_true",
                        help="measure the selected points again, replacing their rows (e.g. --modes bdia+fused)")
    parser.add_argument("--layers", type=int, help="truncate every model to N layers (a quick check)")
    parser.add_argument("--vocab", type=int, help="replace the vocabulary size (a smoke run only)")
    parser.add_argument("--budgets", type=float, nargs=2, default=[16.0, 24.0], help="GiB")
    parser.add_argument("--max-gib", type=float, default=20.0, help="skip points predicted above this counted peak")
    parser.add_argument("--max-host-gib", type=float, default=18.0,
                        help="on CPU, skip points predicted above this much host memory")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--autocast", choices=["none", "bf16"], default="none")
    parser.add_argument("--time-batch", type=int, default=1)
    parser.add_argument("--time-length", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=0,
                        help="timed rounds of every selected mode at --time-batch x --time-length (0: bytes only; "
                             "run timings on an idle machine only)")
    parser.add_argument("--idle", default="unknown", help="written into the raw output: was the machine idle?")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "real_shapes",
                        help="writes OUT.json (resumable), OUT.md and OUT.png")
    args = parser.parse_args()
    args.lengths = sorted(args.lengths)
    return args


def pending(results: Results, spec: str, args) -> list[tuple]:
    """The points of ``spec`` this invocation still has to measure, length by length (every mode at a length
    before the next length, so a run stopped early has every mode at the shorter lengths)."""
    points = [(spec, batch, mode, length) for batch in args.batches for length in args.lengths for mode in args.modes]
    return [p for p in points if not (results.find(p) and ("peak" in results.find(p) or "failed" in results.find(p)))]


def missing_heads(results: Results, spec: str) -> list[tuple[int, int, bool]]:
    """(batch, length, fused) where a mode of ``spec`` with (fused) or without the fused loss was measured and
    the head and loss were not (the plain head at T = 4096 alone holds 7 GiB of logits: not measured unless
    a plain-loss mode was)."""
    done = dict.fromkeys((r["batch"], r["length"], MODES[r["mode"]][2]) for r in results.rows
                         if r["run"] == spec and "peak" in r)
    return [point for point in done if results.find((spec, *point)) is None]


def measure_heads(results: Results, model: nn.Module, spec: str, args, only: tuple | None = None) -> None:
    """The head and loss where missing_heads says (or at ``only`` = (batch, length) alone)."""
    for batch, length, fused in missing_heads(results, spec):
        if only in (None, (batch, length)):
            results.put({"run": spec, **head_and_loss(model, batch, length, fused, args.device)})


def measure_run(results: Results, spec: str, args, log) -> None:
    """Every pending point of ``spec`` on one model, then the head and loss at the lengths measured, then
    (``--repeats``) step times."""
    todo = pending(results, spec, args)
    if not todo and not missing_heads(results, spec) and not args.repeats:
        return
    shape, setup = spec.split(":")
    model = build(shape, setup, args.layers, args.vocab, args.device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    results.meta.setdefault("parameters", {})[spec] = {
        "total": sum(p.numel() for p in model.parameters()), "trainable": sum(p.numel() for p in trainable)}
    optimizer = torch.optim.AdamW(trainable, lr=1e-6)
    vocab = task_of(model).config.vocab_size
    step_fn(model, tokens(1, 32, vocab, args.device), args.autocast == "bf16")().backward()  # lazy initialisation
    optimizer.step()  # and the optimizer state, before anything is measured
    for point in todo:
        _, batch, mode, length = point
        why = reason_to_skip(results, model, point, args)
        row = {"skipped": why} if why else measure_point(model, optimizer, mode, batch, length, args)
        results.put({"run": spec, "batch": batch, "mode": mode, "length": length, **row})
        log(f"  B={batch} T={length:5d} {mode:18s} " + (
            f"peak {row['peak'] / GIB:7.3f} GiB  activations {row['activations'] / GIB:7.3f} GiB  "
            f"({row['seconds_tracked']:.0f} s)" if "peak" in row else
            str({k: v for k, v in row.items() if k in ("skipped", "failed", "oom")})))
        measure_heads(results, model, spec, args, only=(batch, length))
    measure_heads(results, model, spec, args)
    if args.repeats:
        seconds = step_times(model, optimizer, args.modes, args.time_batch, args.time_length, args)
        results.times[spec] = {"batch": args.time_batch, "length": args.time_length, "repeats": args.repeats,
                               "machine_idle": args.idle, "seconds": seconds}
        results.save()


def invocation(args) -> dict:
    """What this invocation ran, for the raw output."""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=Path(__file__).parent).stdout.strip()
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or \
        platform.machine()
    argv = [Path(a).name if a.startswith("/") else a for a in sys.argv[1:]]  # no machine paths in the output
    return {"argv": argv, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "commit": commit,
            "device": args.device, "device_name": device, "torch": torch.__version__,
            "threads": torch.get_num_threads(), "machine_idle": args.idle}


def main() -> None:
    args = parse_args()
    results = Results(args.out.with_suffix(".json"))
    if args.redo:
        selected = set(args.runs), set(args.batches), set(args.modes), set(args.lengths)
        results.drop(lambda r: not all(r[k] in s for k, s in zip(("run", "batch", "mode", "length"), selected)))
    results.meta.update({
        "shapes": {name: SHAPES[name]().to_dict() for name in SHAPES}, "lora": LORA, "layers": args.layers,
        "vocab_override": args.vocab, "autocast": args.autocast, "budgets": args.budgets,
        "max_gib": args.max_gib, "max_host_gib": args.max_host_gib,
    })
    results.meta.setdefault("invocations", []).append(invocation(args))
    results.save()
    for spec in args.runs:
        print(f"{spec}:", flush=True)
        measure_run(results, spec, args, lambda s: print(s, flush=True))
    print("\n".join(write_report(args.out.with_suffix(".json"))))


if __name__ == "__main__":
    main()
