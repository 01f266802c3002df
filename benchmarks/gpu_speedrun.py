"""The GPU speedrun and the Trainer-vs-loop step time on a GPU, in one command (one device call).

    PYTHONPATH=. python benchmarks/gpu_speedrun.py [--target 1.47] [--skip-run-on] [--skip-compile] [--tiny]

1. `lightning fit --config configs/speedrun.yaml` as a fresh process: seconds from the command's start
   to the first validation whose val loss (whole val split) is under --target (the run stops there:
   EarlyStopping's stopping_threshold), and to exit; peak GPU memory and host RSS.
2. The same race with `--model.compile true` (inductor compiles from a cold cache, as on a fresh machine).
3. The same run allowed to go on to max_steps (no early stop): its best val loss and when.
4. benchmarks/trainer_overhead.py on configs/nanogpt.yaml (nanoGPT's shakespeare_char model and
   recipe): steady ms/step of the Trainer (and of Lightning's bare Trainer) against a plain loop over the same
   module, data and optimizer.

--tiny shrinks everything so the script can be checked on a CPU in a minute (its numbers mean nothing).
Runs on the Tiny Shakespeare that ships with the package (no download).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import ROOT, fit, val_curve  # noqa: E402
from trainer_overhead import measure  # noqa: E402

TINY = [
    "--trainer.accelerator", "cpu", "--trainer.precision", "32-true", "--trainer.max_steps", "40",
    "--trainer.val_check_interval", "20", "--model.config.n_layer", "1", "--model.config.n_embd", "32",
    "--model.config.n_head", "2", "--data.block_size", "32", "--data.batch_size", "8", "--model.decay_steps", "40",
    "--model.warmup_steps", "4",  # the config's 100 would outlast the decay: refused
]  # fmt: skip


def timed_fit(config: str, extra: list[str], workdir: Path) -> dict[str, object]:
    """Run `lightning fit` in ``workdir``; timings from its start, val curve, peak memory."""
    result, start, end = fit(config, [*extra, "--trainer.callbacks+=benchmarks.peak_memory.PeakMemory"], workdir)
    out = result.stdout.decode()
    peak = next(json.loads(line.split(" ", 1)[1]) for line in out.splitlines() if line.startswith("PEAK"))
    return {"vals": val_curve(workdir, start), "total": end - start, **peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/speedrun.yaml")
    parser.add_argument("--target", type=float, default=1.47)
    parser.add_argument("--skip-run-on", action="store_true", help="skip the full run without early stop")
    parser.add_argument("--skip-compile", action="store_true", help="skip the run with --model.compile true")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test at toy sizes")
    args = parser.parse_args()
    extra = TINY if args.tiny else []
    target = 10.0 if args.tiny else args.target
    early = ["--trainer.callbacks.stopping_threshold", str(target)]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        race = timed_fit(args.config, [*extra, *early], Path(tmp) / "race")
        hit = next(((s, v, t) for s, v, t in race["vals"] if v < target), None)
        best = min(v for _, v, _ in race["vals"])
        reached = f"{hit[2]:.1f} s (step {hit[0]}, val {hit[1]:.4f})" if hit else f"not reached (best {best:.4f})"
        lines.append(f"| speedrun: start → first val < {target} | {reached} |")
        lines.append(f"| speedrun: start → exit | {race['total']:.1f} s |")
        gpu = f"{race['gpu_mib']:.0f} MiB" if race["gpu_mib"] is not None else "—"
        lines.append(f"| speedrun: peak GPU memory / host RSS | {gpu} / {race['rss_mib']:.0f} MiB |")
        if not args.skip_compile:  # does torch.compile pay for itself in a run this short, from a cold cache?
            compiled = timed_fit(args.config, [*extra, *early, "--model.compile", "true"], Path(tmp) / "compiled")
            hit = next(((s, v, t) for s, v, t in compiled["vals"] if v < target), None)
            reached = f"{hit[2]:.1f} s (step {hit[0]})" if hit else "not reached"
            lines.append(f"| speedrun with --model.compile true: start → first val < {target} | {reached} |")
        if not args.skip_run_on:
            on = timed_fit(args.config, [*extra, "--trainer.callbacks", "[]"], Path(tmp) / "on")
            step, val, t = min(on["vals"], key=lambda r: r[1])
            lines.append(f"| run on to max_steps: best val | {val:.4f} at step {step} ({t:.1f} s) |")
    loop = measure(str(ROOT / "configs" / "nanogpt.yaml"), 60 if args.tiny else 600, 1 if args.tiny else 3, extra)
    lines.append(f"| nanoGPT model: plain loop, ms/step (best) | {min(loop['plain']) * 1e3:.2f} |")
    for path, name in (("bare", "Lightning's bare Trainer"), ("trainer", "Trainer")):
        lines.append(f"| nanoGPT model: {name}, ms/step (best) | {min(loop[path]) * 1e3:.2f} |")
        ratios = f"{loop[path + '_best_ratio']:.3f}; {loop[path + '_pair_ratio']:.3f}"
        lines.append(f"| {name} / plain (best; median of pairs) | {ratios} |")
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU (tiny smoke test)"
    print(f"# {device}, torch {torch.__version__}; {args.config}{' --tiny' if args.tiny else ''}\n")
    print("| measure | value |")
    print("|---|---|")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
