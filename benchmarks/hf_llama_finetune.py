"""Fine-tuning a pretrained Llama-style decoder with revbits.hf: how many bits per element BDIA
needs to fine-tune as well as standard training.

No pretrained decoder ships on this machine, so the benchmark makes one:

1. pretrain: a small random LlamaForCausalLM (RMSNorm, rotary, SwiGLU, grouped-query attention;
   a 4,096-entry WordPiece vocabulary learnt from the extract's training split with the
   ``tokenizers`` library) trained with standard backprop on the Wikipedia extract
   (``revbits train --hf DIR --data wiki-extract --memory standard``), then exported as a plain
   transformers directory (``revbits export``);
2. fine-tune it on Shakespeare under each arm, 3 seeds, equal steps: standard, per-layer
   checkpointing, and BDIA with gamma 1/2, 1/4, 1/8 and 1/16 (1, 2, 3 and 4 bits per element per
   layer). Validation loss (fixed windows) at the end and its best along the run.
3. memory: one AdamW step per arm at the fine-tuning shape, LiveBytes: bytes held between forward
   and backward, and the peak; step time: the median of steps alternating between arms in one
   process (run on an otherwise idle machine).

    python benchmarks/hf_llama_finetune.py                       # everything
    python benchmarks/hf_llama_finetune.py --steps 4 --pretrain-steps 4 --seeds 0 --out runs/smoke  # smoke run
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from report import CONFIGS, experiment_config, mean_std, write_results
from revbits.cli import main as revbits_main
from revbits.measure import measure_training_step
from revbits.train import TrainConfig
from revbits.train.commands import make_task_model
from revbits.train.datasets import texts
from revbits.train.loop import make_optimizer, train
from revbits.train.tasks import make_task

MIB = 2**20
ARMS = {
    "standard": {"memory": "standard"},
    "checkpoint": {"memory": "checkpoint"},
    "bdia gamma 1/2 (1 bit)": {"memory": "bdia", "gamma": 0.5},
    "bdia gamma 1/4 (2 bits)": {"memory": "bdia", "gamma": 0.25},
    "bdia gamma 1/8 (3 bits)": {"memory": "bdia", "gamma": 0.125},
    "bdia gamma 1/16 (4 bits)": {"memory": "bdia", "gamma": 0.0625},
}
MODEL = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)
#: Fine-tuning options (benchmarks/configs/hf-llama-finetune.toml); main() sets the pretrained directory.
FINETUNE = experiment_config("hf-llama-finetune")
#: Pretraining options (benchmarks/configs/hf-llama-pretrain.toml); pretrain() sets the model, steps and out.
PRETRAIN = CONFIGS / "hf-llama-pretrain.toml"


def learn_tokenizer(size: int = 4096) -> PreTrainedTokenizerFast:
    """A lower-cased WordPiece vocabulary of ``size`` entries learnt from wiki-extract's training split."""
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    trainer = trainers.WordPieceTrainer(vocab_size=size, special_tokens=["[PAD]", "[UNK]", "[BOS]", "[EOS]"])
    tokenizer.train_from_iterator(texts("wiki-extract")["train"].splitlines(), trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]", bos_token="[BOS]", eos_token="[EOS]"
    )


def pretrain(runs: Path, steps: int) -> Path:
    """A plain transformers directory of the Llama-style decoder after ``steps`` standard steps on wiki-extract."""
    exported = runs / "pretrained"
    if exported.exists():
        return exported
    start = runs / "init"
    shutil.rmtree(start, ignore_errors=True)
    tokenizer = learn_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **MODEL)
    LlamaForCausalLM(config).save_pretrained(start)
    tokenizer.save_pretrained(start)
    run = runs / "pretrain-run"
    shutil.rmtree(run, ignore_errors=True)
    if revbits_main(pretrain_argv(start, run, steps)) != 0 or revbits_main(["export", str(run), str(exported)]) != 0:
        raise SystemExit("pretraining failed")
    return exported


def pretrain_argv(start: Path, run: Path, steps: int) -> list[str]:
    """``revbits train`` of PRETRAIN from the random model in ``start`` for ``steps`` steps into ``run``."""
    every = str(max(steps // 4, 1))
    return ["train", "--config", str(PRETRAIN), "--hf", str(start), "--steps", str(steps), "--eval-interval", every,
            "--out", str(run)]


def quality_row(config: TrainConfig, arm: str, runs: Path) -> dict:
    run_dir = runs / f"{arm.split(' (')[0].replace(' ', '-').replace('/', '_')}-seed{config.seed}"
    shutil.rmtree(run_dir, ignore_errors=True)
    final = train(replace(config, out=str(run_dir), **ARMS[arm]), quiet=True)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    curve = {r["step"]: r["loss"] for r in records if r["split"] == "valid"}
    row = {"arm": arm, "seed": config.seed, "valid_loss": final["loss"], "best_valid_loss": min(curve.values())}
    print(json.dumps(row), flush=True)
    return row | {"valid_curve": curve}


def memory_and_speed(config: TrainConfig, speed_steps: int) -> dict:
    task = make_task(config)
    batch = task.train_batch(torch.Generator().manual_seed(0), torch.device("cpu"))
    memory, models, optimizers = {}, {}, {}
    for arm, options in ARMS.items():
        arm_config = replace(config, **options)
        torch.manual_seed(0)
        model = make_task_model(task, arm_config).train()
        memory[arm] = measure_training_step(
            model, lambda model=model: task.loss(model, batch), make_optimizer(model, arm_config)
        ).as_dict()
        models[arm], optimizers[arm] = model, make_optimizer(model, arm_config)
    times: dict[str, list[float]] = {arm: [] for arm in ARMS}
    sampler = torch.Generator().manual_seed(1)
    for i in range(speed_steps + 2):
        step_batch = task.train_batch(sampler, torch.device("cpu"))
        for arm in ARMS:
            start = time.perf_counter()
            optimizers[arm].zero_grad(set_to_none=True)
            task.loss(models[arm], step_batch).backward()
            optimizers[arm].step()
            if i >= 2:
                times[arm].append(time.perf_counter() - start)
    return {"memory": memory, "median_step_s": {arm: statistics.median(t) for arm, t in times.items()}}


def table(result: dict) -> list[str]:
    rows, measured = result["rows"], result.get("measured")
    seeds = sorted({r["seed"] for r in rows})
    standard = {r["seed"]: r["valid_loss"] for r in rows if r["arm"] == "standard"}
    lines = [
        f"Fine-tuning on Shakespeare after {result['pretrain_steps']} standard pretraining steps on wiki-extract; "
        f"{result['steps']} steps, batch {FINETUNE.batch_size} x {FINETUNE.block_size} tokens, seeds {seeds}. "
        f"Machine idle: {result['idle']}.",
        "",
        "| arm | final valid loss | best valid loss | − standard (final, paired) | held after forward (MiB) | "
        "peak (MiB) | step time / standard |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        group = [r for r in rows if r["arm"] == arm]
        if not group:
            continue
        paired = [r["valid_loss"] - standard[r["seed"]] for r in group if r["seed"] in standard]
        delta = f"{statistics.mean(paired):+.3f} ± {statistics.stdev(paired):.3f}" if len(paired) > 1 else ""
        mem = time_ratio = held = ""
        if measured:
            m = measured["memory"][arm]
            held, mem = f"{m['held_after_forward'] / MIB:.1f}", f"{m['peak'] / MIB:.1f}"
            t = measured["median_step_s"]
            time_ratio = f"{t[arm] / t['standard']:.2f}"
        lines.append(
            f"| {arm} | {mean_std([r['valid_loss'] for r in group], 3)} | "
            f"{mean_std([r['best_valid_loss'] for r in group], 3)} | {delta if arm != 'standard' else ''} | "
            f"{held} | {mem} | {time_ratio} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=FINETUNE.steps)
    parser.add_argument("--pretrain-steps", type=int, default=600)
    parser.add_argument("--speed-steps", type=int, default=8)
    parser.add_argument("--idle", default="unknown", help="say whether the machine was idle (recorded)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "hf_llama_finetune")
    parser.add_argument("--runs", type=Path, default=Path("runs") / "hf_llama_finetune")
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.runs.mkdir(parents=True, exist_ok=True)
    pretrained = pretrain(args.runs, args.pretrain_steps)
    config = replace(FINETUNE, hf=str(pretrained), steps=args.steps)
    rows = [quality_row(replace(config, seed=seed), arm, args.runs) for seed in args.seeds for arm in ARMS]
    measured = memory_and_speed(config, args.speed_steps)
    result = {
        "pretrain_steps": args.pretrain_steps,
        "steps": args.steps,
        "model": MODEL,
        "threads": torch.get_num_threads(),
        "idle": args.idle,
        "rows": rows,
        "measured": measured,
    }
    write_results(args.out, result, table(result))


if __name__ == "__main__":
    main()
