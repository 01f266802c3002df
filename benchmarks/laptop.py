"""configs/laptop.yaml on this CPU, whole process, several times; nanoGPT's CPU recipe as the baseline.

    PYTHONPATH=. python benchmarks/laptop.py [--runs 3] [--nanogpt DIR] [--sweep] [-- OVERRIDES]

Each run of `lightning fit --config configs/laptop.yaml` is a fresh process in a scratch folder (the packaged Tiny
Shakespeare), timed from start to exit: checkpoints, TensorBoard logs, the final 2000-character sample, a model
summary, everything the config has on (the progress bar is off: no terminal). From its TensorBoard events: the
final val/loss (the whole validation split), and the seconds from command start to the first evaluation with
val/loss ≤ 1.88 (nanoGPT's laptop result). The targets are the median over the runs: whole process ≤ 90 s, final
val ≤ 1.65, first val ≤ 1.88 within 30 s.

--nanogpt DIR runs karpathy/nanoGPT's documented CPU recipe ("I only have a macbook", README) from a checkout in
DIR, once, as the baseline measured in the same session: its data prepared as its prepare.py does (not timed),
then `train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0`, timed whole; its val is its own estimate (20 batches) at the last evaluation.

--sweep runs the recipes in SWEEP once each instead (the table in the closing note of the laptop issue); extra
`--key value` overrides after `--` go to every laptop.yaml run.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import fit, val_curve  # noqa: E402

from lit_gpt_char.corpus import tiny_shakespeare_text  # noqa: E402

NANOGPT_ARGS = [
    "config/train_shakespeare_char.py", "--device=cpu", "--compile=False", "--eval_iters=20", "--log_interval=1",
    "--block_size=64", "--batch_size=12", "--n_layer=4", "--n_head=4", "--n_embd=128", "--max_iters=2000",
    "--lr_decay_iters=2000", "--dropout=0.0",
]  # fmt: skip

# (name, overrides of configs/laptop.yaml): the recipes the sweep of 2026-11-24 compared (README, Results)
W128 = ["--model.config.n_embd", "128", "--model.config.n_head", "4"]
W96 = ["--model.config.n_embd", "96", "--model.config.n_head", "3"]
ADAMW = ["--model.optimizer", "adamw"]  # the sweep's AdamW rows (laptop.yaml itself uses Muon)


def _steps(n: int) -> list[str]:
    return ["--trainer.max_steps", str(n), "--trainer.val_check_interval", str(n)]


SWEEP: list[tuple[str, list[str]]] = [
    ("128 wide, 4 heads, batch 32, 600 steps", [*ADAMW, *W128, *_steps(600)]),
    ("... block 128, batch 16", [*ADAMW, *W128, *_steps(600), "--data.block_size", "128", "--data.batch_size", "16"]),
    ("... block 256, batch 8", [*ADAMW, *W128, *_steps(600), "--data.block_size", "256", "--data.batch_size", "8"]),
    ("... lr 6e-3", [*ADAMW, *W128, *_steps(600), "--model.learning_rate", "6e-3"]),
    (
        "... learned positions, ReLU, no QK-norm",
        [
            *ADAMW,
            *W128,
            *_steps(600),
            "--model.config.positions",
            "learned",
            "--model.config.activation",
            "relu",
            "--model.config.qk_norm",
            "false",
        ],
    ),  # fmt: skip
    ("96 wide, 3 heads, batch 32, 600 steps", [*ADAMW, *W96, *_steps(600)]),
    ("128 wide, batch 16, 900 steps", [*ADAMW, *W128, *_steps(900), "--data.batch_size", "16"]),
    ("128 wide, batch 16, 1200 steps", [*ADAMW, *W128, *_steps(1200), "--data.batch_size", "16"]),
    ("96 wide, batch 16, 1400 steps", [*ADAMW, *W96, *_steps(1400), "--data.batch_size", "16"]),
    ("64 wide, 2 heads, batch 32, 1250 steps", [*ADAMW, *_steps(1250)]),
    ("... lr 5e-3", [*ADAMW, *_steps(1250), "--model.learning_rate", "5e-3"]),
    ("... 4 heads", [*ADAMW, *_steps(1250), "--model.config.n_head", "4"]),
    ("... 1 head", [*ADAMW, *_steps(1250), "--model.config.n_head", "1"]),
    ("... 6 layers, 850 steps", [*ADAMW, *_steps(850), "--model.config.n_layer", "6"]),
    ("... batch 16, 2200 steps", [*ADAMW, *_steps(2200), "--data.batch_size", "16"]),
    ("64 wide, Muon for the matrices, 1100 steps", _steps(1100)),
    ("laptop.yaml (64 wide, Muon, 1200 steps)", []),
]


def laptop_run(overrides: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lit_gpt_char_laptop_"))
    _, start, end = fit("configs/laptop.yaml", overrides, work)
    curve = val_curve(work, start)
    first = next((seconds for _, loss, seconds in curve if loss <= 1.88), None)
    return {"wall": end - start, "val": curve[-1][1], "steps": curve[-1][0], "first_188": first, "curve": curve}


def nanogpt_run(checkout: Path) -> dict:
    """nanoGPT's CPU recipe in a scratch copy of its checkout: (wall seconds, its last val estimate, its step)."""
    work = Path(tempfile.mkdtemp(prefix="lit_gpt_char_nanogpt_"))
    subprocess.run(["cp", "-r", f"{checkout}/.", str(work)], check=True)
    data = work / "data" / "shakespeare_char"
    text = tiny_shakespeare_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    n = len(text)
    ids = np.array([stoi[c] for c in text], dtype=np.uint16)  # as its prepare.py: uint16, first 90% trains
    ids[: int(n * 0.9)].tofile(data / "train.bin")
    ids[int(n * 0.9) :].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "train.py", *NANOGPT_ARGS], cwd=work, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"nanoGPT's train.py failed ({result.returncode}):\n{result.stderr[-3000:]}")
    evals = re.findall(r"step (\d+): train loss [\d.]+, val loss ([\d.]+)", result.stdout)
    return {"wall": wall, "val": float(evals[-1][1]), "steps": int(evals[-1][0])}


def main() -> None:
    argv = sys.argv[1:]
    overrides = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout: run its CPU recipe first")
    parser.add_argument("--sweep", action="store_true", help="run the SWEEP recipes once each")
    args = parser.parse_args(argv)

    rows = []
    if args.nanogpt:
        r = nanogpt_run(args.nanogpt)
        rows.append(("nanoGPT CPU recipe (baseline)", r))
        print(f"nanoGPT: {r['wall']:.1f} s, val {r['val']:.4f} (its estimate) at step {r['steps']}", flush=True)
    runs = [(name, extra) for name, extra in SWEEP] if args.sweep else [("laptop.yaml", [])] * args.runs
    laptop = []
    for name, extra in runs:
        r = laptop_run(extra + overrides)
        rows.append((name, r))
        laptop += [r] if not extra and not args.sweep else []
        first = f"{r['first_188']:.1f} s" if r["first_188"] is not None else "never"
        print(f"{name}: {r['wall']:.1f} s, val {r['val']:.4f} at step {r['steps']}, first val <= 1.88 at {first}; "
              f"curve {[(s, round(v, 4)) for s, v, _ in r['curve']]}", flush=True)  # fmt: skip

    base = rows[0][1]["wall"] if args.nanogpt else None
    print("\n| run | whole process s | × baseline | final val | first val ≤ 1.88 at |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        ratio = f"{r['wall'] / base:.2f}" if base else "-"
        first = "-" if "first_188" not in r else f"{r['first_188']:.1f} s" if r["first_188"] is not None else "never"
        print(f"| {name} | {r['wall']:.1f} | {ratio} | {r['val']:.4f} | {first} |")
    if len(laptop) > 1:
        walls, vals = [r["wall"] for r in laptop], [r["val"] for r in laptop]
        firsts = [r["first_188"] if r["first_188"] is not None else float("inf") for r in laptop]
        print(
            f"\nlaptop.yaml over {len(laptop)} runs: whole process median {statistics.median(walls):.1f} s "
            f"(min {min(walls):.1f}, max {max(walls):.1f}); final val median {statistics.median(vals):.4f}; "
            f"first val <= 1.88 median {statistics.median(firsts):.1f} s"
        )
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
