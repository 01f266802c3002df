"""configs/laptop.yaml and configs/laptop_quick.yaml on this CPU, whole process, several times; nanoGPT's CPU
recipe as the baseline.

    PYTHONPATH=. python benchmarks/laptop.py [--runs 3] [--nanogpt DIR] [--no-quick] [--sweep] [-- OVERRIDES]

Each run of `lightning fit --config configs/laptop.yaml` (then of `configs/laptop_quick.yaml`, alternating) is a
fresh process in a scratch folder (the packaged Tiny Shakespeare), timed from start to exit: checkpoints,
TensorBoard logs, the final 2000-character sample, a model summary, everything the config has on (the progress bar
is off: no terminal). From its TensorBoard events: the final val/loss (the whole validation split), and the seconds
from command start to the first evaluation with val/loss <= 1.88 (nanoGPT's laptop result). The targets (issue 23,
part 1), each on every run, against nanoGPT measured in the same session: laptop.yaml's final val <= 1.60 within
nanoGPT's wall time (x nanoGPT <= 1.0); a val <= 1.88 within 0.15x nanoGPT's wall time from the command's start
(laptop_quick.yaml, the short recipe for that; laptop.yaml's first evaluation is its last).

--nanogpt DIR runs karpathy/nanoGPT's documented CPU recipe ("I only have a macbook", README) from a checkout in
DIR, once, as the baseline measured in the same session: its data prepared as its prepare.py does (not timed),
then `train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20 --log_interval=1
--block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128 --max_iters=2000 --lr_decay_iters=2000
--dropout=0.0`, timed whole; its val is its own estimate (20 batches) at the last evaluation.

--sweep runs the recipes in SWEEP once each instead (the tables in benchmarks/RESULTS.md); extra `--key value`
overrides after `--` go to every run. The val of a recipe is deterministic on one machine, torch build and thread
count; the issue-23 rows were measured with OMP_NUM_THREADS=1 (the VM was shared), which moves the last digits:
laptop.yaml 1.5917 on 1 thread, 1.5952 on 2; laptop_quick.yaml 1.8667 on both.
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

LAPTOP, QUICK = "configs/laptop.yaml", "configs/laptop_quick.yaml"

# the sweep of 2026-11-24 (benchmarks/RESULTS.md), as overrides of the laptop.yaml of that day (NOV24, restored from
# today's): 1200 steps of 32 windows of 64, Muon 0.02, AdamW 3e-3, cosine, 4 evaluations, a sample every 600
# steps, gradients clipped at 1.0
W128 = ["--model.config.n_embd", "128", "--model.config.n_head", "4"]
W96 = ["--model.config.n_embd", "96", "--model.config.n_head", "3"]
ADAMW = ["--model.optimizer", "adamw"]  # the sweep's AdamW rows (laptop.yaml itself uses Muon)
NOV24 = [
    "--trainer.max_steps", "1200", "--trainer.val_check_interval", "300", "--model.muon_lr", "0.02",
    "--model.learning_rate", "3e-3", "--model.lr_schedule", "cosine", "--data.block_size", "64",
    "--data.batch_size", "32", "--sampling.every_n_steps", "600", "--trainer.gradient_clip_val", "1.0",
]  # fmt: skip


def _steps(n: int) -> list[str]:
    return ["--trainer.max_steps", str(n), "--trainer.val_check_interval", str(n)]


def _quick(steps: int, batch: int, *extra: str) -> list[str]:
    return [*_steps(steps), "--data.batch_size", str(batch), "--model.warmup_steps", "10", *extra]


def _nov24(name: str, overrides: list[str]) -> tuple[str, str, list[str]]:
    return name, LAPTOP, [*NOV24, *overrides]


# issue 23 (2026-11-30): each lever on the Nov-24 recipe with one evaluation at the end, then their combination (C23)
WSD = ["--model.lr_schedule", "wsd", "--model.cooldown_fraction"]
C23 = [*_steps(1200), *WSD, "0.5", "--model.muon_lr", "0.04", "--model.learning_rate", "6e-3"]
T128 = ["--data.block_size", "128", "--data.batch_size", "16"]
NOCLIP = ["--trainer.gradient_clip_val", "null"]
Q300 = [*_steps(300), "--model.muon_lr", "0.04", "--model.muon_momentum", "0.95"]
Q04 = ["--model.muon_lr", "0.04"]  # with the momentum of laptop_quick.yaml of 13:50, 0.8

# (name, config, overrides): the recipes `--sweep` runs, each once
SWEEP: list[tuple[str, str, list[str]]] = [
    _nov24("128 wide, 4 heads, batch 32, 600 steps", [*ADAMW, *W128, *_steps(600)]),
    _nov24("... block 128, batch 16", [*ADAMW, *W128, *_steps(600), *T128]),
    _nov24(
        "... block 256, batch 8", [*ADAMW, *W128, *_steps(600), "--data.block_size", "256", "--data.batch_size", "8"]
    ),
    _nov24("... lr 6e-3", [*ADAMW, *W128, *_steps(600), "--model.learning_rate", "6e-3"]),
    _nov24(
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
    _nov24("96 wide, 3 heads, batch 32, 600 steps", [*ADAMW, *W96, *_steps(600)]),
    _nov24("128 wide, batch 16, 900 steps", [*ADAMW, *W128, *_steps(900), "--data.batch_size", "16"]),
    _nov24("128 wide, batch 16, 1200 steps", [*ADAMW, *W128, *_steps(1200), "--data.batch_size", "16"]),
    _nov24("96 wide, batch 16, 1400 steps", [*ADAMW, *W96, *_steps(1400), "--data.batch_size", "16"]),
    _nov24("64 wide, 2 heads, batch 32, 1250 steps", [*ADAMW, *_steps(1250)]),
    _nov24("... lr 5e-3", [*ADAMW, *_steps(1250), "--model.learning_rate", "5e-3"]),
    _nov24("... 4 heads", [*ADAMW, *_steps(1250), "--model.config.n_head", "4"]),
    _nov24("... 1 head", [*ADAMW, *_steps(1250), "--model.config.n_head", "1"]),
    _nov24("... 6 layers, 850 steps", [*ADAMW, *_steps(850), "--model.config.n_layer", "6"]),
    _nov24("... batch 16, 2200 steps", [*ADAMW, *_steps(2200), "--data.batch_size", "16"]),
    _nov24("64 wide, Muon for the matrices, 1100 steps", _steps(1100)),
    _nov24("laptop.yaml of 2026-11-24 (64 wide, Muon, 1200 steps)", []),
    # issue 23, part 1
    _nov24("Nov-24 recipe, WSD cooling over the last 30%", [*_steps(1200), *WSD, "0.3"]),
    _nov24("... over the last 50%", [*_steps(1200), *WSD, "0.5"]),
    _nov24("Nov-24 recipe, Muon lr 0.04", [*_steps(1200), "--model.muon_lr", "0.04"]),
    _nov24("Nov-24 recipe, AdamW lr 6e-3", [*_steps(1200), "--model.learning_rate", "6e-3"]),
    _nov24("... WSD 50%, Muon 0.04, AdamW 6e-3 (C23)", C23),
    _nov24("... WSD 50%, Muon 0.06, AdamW 1e-2", [*C23, "--model.muon_lr", "0.06", "--model.learning_rate", "1e-2"]),
    _nov24("C23, no warmup", [*C23, "--model.warmup_steps", "0"]),
    _nov24("C23, batch 48", [*C23, "--data.batch_size", "48"]),
    _nov24("C23, batch 48, 870 steps", [*C23, "--data.batch_size", "48", *_steps(870)]),
    _nov24("C23, batch 40, 1030 steps", [*C23, "--data.batch_size", "40", *_steps(1030)]),
    _nov24("C23, batch 64, 700 steps", [*C23, "--data.batch_size", "64", *_steps(700)]),
    _nov24(
        "... Muon 0.06, AdamW 8e-3",
        [*C23, "--data.batch_size", "64", *_steps(700), "--model.muon_lr", "0.06", "--model.learning_rate", "8e-3"],
    ),  # fmt: skip
    _nov24("C23, 1400 steps", [*C23, *_steps(1400)]),
    _nov24("C23, windows of 128, batch 16", [*C23, *T128]),
    _nov24("C23, windows of 256, batch 8", [*C23, "--data.block_size", "256", "--data.batch_size", "8"]),
    _nov24("C23, windows of 128, batch 16, 1400 steps", [*C23, *T128, *_steps(1400)]),
    _nov24(
        "... Muon 0.05, AdamW 8e-3",
        [*C23, *T128, *_steps(1400), "--model.muon_lr", "0.05", "--model.learning_rate", "8e-3"],
    ),  # fmt: skip
    _nov24(
        "... Muon 0.03, AdamW 5e-3",
        [*C23, *T128, *_steps(1400), "--model.muon_lr", "0.03", "--model.learning_rate", "5e-3"],
    ),  # fmt: skip
    _nov24("... AdamW 4e-3", [*C23, *T128, *_steps(1400), "--model.learning_rate", "4e-3"]),
    _nov24("... cooling over the last 65%", [*C23, *T128, *_steps(1400), *WSD, "0.65"]),
    _nov24("C23, windows of 128, batch 16, 1450 steps", [*C23, *T128, *_steps(1450)]),
    _nov24("C23, windows of 128, batch 16, 1500 steps", [*C23, *T128, *_steps(1500)]),
    _nov24("... cooling over the last 40%", [*C23, *T128, *_steps(1500), *WSD, "0.4"]),
    _nov24("... no gradient clipping", [*C23, *T128, *_steps(1500), *NOCLIP]),
    ("laptop.yaml, 1300 steps", LAPTOP, _steps(1300)),
    ("laptop.yaml (C23, windows of 128, batch 16, no clipping, 1400 steps)", LAPTOP, []),
    # the short recipe: overrides of laptop_quick.yaml; the first round on the file of 11:35 (300 steps of 24
    # windows of 64, a 30-step warmup, Muon lr 0.04, momentum 0.95: Q300)
    ("quick: 150 steps of 32, 10 warmup", QUICK, [*Q300, *_quick(150, 32)]),
    (
        "... Muon 0.06, AdamW 1e-2",
        QUICK,
        [*Q300, *_quick(150, 32, "--model.muon_lr", "0.06", "--model.learning_rate", "1e-2")],
    ),
    ("quick: 200 steps of 32, 10 warmup", QUICK, [*Q300, *_quick(200, 32)]),
    (
        "... Muon 0.03, AdamW 4e-3",
        QUICK,
        [*Q300, *_quick(200, 32, "--model.muon_lr", "0.03", "--model.learning_rate", "4e-3")],
    ),
    ("... 3 layers", QUICK, [*Q300, *_quick(200, 32, "--model.config.n_layer", "3")]),
    ("quick: 100 steps of 64, 10 warmup", QUICK, [*Q300, *_quick(100, 64)]),
    ("quick: 400 steps of 16, 10 warmup", QUICK, [*Q300, *_quick(400, 16)]),
    ("quick: 300 steps of 24, 10 warmup", QUICK, [*Q300, *_quick(300, 24)]),
    (
        "... Muon 0.03, AdamW 5e-3",
        QUICK,
        [*Q300, *_quick(300, 24, "--model.muon_lr", "0.03", "--model.learning_rate", "5e-3")],
    ),
    ("laptop_quick.yaml of 11:35 (300 steps of 24, 30 warmup)", QUICK, Q300),
    (
        "... 270 steps, Muon 0.03, AdamW 5e-3",
        QUICK,
        [*Q300, *_steps(270), "--model.muon_lr", "0.03", "--model.learning_rate", "5e-3"],
    ),
    ("... 270 steps, 50 warmup", QUICK, [*Q300, *_steps(270), "--model.warmup_steps", "50"]),
    ("... 250 steps", QUICK, [*Q300, *_steps(250)]),
    ("... 250 steps, cooling over the last 40%", QUICK, [*Q300, *_steps(250), "--model.cooldown_fraction", "0.4"]),
    ("... 200 steps of 32", QUICK, [*Q300, *_steps(200), "--data.batch_size", "32"]),
    ("laptop_quick.yaml of 11:35, no gradient clipping", QUICK, [*Q300, *NOCLIP]),
    ("... 260 steps", QUICK, [*Q300, *NOCLIP, *_steps(260)]),
    # round 2 (laptop_quick.yaml of 13:50: 220 steps, Muon lr 0.015, momentum 0.8): Muon's momentum, then its lr
    *[
        (f"quick: 260 steps, Muon momentum {m}", QUICK, [*Q300, *_steps(260), "--model.muon_momentum", m])
        for m in ("0.95", "0.9", "0.85", "0.8")
    ],
    *[
        (f"quick: 250 steps, momentum 0.8, Muon lr {lr}", QUICK, [*_steps(250), "--model.muon_lr", lr])
        for lr in ("0.04", "0.035", "0.03", "0.025")
    ],
    *[
        (f"quick: 220 steps, momentum 0.8, Muon lr {lr}", QUICK, ["--model.muon_lr", lr])
        for lr in ("0.025", "0.02", "0.015", "0.01")
    ],
    *[
        (f"quick: 260 steps, momentum 0.95, {' '.join(extra)}", QUICK, [*Q300, *_steps(260), *extra])
        for extra in (
            ["--model.cooldown_fraction", "0.6"],
            ["--model.cooldown_fraction", "0.7"],
            ["--model.muon_lr", "0.05"],
            ["--model.learning_rate", "8e-3"],
            ["--model.warmup_steps", "20"],
            ["--model.betas", "[0.9, 0.95]"],
            ["--model.config.n_head", "4"],
            ["--model.weight_decay", "0.0"],
        )
    ],
    *[
        (f"quick: 250 steps, momentum 0.8, Muon lr 0.04, {' '.join(extra)}", QUICK, [*Q04, *_steps(250), *extra])
        for extra in (
            ["--model.cooldown_fraction", "0.4"],
            ["--model.muon_lr", "0.05"],
            ["--model.learning_rate", "8e-3"],
            ["--model.warmup_steps", "20"],
            ["--model.warmup_steps", "40"],
            ["--model.betas", "[0.8, 0.99]"],
        )
    ],
    ("quick: 210 steps, momentum 0.8, Muon lr 0.015", QUICK, _steps(210)),
    ("quick: 200 steps, momentum 0.8, Muon lr 0.015", QUICK, _steps(200)),
    ("laptop_quick.yaml (220 steps, Muon lr 0.015, momentum 0.8)", QUICK, []),
]


def laptop_run(config: str, overrides: list[str]) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lit_gpt_char_laptop_"))
    _, start, end = fit(config, overrides, work)
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
    parser.add_argument("--no-quick", action="store_true", help="run laptop.yaml only, not laptop_quick.yaml")
    parser.add_argument("--sweep", action="store_true", help="run the SWEEP recipes once each")
    args = parser.parse_args(argv)

    rows = []
    if args.nanogpt:
        r = nanogpt_run(args.nanogpt)
        rows.append(("nanoGPT CPU recipe (baseline)", r))
        print(f"nanoGPT: {r['wall']:.1f} s, val {r['val']:.4f} (its estimate) at step {r['steps']}", flush=True)
    configs = [("laptop.yaml", LAPTOP)] + ([] if args.no_quick else [("laptop_quick.yaml", QUICK)])
    runs = SWEEP if args.sweep else [(name, config, []) for _ in range(args.runs) for name, config in configs]
    for name, config, extra in runs:  # laptop.yaml and laptop_quick.yaml alternate
        r = laptop_run(config, extra + overrides)
        rows.append((name, r))
        first = f"{r['first_188']:.1f} s" if r["first_188"] is not None else "never"
        print(f"{name}: {r['wall']:.1f} s, val {r['val']:.4f} at step {r['steps']}, first val <= 1.88 at {first}; "
              f"curve {[(s, round(v, 4)) for s, v, _ in r['curve']]}", flush=True)  # fmt: skip

    base = rows[0][1]["wall"] if args.nanogpt else None
    print("\n| run | whole process s | × baseline | final val | first val ≤ 1.88 at | × baseline |")
    print("|---|---|---|---|---|---|")
    for name, r in rows:
        ratio = f"{r['wall'] / base:.2f}" if base else "-"
        first = "-" if "first_188" not in r else f"{r['first_188']:.1f} s" if r["first_188"] is not None else "never"
        first_ratio = f"{r['first_188'] / base:.3f}" if base and r.get("first_188") is not None else "-"
        print(f"| {name} | {r['wall']:.1f} | {ratio} | {r['val']:.4f} | {first} | {first_ratio} |")
    for name, _ in [] if args.sweep else configs:
        mine = [r for n, r in rows if n == name]
        if len(mine) < 2:
            continue
        walls, vals = [r["wall"] for r in mine], [r["val"] for r in mine]
        firsts = [r["first_188"] if r["first_188"] is not None else float("inf") for r in mine]
        print(
            f"\n{name} over {len(mine)} runs: whole process median {statistics.median(walls):.1f} s "
            f"(min {min(walls):.1f}, max {max(walls):.1f}); final val median {statistics.median(vals):.4f}; "
            f"first val <= 1.88 median {statistics.median(firsts):.1f} s"
        )
        if base and name == "laptop.yaml":  # target (a), on every run
            met = all(r["val"] <= 1.60 and r["wall"] <= base for r in mine)
            verdict = "met" if met else "NOT met"
            print(f"target: final val <= 1.60 within nanoGPT's {base:.1f} s on every run: {verdict} "
                  f"(worst {max(walls) / base:.2f}x, val {max(vals):.4f})")  # fmt: skip
        if base and name == "laptop_quick.yaml":  # target (b), on every run
            met = all(f <= 0.15 * base for f in firsts)
            print(f"target: val <= 1.88 within 0.15x nanoGPT ({0.15 * base:.1f} s) from the command's start on every "
                  f"run: {'met' if met else 'NOT met'} (worst {max(firsts) / base:.3f}x)")  # fmt: skip
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
