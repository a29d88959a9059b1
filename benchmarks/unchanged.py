"""Fingerprints of a fixed set of ``revbits train``, ``eval`` and ``memory`` runs, to show that a
restructuring leaves results bit for bit as they were.

Every model kind trains a few steps on tiny format-true data (the test suite's) with a fixed seed;
the fingerprint of a run is the SHA-256 of its final weights, of its metrics without timings, and
of its ``revbits eval`` output. ``revbits memory`` is fingerprinted on its byte counts. Run it on two
commits and compare the JSON files:

    python benchmarks/unchanged.py --json before.json      # on the old commit
    python benchmarks/unchanged.py --json after.json       # on the new one
    python benchmarks/unchanged.py --compare before.json after.json

``--runs NAME ...`` restricts both to the named runs (``memory-gpt`` and so on for the memory runs), e.g. the
BDIA-related ones: ``--runs gpt-bdia gpt-bdia+mesa vit-bdia translator-bdia vit-petra hf-minilm memory-gpt``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

# The bits depend on the CPU kernels torch picks: an AVX-512 machine rounds differently from an AVX2 one. On x86,
# ATen, MKL and oneDNN are held to AVX2 kernels (before torch loads) so that fingerprints compare across machines;
# set these variables to choose otherwise.
if platform.machine().lower() in ("x86_64", "amd64"):
    AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    for variable, isa in AVX2.items():
        os.environ.setdefault(variable, isa)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

TINY = "--steps 4 --eval-interval 2 --eval-batches 2 --batch-size 4 --block-size 16 --n-layer 3 --n-head 2"
TINY += " --d-model 16 --warmup 1 --log-interval 1 --dropout 0.1 --seed 3"
RUNS = {
    **{f"gpt-{m}": f"--model gpt --memory {m}" for m in ("standard", "checkpoint", "mesa", "bdia", "bdia+mesa")},
    "vit-bdia": "--model vit --memory bdia --patch-size 7",
    "vit-mesa": "--model vit --memory mesa --patch-size 7",
    "revnet": "--model revnet --memory standard --patch-size 7",
    "translator-bdia": "--model translator --memory bdia --n-layer 4",
    # the main job's GPT (scripts/main.sh): the one run large enough for BDIA's automatic batch chunks
    "gpt-bdia-main": "--model gpt --memory bdia --n-layer 2 --d-model 128 --n-head 4 --block-size 64 --batch-size 32",
    "rnnlm-gru-reversible": "--model rnnlm --cell gru --memory reversible --n-layer 1",
    "rnnlm-lstm-standard": "--model rnnlm --cell lstm --memory standard --n-layer 1",
    "rnn-translator-reversible": "--model rnn-translator --memory reversible --n-layer 1 --attention-slice 4",
    "vit-petra": "--model vit --memory bdia --patch-size 7 --parallel petra --stages 2 --stage-split params"
    " --accumulation 2 --n-layer 4",
    "hf-minilm": "--hf all-MiniLM-L6-v2 --data shakespeare --n-layer 6 --block-size 24 --lr 1e-4 --batch-size 2"
    " --steps 2 --eval-batches 1",
}
MEMORY = {
    "gpt": "--model gpt",
    "vit": "--model vit --patch-size 7",
    "rnnlm": "--model rnnlm --n-layer 1",
    "translator": "--model translator --n-layer 4",
}
TIMINGS = ("_per_s", "peak_mib", "seconds", "time")


def cli(argv: list[str]) -> str:
    from revbits.cli import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(argv)
    if code != 0:
        raise SystemExit(f"revbits {' '.join(argv)} exited with {code}")
    return out.getvalue()


def digest(value: object) -> str:
    data = value if isinstance(value, bytes) else json.dumps(value, sort_keys=True).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def untimed(record: dict) -> dict:
    return {k: v for k, v in record.items() if not any(k.endswith(t) for t in TIMINGS)}


def fingerprint_run(run_dir: Path) -> dict[str, str]:
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    tensors = load_file(str(run_dir / "checkpoints" / latest / "model.safetensors"))
    weights = b"".join(k.encode() + tensors[k].contiguous().view(torch.uint8).numpy().tobytes()
                       for k in sorted(tensors))
    metrics = [untimed(json.loads(line)) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evaluated = json.loads(cli(["eval", str(run_dir), "--split", "valid"]))
    evaluated.pop("run")
    return {"weights": digest(weights), "metrics": digest(metrics), "eval": digest(untimed(evaluated))}


def measure(only: set[str] | None = None) -> dict[str, object]:
    """The fingerprints of every run, or of the runs named in ``only``."""
    from test_train import tiny_data  # the format-true data the training tests use

    result: dict[str, object] = {}
    runs = {name: flags for name, flags in RUNS.items() if only is None or name in only}
    memory = {name: flags for name, flags in MEMORY.items() if only is None or f"memory-{name}" in only}
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        os.environ["REVBITS_DATA"] = str(tiny_data.__wrapped__(root, _Env()))
        for name, flags in runs.items():
            out = root / "runs" / name
            flags = TINY + " " + flags  # later flags win
            cli(["train", *flags.split(), "--out", str(out)])
            result[name] = fingerprint_run(out)
            print(name, result[name], flush=True)
        for name, flags in memory.items():
            memory_json = root / f"memory-{name}.json"
            cli(["memory", *(TINY + " " + flags).split(), "--json", str(memory_json)])
            rows = json.loads(memory_json.read_text())
            result[f"memory-{name}"] = digest([untimed(row) for row in rows])
            print(f"memory-{name}", result[f"memory-{name}"], flush=True)
            for row in rows:  # what a changed fingerprint changed: the bytes
                print(f"  {row['memory']:12s} peak {row['peak']} activations {row['activations']} "
                      f"held after forward {row['held_after_forward']}", flush=True)
    return result


class _Env:
    """The one monkeypatch call the data fixture makes."""

    def setenv(self, name: str, value: str) -> None:
        os.environ[name] = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, help="write the fingerprints here")
    parser.add_argument("--compare", type=Path, nargs=2, metavar=("BEFORE", "AFTER"))
    parser.add_argument("--runs", nargs="+", metavar="NAME", help="only these runs (default: all)")
    args = parser.parse_args()
    known = {*RUNS, *(f"memory-{name}" for name in MEMORY)}
    if args.runs and (unknown := sorted(set(args.runs) - known)):
        parser.error(f"unknown runs {unknown}; known: {sorted(known)}")
    if args.compare:
        before, after = (json.loads(p.read_text()) for p in args.compare)
        changed = sorted(k for k in before if before[k] != after.get(k))
        for name in before:
            print(f"{name:28s} {'same' if name not in changed else 'CHANGED'}")
        print(f"{len(before) - len(changed)} of {len(before)} runs bit for bit the same")
        return 1 if changed else 0
    torch.set_num_threads(1)
    os.environ.setdefault("TQDM_DISABLE", "1")
    result = measure(set(args.runs) if args.runs else None)
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
