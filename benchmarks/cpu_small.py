"""configs/small.yaml end to end on a CPU, against the lecture's script, in one run.

    python benchmarks/cpu_small.py [--corpus FILE (default: the packaged Tiny Shakespeare)] [--skip-reference]

Each command runs as a fresh process in a scratch folder holding only the corpus (at the default
data path), timed from start to exit, with its peak resident memory (os.wait4):

- the lecture's script (benchmarks/lecture_reference.py): 5000 steps, its estimate_loss over 200
  train + 200 val batches every 100 steps, 2000 generated characters;
- `lightning fit --config configs/small.yaml`: the same 5000 steps, val loss over the fixed 3,200
  windows every 100 steps, checkpoints, TensorBoard logs, samples (progress bar off: no terminal);
- start-up: `lightning fit --config configs/small.yaml --trainer.max_steps 1 --sampling.final_max_new_tokens 0`,
  three times (the best is reported): imports, parsing, reading and encoding the corpus, one step.

Prints a table with the final val loss of each and the time ratio.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from lit_gpt_char.corpus import tiny_shakespeare_text

sys.path.insert(0, str(Path(__file__).resolve().parent))

from runs import ROOT, val_curve  # noqa: E402


def timed(command: list[str], cwd: Path) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MB, stdout) of one process run to completion."""
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    proc.stdout.close()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {proc.returncode}")
    return wall, usage.ru_maxrss / 1024, out


def scratch(corpus: Path | None) -> Path:
    work = Path(tempfile.mkdtemp(prefix="lit_gpt_char_bench_"))
    (work / "data" / "tinyshakespeare").mkdir(parents=True)
    dest = work / "data" / "tinyshakespeare" / "input.txt"
    if corpus is None:
        dest.write_text(tiny_shakespeare_text(), encoding="utf-8")
    else:
        shutil.copy(corpus, dest)
    return work


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--corpus", type=Path, default=None, help="default: the packaged Tiny Shakespeare")
    parser.add_argument("--skip-reference", action="store_true", help="do not run the lecture's script (~7 min)")
    args = parser.parse_args()
    lightning = [sys.executable, "-m", "lit_gpt_char", "fit", "--config", str(ROOT / "configs" / "small.yaml")]
    rows = []

    if not args.skip_reference:
        work = scratch(args.corpus)
        wall, rss, out = timed([sys.executable, str(ROOT / "benchmarks" / "lecture_reference.py")], work)
        val = float(re.findall(r"val loss ([\d.]+)", out)[-1])
        train_time = float(re.search(r"training time: ([\d.]+) s", out).group(1))
        rows.append(("the lecture's script (5000 steps)", wall, val, rss, f"{train_time:.0f} s of it training"))
        shutil.rmtree(work)

    work = scratch(args.corpus)
    wall, rss, _ = timed([*lightning, "--trainer.enable_progress_bar", "false"], work)
    vals = [v for _, v, _ in val_curve(work)]
    rows.append(("lightning fit --config configs/small.yaml", wall, vals[-1], rss, f"best val {min(vals):.4f}"))
    shutil.rmtree(work)

    starts = []
    for _ in range(3):
        work = scratch(args.corpus)
        one_step = ["--trainer.max_steps", "1", "--trainer.enable_progress_bar", "false"]
        starts.append(timed([*lightning, *one_step, "--sampling.final_max_new_tokens", "0"], work)[:2])
        shutil.rmtree(work)
    start_wall, start_rss = min(starts)
    rows.append(("start-up: the same with --trainer.max_steps 1", start_wall, float("nan"), start_rss, ""))

    versions = f"torch {torch.__version__}, python {platform.python_version()}"
    print(f"# {platform.machine()}, {os.cpu_count()} cores, {versions}")
    print("# whole processes, start to exit\n")
    print("| run | wall time (s) | vs the lecture's script | final val loss | peak RSS (MB) | note |")
    print("|---|---|---|---|---|---|")
    base = rows[0][1] if not args.skip_reference else None
    for name, wall, val, rss, note in rows:
        ratio = f"{wall / base:.3f}x" if base else "—"
        shown = "—" if val != val else f"{val:.4f}"
        print(f"| {name} | {wall:.1f} | {ratio} | {shown} | {rss:.0f} | {note} |")


if __name__ == "__main__":
    main()
