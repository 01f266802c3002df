"""Learning-quality sweep: several recipes through `lightning fit`, one table of best whole-split val loss.

    PYTHONPATH=. python benchmarks/sweep.py [--only NAME ...] [--tiny]

Every recipe is configs/nanogpt.yaml (nanoGPT's shakespeare_char: 6 layers, 6 heads, 384, block 256,
batch 64, bf16) plus the overrides listed below, within the baby-GPT budget (≤ 10.8M parameters,
block 256, ≤ 5000 steps of 64×256 tokens). Each runs as a fresh process; the table gives parameters,
steps, best val loss over the whole val split and its step, bits per character, and wall time.
configs/best.yaml is one of the rows, so the project's own recipe is measured by the project itself.
--tiny shrinks models and steps so the script can be checked on a CPU (its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import fit, val_curve  # noqa: E402

RECIPES: dict[str, tuple[str, list[str]]] = {
    "nanogpt (baseline)": ("configs/nanogpt.yaml", []),
    "lr 2e-3, cosine over 2500": (
        "configs/nanogpt.yaml",
        ["--model.learning_rate", "2e-3", "--model.min_lr", "2e-4", "--model.decay_steps", "2500",
         "--trainer.max_steps", "2500"],
    ),
    "best.yaml (dropout 0.3, wd 0.2, cosine 3000)": ("configs/best.yaml", []),
    "best.yaml + wsd schedule": (
        "configs/best.yaml",
        ["--model.lr_schedule", "wsd", "--model.cooldown_fraction", "0.3"],
    ),
    "best.yaml + dropout 0.35": ("configs/best.yaml", ["--model.config.dropout", "0.35"]),
    "best.yaml + rotary": ("configs/best.yaml", ["--model.config.positions", "rotary"]),
    "rotary + qk-norm + relu2, dropout 0.3, lr 2e-3": (
        "configs/best.yaml",
        ["--model.config.positions", "rotary", "--model.config.qk_norm", "true", "--model.config.activation",
         "relu2", "--model.learning_rate", "2e-3", "--model.min_lr", "2e-4"],
    ),
}  # fmt: skip

TINY = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "30",
    "--model.decay_steps", "30", "--model.warmup_steps", "3", "--trainer.val_check_interval", "10",
    "--model.config.n_layer", "1", "--model.config.n_embd", "32", "--model.config.n_head", "2",
    "--data.block_size", "32", "--data.batch_size", "8",
    "--sampling.final_max_new_tokens", "0", "--sampling.every_n_steps", "0",
]  # fmt: skip


def run(config: str, overrides: list[str], workdir: Path) -> dict[str, float]:
    _, start, end = fit(config, [*overrides, "--data.val_windows", "null"], workdir)
    vals = val_curve(workdir)
    step, best, _ = min(vals, key=lambda r: r[1])
    last_step = max(s for s, _, _ in vals)
    ckpt = torch.load(next((workdir / "checkpoints").glob("*/best.ckpt")), map_location="cpu", weights_only=True)
    params = sum(t.numel() for k, t in ckpt["state_dict"].items() if k.startswith("model."))
    if ckpt["hyper_parameters"]["config"]["tie_weights"]:
        params -= ckpt["state_dict"]["model.lm_head.weight"].numel()  # stored twice, one tensor
    return {"best": best, "step": step, "steps": last_step, "params": params, "wall": end - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="*", help="run only recipes whose name contains one of these")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at toy sizes")
    args = parser.parse_args()
    chosen = {n: r for n, r in RECIPES.items() if not args.only or any(o in n for o in args.only)}
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU"
    print(f"# {device}, torch {torch.__version__}, {time.strftime('%Y-%m-%d')}{' (--tiny)' if args.tiny else ''}\n")
    print("| recipe | parameters | steps | best val (whole split) | at step | bits/char | wall time |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, (config, overrides)) in enumerate(chosen.items()):
            r = run(config, [*overrides, *(TINY if args.tiny else [])], Path(tmp) / str(i))
            print(
                f"| {name} | {r['params'] / 1e6:.2f}M | {r['steps']} | {r['best']:.4f} | {r['step']} | "
                f"{r['best'] / math.log(2):.3f} | {r['wall']:.0f} s |",
                flush=True,
            )


if __name__ == "__main__":
    main()
