"""What the Lightning Trainer costs per step over a plain PyTorch loop, measured side by side in one run.

    python benchmarks/trainer_overhead.py [--config configs/small.yaml] [--steps 800] [--repeats 5]
                                          [--devices 1 2] [-- OVERRIDES]

Each run is a fresh process. The Trainer path is the real command, `python -m lit_gpt_char fit --config CONFIG`
(with `--trainer.strategy ddp --trainer.devices N --trainer.accelerator cpu` for N > 1: Lightning starts the other
processes), plus a callback that times the steps. It runs everything the command runs: LitGPT with its divergence
check and train-loss aggregation, TensorBoard logging every `log_every_n_steps`, the progress bar (to a pipe), the
checkpoint, interrupt, sampling and throughput callbacks, the atomic checkpoint plugin. Evaluation is off
(`limit_val_batches 0`) so both paths time the same work.

The plain loop is the minimal loop a person would write around the same objects, built by the project's CLI from
the same config (and any `--key value` overrides after `--`): the same GPT from the same initial weights, the same
random-window stream, AdamW param groups, schedule, precision and gradient clipping. Next batch, (autocast)
forward, zero_grad, backward, clip, step, schedule; for N > 1 its processes are started by torchrun and the model is
wrapped in DistributedDataParallel (gloo on a CPU), as Lightning's DDP does.

Between the two, Lightning's bare Trainer: the Trainer the command builds (the same devices, strategy, precision,
clipping and accumulation) with every callback but the timer removed, no logger, and a `training_step` that only
returns the loss (no running train loss, no `self.log`, no run policy). It is what Lightning's loop costs by itself:
the target for the command cannot be lower than this row, and what the command adds is its row against this one.

Steps are timed after a warm-up (CUDA synchronised at both ends); the paths run in turn, plain loop, command, bare
Trainer, `--repeats` times; the best run of each is compared (a shared machine only ever adds time), and beside it
the median ratio of the pairs of one round (the plain loop and the command run back to back).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from lightning.pytorch import Callback, Trainer

ROOT = Path(__file__).resolve().parent.parent
WARMUP = 50


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer(Callback):
    """Writes to ``out`` (rank 0) the wall time per step of the steps after the warm-up, from the start of step
    WARMUP to the end of the last batch (what fit does after it, the last checkpoint and the end of the logs, is
    outside the loop the plain path times)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.start = 0.0

    def on_train_batch_start(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == WARMUP and not self.start:
            _sync(trainer.strategy.root_device)
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, *args: object) -> None:
        if trainer.global_step == trainer.max_steps:
            _sync(trainer.strategy.root_device)
            seconds = (time.perf_counter() - self.start) / (trainer.global_step - WARMUP)
            if trainer.is_global_zero:
                Path(self.out).write_text(json.dumps(seconds))


def _options(config: str, steps: int, devices: int, overrides: list[str]) -> list[str]:
    """The command line both paths build their objects from."""
    ddp = ["--trainer.strategy", "ddp", "--trainer.devices", str(devices), "--trainer.accelerator", "cpu"]
    return [
        "--config", config, *overrides, *(ddp if devices > 1 else []), "--trainer.max_steps", str(steps),
        "--trainer.limit_val_batches", "0", "--trainer.enable_model_summary", "false",
        "--sampling.final_max_new_tokens", "0",
    ]  # fmt: skip


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


OUT = "seconds_per_step.json"  # each run's result, in its own working directory (so also that of its DDP processes)


def _run(command: list[str], work: Path) -> float:
    work.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    result = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads((work / OUT).read_text())


def trainer_run(config: str, steps: int, devices: int, overrides: list[str], work: Path) -> float:
    """Seconds per step of `python -m lit_gpt_char fit`, in a fresh process (and its DDP processes)."""
    timer = ["--trainer.callbacks+=trainer_overhead.StepTimer", "--trainer.callbacks.out", OUT]
    command = [sys.executable, "-m", "lit_gpt_char", "fit", *_options(config, steps, devices, overrides), *timer]
    return _run(command, work)


def plain_run(config: str, steps: int, devices: int, overrides: list[str], work: Path) -> float:
    """Seconds per step of the plain loop, in a fresh process (under torchrun for devices > 1)."""
    worker = [__file__, "--worker", OUT, "--config", config, "--steps", str(steps), "--", *overrides]
    if devices > 1:
        launcher = ["-m", "torch.distributed.run", "--nproc-per-node", str(devices), "--master-port", str(_free_port())]
        worker = [*launcher, *worker, "--trainer.strategy", "ddp", "--trainer.devices", str(devices)]
        worker += ["--trainer.accelerator", "cpu"]
    return _run([sys.executable, *worker], work)


def bare_run(config: str, steps: int, devices: int, overrides: list[str], work: Path) -> float:
    """Seconds per step of Lightning's bare Trainer, in a fresh process (Lightning starts the others for N > 1)."""
    worker = [__file__, "--bare", OUT, "--devices", str(devices), "--config", config, "--steps", str(steps)]
    return _run([sys.executable, *worker, "--", *overrides], work)


def bare_loop(options: list[str], out: str) -> None:
    """The command's Trainer, module and data with everything the command adds to Lightning's loop taken out, so
    that what is left is the loop's own cost (Lightning starts the other processes for N > 1, running this again)."""
    from lit_gpt_char.cli import build_cli

    cli = build_cli([*options, "--trainer.logger", "false"], run=False)
    trainer, lit = cli.trainer, cli.model
    trainer.callbacks = [StepTimer(out)]  # not the bar, the checkpoint, sampling, interrupt and monitor callbacks
    lit.configure_callbacks = list  # nor the run policy
    lit.training_step = lambda batch, batch_idx: lit._forward(*batch)[1]  # nor the running train loss, its logs
    trainer.fit(lit, cli.datamodule)


def plain_loop(options: list[str], steps: int, out: str) -> None:
    """The plain loop, in this process: one rank of a torchrun job when it runs under one."""
    from lit_gpt_char.cli import build_cli

    cli = build_cli(options, run=False)
    trainer, lit, dm = cli.trainer, cli.model, cli.datamodule
    device = trainer.strategy.root_device
    model = lit.to(device).model
    lit.trainer = trainer  # configure_optimizers reads max_steps for the schedule, nothing else
    dm.trainer = trainer  # train_dataloader reads the device (on_device) and the rank
    configured = lit.configure_optimizers()
    optimizer = configured["optimizer"] if isinstance(configured, dict) else configured
    scheduler = configured["lr_scheduler"]["scheduler"] if isinstance(configured, dict) else None
    forward = model
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun's processes: one thread each, as Lightning's DDP sets
        torch.distributed.init_process_group("gloo")
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // torch.distributed.get_world_size()))
        forward = torch.nn.parallel.DistributedDataParallel(model)
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
            _, loss = forward(x, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    _sync(device)
    seconds = (time.perf_counter() - start) / (steps - WARMUP)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(out).write_text(json.dumps(seconds))
    if torch.distributed.is_initialized():
        # out now, without tearing down: freeing the DDP reducer destroys the gloo group while the main thread holds
        # the GIL, and a gloo worker thread finishing the last all-reduce waits for the GIL: a deadlock (seen here)
        torch.distributed.barrier()
        os._exit(0)


def measure(config: str, steps: int, repeats: int, overrides: list[str], devices: int = 1) -> dict[str, object]:
    """The three paths in turn, ``repeats`` times each."""
    config = str(Path(config).resolve())
    runs = {"plain": [], "bare": [], "trainer": []}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(repeats):
            for path, run in (("plain", plain_run), ("trainer", trainer_run), ("bare", bare_run)):
                runs[path].append(run(config, steps, devices, overrides, Path(tmp) / f"{path}{i}"))
    plain = runs["plain"]
    for path in ("bare", "trainer"):
        runs[f"{path}_best_ratio"] = min(runs[path]) / min(plain)
        runs[f"{path}_pair_ratio"] = statistics.median(t / p for p, t in zip(plain, runs[path]))
    return runs


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/small.yaml")
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--devices", type=int, nargs="+", default=[1], help="one table each: 1, or N DDP processes")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # the plain loop's own process: write its result here
    parser.add_argument("--bare", help=argparse.SUPPRESS)  # the bare Trainer's process: write its result here
    args = parser.parse_args(argv)
    if args.steps <= WARMUP:
        parser.error(f"--steps must be more than the {WARMUP} warm-up steps")
    if args.worker:
        return plain_loop(_options(args.config, args.steps, 1, []) + overrides, args.steps, args.worker)
    if args.bare:
        return bare_loop(_options(args.config, args.steps, args.devices[0], []) + overrides, args.bare)

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"{platform.machine()} CPU"
    print(f"# {device}, {os.cpu_count()} CPU cores, torch {torch.__version__}; {args.config} {' '.join(overrides)}")
    print(f"# {args.steps - WARMUP} timed steps per run, {args.repeats} runs of each path, in turn, each a fresh")
    print("# process; best-of-runs (as timeit) is the headline: a shared machine only ever adds time")
    for devices in args.devices:
        result = measure(args.config, args.steps, args.repeats, overrides, devices)
        plain = result["plain"]
        what = "1 process" if devices == 1 else f"{devices} processes, DDP (gloo on a CPU)"
        print(f"\n## {what}. ms/step, plain: {', '.join(f'{v * 1e3:.2f}' for v in plain)}")
        print(f"##   bare Trainer: {', '.join(f'{v * 1e3:.2f}' for v in result['bare'])}")
        print(f"##   Trainer: {', '.join(f'{v * 1e3:.2f}' for v in result['trainer'])}\n")
        print("| loop | ms / step (best) | ratio (best / best) | ratio (median of the rounds' pairs) |")
        print("|---|---|---|---|")
        plain_name = "plain PyTorch" if devices == 1 else "plain PyTorch + DistributedDataParallel (torchrun)"
        print(f"| {plain_name} | {min(plain) * 1e3:.2f} | 1.000 | 1.000 |")
        for path, name in (("bare", "Lightning's bare Trainer"), ("trainer", "`lit-gpt-char fit` (Lightning Trainer)")):
            ratios = f"{result[path + '_best_ratio']:.3f} | {result[path + '_pair_ratio']:.3f}"
            print(f"| {name} | {min(result[path]) * 1e3:.2f} | {ratios} |")


if __name__ == "__main__":
    main()
