"""Long context at Qwen3-0.6B's width: what one step holds per token once the layers set the peak.

At T = 256..1024 the peak of a LoRA step at Qwen3-0.6B's shape sits in the LM head and loss. From T = 2048 on
it moves into the layers' backward: offloaded checkpointing holds one whole layer's recomputed graph, BDIA two
states, the residue planes and one layer's recomputed graph, minus what token slices cut. This script counts
those bytes on a SHORT stack of the real width, so that long contexts fit on a CPU:

- model: transformers' Qwen3ForCausalLM with Qwen3-0.6B's published layer shape (d 1024, SwiGLU 3072, 16/8
  heads of 128, q/k RMSNorm, rotary theta 1e6), ``--layers`` layers (default 2), random weights, SDPA
  attention, a ``--vocab`` vocabulary (default 8192, tied embeddings), the fused loss in chunks of
  ``--chunk-tokens`` (default 220, its chunk at Qwen3's 151,936-token vocabulary: 2**25 logits), so that the
  loss holds what it holds at the real vocabulary apart from a constant (a chunk's logits);
- PEFT LoRA r = 16 (alpha 32) on the seven linears of every layer, base frozen; batch 1; float32;
- one step ``model(input_ids, labels=input_ids, use_cache=False).loss.backward()``, counted by
  revbits.measure.LiveBytes (every storage an operator creates, until freed); ``activations`` is the peak
  minus the weights and the gradients of the adapters.

Modes (the fused, chunked linear cross-entropy in all of them, as ``hf.convert`` does by default):

- ``gc+fused``: transformers' ``gradient_checkpointing_enable`` (non-reentrant);
- ``gc+offload+fused``: checkpointing with each layer's input in host memory (Unsloth's practice), emulated
  as in benchmarks/real_shapes.py: device bytes only;
- ``bdia+fused``: ``hf.convert(model, "bdia")`` with its defaults (slices of 512 positions);
- ``bdia, mlp slices only``: the same with ``layer_slices=False`` (only the MLPs in slices, as revbits did
  before whole-layer slices);
- ``bdia+mesa+fused``: ``hf.convert(model, "bdia+mesa")`` with its defaults; ``bdia+mesa, slices of 512``
  with ``token_slice=512``;
- ``bdia+mesa, no token slices``: the same with ``token_slice=None``.

For every mode and length it also prints where the bytes alive at the peak were created: the module (the
layer index dropped) and the operator, summed, the largest first (``--breakdown N`` lines per mode, at the
longest length). The slope between the two longest lengths, in KiB per token, is what decides the longest
context; a state (the residual stream of one token) is 4 KiB at d 1024 in float32.

    python benchmarks/layer_floor.py                              # T = 1024, 2048, 4096 (CPU: ~30 min)
    python benchmarks/layer_floor.py --lengths 1024 2048 4096 8192
    python benchmarks/layer_floor.py --tiny --lengths 64 128      # a smoke run
    python benchmarks/layer_floor.py --time-repeats 3 --modes gc+fused gc+offload+fused bdia+fused \
        "bdia, mlp slices only"                                   # and step times at T = 2048 (idle machine)
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import platform
import shlex
import statistics
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import Qwen3Config, Qwen3ForCausalLM

from real_shapes import LORA, QWEN3_0_6B
from revbits import hf
from revbits.measure import LiveBytes

KIB, MIB = 2**10, 2**20
TINY = dict(hidden_size=64, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=16)
#: mode -> (layers: "gc", "offload" or a revbits memory mode, hf.convert options)
MODES: dict[str, tuple[str, dict]] = {
    "gc+fused": ("gc", {}),
    "gc+offload+fused": ("offload", {}),
    "bdia+fused": ("bdia", {}),
    "bdia, mlp slices only": ("bdia", {"layer_slices": False}),
    "bdia+mesa+fused": ("bdia+mesa", {}),
    "bdia+mesa, slices of 512": ("bdia+mesa", {"token_slice": 512}),
    "bdia+mesa, no token slices": ("bdia+mesa", {"token_slice": None}),
}


class PeakContents(LiveBytes):
    """LiveBytes that also remembers, for every storage, where it was created (module and operator) and when
    it was freed, so that the storages alive at the peak can be listed."""

    def __init__(self, names: dict[int, str]) -> None:
        super().__init__()
        self.names, self.modules = names, ["-"]
        self.clock, self.peak_clock = 0, 0
        self.born: dict[int, tuple[int, int, str]] = {}  # serial -> (birth clock, bytes, label)
        self.died: dict[int, int] = {}  # serial -> death clock
        self.op = "?"

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.op = func.__name__.split(".")[0]
        return super().__torch_dispatch__(func, types, args, kwargs)

    def _add(self, storage: torch.UntypedStorage, category: str) -> None:
        known = id(storage) in self._entries
        super()._add(storage, category)
        if not known:
            self.clock += 1
            label = f"{self.modules[-1]} : {self.op}" if category == "activations" else category
            self.born[self._serial] = (self.clock, storage.nbytes(), label)

    def _drop(self, key: int) -> None:
        serial = self._entries[key][2]
        super()._drop(key)
        self.clock += 1
        self.died[serial] = self.clock

    def _update_peak(self) -> None:
        before = self.peak_total
        super()._update_peak()
        if self.peak_total > before:
            self.peak_clock = self.clock

    def at_peak(self) -> dict[str, int]:
        """Bytes alive at the peak by label."""
        sums: dict[str, int] = defaultdict(int)
        for serial, (born, size, label) in self.born.items():
            if born <= self.peak_clock and self.died.get(serial, self.clock + 1) > self.peak_clock:
                sums[label] += size
        return dict(sums)


@contextlib.contextmanager
def module_names(tracker: PeakContents, model: nn.Module) -> Iterator[None]:
    """Keep ``tracker.modules`` a stack of the names of the modules running (the layer index dropped)."""

    def short(name: str) -> str:
        parts = [p for p in name.split(".") if not p.isdigit() and p not in ("base_model", "model", "default")]
        return ".".join(parts) or "model"

    names = {id(m): short(n) for n, m in model.named_modules()}

    def enter(module, args):  # type: ignore[no-untyped-def]
        tracker.modules.append(names.get(id(module), type(module).__name__))

    def leave(module, args, output):  # type: ignore[no-untyped-def]
        if len(tracker.modules) > 1:
            tracker.modules.pop()

    handles = [nn.modules.module.register_module_forward_pre_hook(enter),
               nn.modules.module.register_module_forward_hook(leave, always_call=True)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def build(layers: int, vocab: int, tiny: bool) -> nn.Module:
    shape = TINY if tiny else {**QWEN3_0_6B, "tie_word_embeddings": True}
    config = Qwen3Config(**shape, num_hidden_layers=layers, vocab_size=vocab)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    model = Qwen3ForCausalLM(config)
    return get_peft_model(model, LoraConfig(**LORA)).train()


class HostOffloadedLayer(torch.autograd.Function):
    """y = layer(x) without a graph, x in host memory (a NumPy copy LiveBytes does not count); backward copies
    it back, recomputes the layer and back-propagates (benchmarks/real_shapes.py's emulation)."""

    @staticmethod
    def forward(ctx, run, anchor, x):  # type: ignore[override]
        ctx.run, ctx.host = run, (x.detach().cpu().contiguous().numpy().copy(), x.device)
        with torch.no_grad():
            return run(x)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        array, device = ctx.host
        x = torch.from_numpy(array).to(device, copy=True).requires_grad_()
        with torch.enable_grad():
            y = ctx.run(x)
        torch.autograd.backward(y, grad)
        return None, None, x.grad


def offloaded(*args, original, anchor, **kwargs):  # type: ignore[no-untyped-def]
    return HostOffloadedLayer.apply(lambda h: original(h, *args[1:], **kwargs), anchor, args[0])


@contextlib.contextmanager
def applied(model: nn.Module, mode: str, chunk_tokens: int) -> Iterator[None]:
    kind, options = MODES[mode]
    task = model.get_base_model()
    layers = task.model.layers
    if kind == "gc":
        task.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    elif kind == "offload":
        anchor = torch.zeros((), requires_grad=True)
        for layer in layers:
            layer.forward = functools.partial(offloaded, original=layer.forward, anchor=anchor)
    else:
        hf.convert(model, kind, **options)
    hf.disable_fused_loss(model)  # hf.convert attached it with its default chunks
    hf.enable_fused_loss(model, chunk_tokens=chunk_tokens)
    try:
        yield
    finally:
        hf.disable_fused_loss(model)
        if kind == "gc":
            task.gradient_checkpointing_disable()
        elif kind == "offload":
            for layer in layers:
                del layer.forward
        else:
            hf.restore(model)


def measure(model: nn.Module, ids: torch.Tensor) -> tuple[int, dict[str, int]]:
    params = list(model.parameters())
    model.zero_grad(set_to_none=True)
    tracker = PeakContents({})
    for p in params:
        tracker.register(p, "parameters")
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.register(p.grad, "gradients"))
             for p in params if p.requires_grad]
    try:
        with module_names(tracker, model), tracker:
            tracker.reset_peak()
            model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    finally:
        for h in hooks:
            h.remove()
    return tracker.peak["activations"], tracker.at_peak()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--chunk-tokens", type=int, default=2**25 // 151936,
                        help="tokens per chunk of the fused loss (default: its chunk at Qwen3's vocabulary, 220)")
    parser.add_argument("--breakdown", type=int, default=14, help="lines of the peak's contents per mode")
    parser.add_argument("--tiny", action="store_true", help="d 64 (a smoke run)")
    parser.add_argument("--time-repeats", type=int, default=0, help="timed rounds (0: none; an idle machine)")
    parser.add_argument("--time-length", type=int, default=2048)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "layer_floor")
    args = parser.parse_args()
    model = build(args.layers, args.vocab, args.tiny)
    d = model.config.hidden_size
    print(f"# python benchmarks/layer_floor.py {shlex.join(sys.argv[1:])}")
    print(f"# Qwen3 width d={d}, {args.layers} layers, vocab {args.vocab}, LoRA r 16, batch 1, float32, "
          f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads; state = {4 * d} B")
    rows = []
    for mode in args.modes:
        with applied(model, mode, args.chunk_tokens):
            for length in sorted(args.lengths):
                ids = torch.randint(0, args.vocab, (1, length), generator=torch.Generator().manual_seed(length))
                start = time.perf_counter()
                peak, contents = measure(model, ids)
                rows.append({"mode": mode, "length": length, "activations": peak, "contents": contents})
                print(f"{mode:28s} T={length:5d} activations {peak / MIB:9.1f} MiB  "
                      f"{peak / length / KIB:6.1f} KiB/token  ({time.perf_counter() - start:.0f} s)", flush=True)
    report(rows, args, 4 * d)
    times = step_times(model, args) if args.time_repeats else {}
    if times:
        base = times.get("gc+fused") or next(iter(times.values()))
        print(f"\n## Step time at T = {args.time_length}, median of {args.time_repeats} interleaved rounds\n")
        for mode, seconds in times.items():
            print(f"  {mode:28s} {seconds:8.3f} s  {seconds / base:5.2f}x gc+fused")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                         "rows": rows, "step_seconds": times}, indent=1))


def step_times(model: nn.Module, args) -> dict[str, float]:
    """Median seconds of one forward and backward per mode at ``--time-length``: every mode once per round, a
    warm-up step first in each, so drift in machine speed hits every mode alike (needs an idle machine)."""
    ids = torch.randint(0, args.vocab, (1, args.time_length), generator=torch.Generator().manual_seed(0))
    times: dict[str, list[float]] = {m: [] for m in args.modes}
    for _ in range(args.time_repeats):
        for mode in args.modes:
            with applied(model, mode, args.chunk_tokens):
                for timed in (False, True):
                    model.zero_grad(set_to_none=True)
                    start = time.perf_counter()
                    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
                    if timed:
                        times[mode].append(time.perf_counter() - start)
    return {m: statistics.median(t) for m, t in times.items()}


def report(rows: list[dict], args, state: int) -> None:
    lengths = sorted(args.lengths)
    if len(lengths) < 2:
        return  # a slope needs two lengths
    print(f"\n## Slope between T = {lengths[-2]} and {lengths[-1]}, KiB per token (states of {state // KIB} KiB)\n")
    print("| mode | " + " | ".join(f"T = {t}, MiB" for t in lengths) + " | KiB per token | states per token |")
    print("|---|" + "---|" * (len(lengths) + 2))
    for mode in args.modes:
        peak = {r["length"]: r["activations"] for r in rows if r["mode"] == mode}
        slope = (peak[lengths[-1]] - peak[lengths[-2]]) / (lengths[-1] - lengths[-2])
        cells = " | ".join(f"{peak[t] / MIB:.1f}" for t in lengths)
        print(f"| {mode} | {cells} | {slope / KIB:.1f} | {slope / state:.1f} |")
    for mode in args.modes:
        at = {r["length"]: r["contents"] for r in rows if r["mode"] == mode}
        big, small = at[lengths[-1]], at[lengths[-2]]
        print(f"\n### {mode}: alive at the peak, T = {lengths[-1]} (MiB; slope in states per token vs T = "
              f"{lengths[-2]})\n")
        ranked = sorted(((k, v) for k, v in big.items() if k != "parameters"), key=lambda kv: -kv[1])
        for label, size in ranked[: args.breakdown]:
            slope = (size - small.get(label, 0)) / (lengths[-1] - lengths[-2]) / state
            print(f"  {size / MIB:8.1f}  {slope:5.2f}  {label}")


if __name__ == "__main__":
    main()
