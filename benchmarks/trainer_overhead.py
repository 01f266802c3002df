"""What the Lightning Trainer costs per step over a plain PyTorch loop, measured side by side in one run.

    python benchmarks/trainer_overhead.py [--config configs/small.yaml] [--steps 800] [--repeats 7] [-- OVERRIDES]

Both paths are built by the project's CLI from the same config (and any `--key value` overrides after
`--`), so they train the same GPT from the same initial weights, on the same random-window stream
(on the device when `data.on_device`), with the same AdamW param groups, schedule, precision and
gradient clipping. The plain loop is the minimal loop a person would write around those objects:
next batch, (autocast) forward, zero_grad, backward, clip, step, schedule. The Trainer path is what
`lightning fit --config CONFIG` runs: LitGPT with its divergence check and train-loss aggregation,
TensorBoard logging every `log_every_n_steps`, the progress bar, the checkpoint, interrupt and
sampling callbacks, the atomic checkpoint plugin. Evaluation is off (`limit_val_batches 0`) so both
time the same work. Steps are timed after a warm-up (CUDA synchronised at both ends); the paths
alternate `--repeats` times; the best run of each is compared (a shared machine only ever adds
time), and the median ratio of back-to-back pairs is shown beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

from lit_gpt_char.cli import LitGPTCLI, build_cli

WARMUP = 50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Wall time of the steps after the warm-up, from the start of step WARMUP to the end of the last."""

    def __init__(self) -> None:
        self.start = self.end = 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == WARMUP:
            _sync(trainer.strategy.root_device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: Trainer, *args: object) -> None:
        _sync(trainer.strategy.root_device)
        self.end = time.perf_counter()


def build(config: str, steps: int, workdir: Path, overrides: list[str]) -> LitGPTCLI:
    """The objects `lightning fit --config CONFIG` would build, with evaluation and output kept out of the way."""
    args = [
        "--config", config, *overrides, "--trainer.max_steps", str(steps), "--trainer.limit_val_batches", "0",
        "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(workdir),
        "--trainer.logger.init_args.save_dir", str(workdir),
        "--sampling.final_max_new_tokens", "0",
    ]  # fmt: skip
    return build_cli(args, run=False)


def plain_loop(config: str, steps: int, workdir: Path, overrides: list[str]) -> float:
    cli = build(config, steps, workdir, overrides)
    trainer, lit, dm = cli.trainer, cli.model, cli.datamodule
    device = trainer.strategy.root_device
    model = lit.to(device).model
    lit.trainer = trainer  # configure_optimizers reads max_steps for the schedule, nothing else
    dm.trainer = trainer  # train_dataloader reads the device (on_device) and the rank
    configured = lit.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    precision = str(trainer.precision)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16 if precision.startswith("bf16") else torch.float16)
        if precision.endswith("-mixed")
        else contextlib.nullcontext()
    )
    clip = trainer.gradient_clip_val
    batches = iter(dm.train_dataloader())
    for step in range(steps):
        if step == WARMUP:
            _sync(device)
            start = time.perf_counter()
        x, y = (t.to(device, non_blocking=True) for t in next(batches))
        with autocast:
            _, loss = model(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    _sync(device)
    return (time.perf_counter() - start) / (steps - WARMUP)


def trainer_loop(config: str, steps: int, workdir: Path, overrides: list[str]) -> float:
    cli = build(config, steps, workdir, overrides)
    timer = StepTimer()
    cli.trainer.callbacks.insert(0, timer)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return (timer.end - timer.start) / (steps - WARMUP)


def measure(config: str, steps: int, repeats: int, overrides: list[str]) -> dict[str, object]:
    plain, lightning = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            plain.append(plain_loop(config, steps, Path(tmp) / f"p{i}", overrides))
            lightning.append(trainer_loop(config, steps, Path(tmp) / f"t{i}", overrides))
    return {
        "plain": plain,
        "trainer": lightning,
        "best_ratio": min(lightning) / min(plain),
        "pair_ratio": statistics.median(t / p for p, t in zip(plain, lightning)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("overrides", nargs="*", help="CLI overrides after --, e.g. -- --data.batch_size 32")
    args = parser.parse_args()
    result = measure(args.config, args.steps, args.repeats, args.overrides)
    plain, lightning = result["plain"], result["trainer"]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    print(f"# {device}, {torch.get_num_threads()} CPU threads, torch {torch.__version__}")
    print(f"# {args.config} {' '.join(args.overrides)}: {args.steps - WARMUP} timed steps per run,")
    print(f"# {args.repeats} runs of each, alternating. ms/step, plain: {', '.join(f'{v * 1e3:.2f}' for v in plain)}")
    print(f"#   Trainer: {', '.join(f'{v * 1e3:.2f}' for v in lightning)}")
    if torch.cuda.is_available():
        print(f"# peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB", end=", ")
    print(f"# peak host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    print("# best-of-runs (as timeit) is the headline: a shared machine only ever adds time\n")
    print("| loop | ms / step (best) | ratio (best / best) | ratio (median of back-to-back pairs) |")
    print("|---|---|---|---|")
    print(f"| plain PyTorch | {min(plain) * 1e3:.2f} | 1.000 | 1.000 |")
    ratios = f"{result['best_ratio']:.3f} | {result['pair_ratio']:.3f}"
    print(f"| Lightning Trainer (`lightning fit` settings) | {min(lightning) * 1e3:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
