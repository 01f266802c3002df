"""Corpora of 1 MB, ~100 MB and ~1 GB through the real CLI: tokenizing once, then runs on the cache.

    python benchmarks/corpus_scale.py [--sizes 1 100 900] [--tree DIR] [--steps 300] [--rounds 3] [--workdir DIR]

The corpora are Tiny Shakespeare (the packaged copy) repeated 1×, 100× and 900× (1.1 MB, 112 MB,
1.0 GB), written under --workdir (default: a temporary folder under /tmp, deleted at the end); --tree
adds a real folder of files (a directory corpus). Every figure comes from a fresh process of
`lightning fit --config configs/small.yaml --data.path CORPUS`:

- first run (empty cache, --trainer.max_steps 5): tokenizing speed (MB of corpus per second, from the
  line the run prints) and the process's peak RSS (os.wait4);
- later runs (cache built; --trainer.max_steps --steps, evaluating every 100 steps as the config says,
  no final sample): start-up (command start → first training step, wall clock), peak RSS, and
  training steps/s (host wall clock between step ends from step 20 on, intervals that held an
  evaluation left out). Rounds alternate the corpora; medians shown.

Every ratio is against the 1 MB corpus measured in the same invocation.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[1]
CLOCK = "STEP_CLOCK "
WARMUP = 20


class StepClock(Callback):
    """Prints one line `STEP_CLOCK {...}` at the end of fit: when the first step started (time.time()) and
    training steps per second: host wall clock between consecutive step ends after the first WARMUP steps,
    leaving out the intervals that held an evaluation (and the checkpoints written after it)."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None
        self.evaluated = False
        self.intervals: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        if self.first is None:
            self.first = time.time()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.evaluated = True

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        now = time.perf_counter()
        if self.last is not None and not self.evaluated and trainer.global_step > WARMUP:
            self.intervals.append(now - self.last)
        self.last, self.evaluated = now, False

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        rate = len(self.intervals) / sum(self.intervals) if self.intervals else float("nan")
        print(CLOCK + json.dumps({"first_step": self.first, "steps_per_s": rate}), flush=True)


def run(args: list[str], cwd: Path) -> dict:
    """One `lightning fit` process: wall start, peak RSS (MB, os.wait4), stdout, and what StepClock printed."""
    command = [
        sys.executable, "-m", "lit_gpt_char", "fit", "--config", str(ROOT / "configs" / "small.yaml"), *args,
        "--trainer.enable_progress_bar", "false", "--trainer.enable_model_summary", "false",
        "--trainer.callbacks+=corpus_scale.StepClock",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "benchmarks")])}
    with tempfile.TemporaryFile("w+") as err:
        start = time.time()
        proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()  # type: ignore[union-attr]
        _, status, usage = os.wait4(proc.pid, 0)
        proc.stdout.close()  # type: ignore[union-attr]
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
    clock = json.loads(next(line for line in out.splitlines() if line.startswith(CLOCK))[len(CLOCK) :])
    return {"start": start, "out": out, "rss_mb": usage.ru_maxrss / 1024, **clock}


def make_corpora(workdir: Path, sizes: list[int]) -> dict[str, Path]:
    from lit_gpt_char.corpus import tiny_shakespeare_text

    text = tiny_shakespeare_text().encode("utf-8")
    corpora = {}
    for times in sizes:
        path = workdir / f"shakespeare_x{times}.txt"
        with open(path, "wb") as out:
            for _ in range(times):
                out.write(text)
        corpora[f"Tiny Shakespeare ×{times}"] = path
    return corpora


TOKENIZED = re.compile(r": (?:[\d,]+ files?, )?([\d,.]+) MB in ([\d.]+) s \(([\d,]+) MB/s\)")


def _num(text: str) -> float:
    return float(text.replace(",", ""))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 900], help="repeats of Tiny Shakespeare")
    parser.add_argument("--tree", type=Path, help="also a real folder of text files (a directory corpus)")
    parser.add_argument("--steps", type=int, default=300, help="training steps of each later run")
    parser.add_argument("--rounds", type=int, default=3, help="later runs per corpus (alternating corpora)")
    parser.add_argument("--workdir", type=Path, help="where the corpora and caches go (default: a temporary folder)")
    args = parser.parse_args()
    if args.sizes[0] != 1:
        raise SystemExit("--sizes must start with 1: the ratios are against the 1 MB corpus")

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="corpus_scale_"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        corpora = make_corpora(workdir, args.sizes)
        if args.tree is not None:
            corpora[f"folder {args.tree.name}"] = args.tree
        later_args = ["--trainer.max_steps", str(args.steps), "--sampling.final_max_new_tokens", "0"]
        first: dict[str, dict] = {}
        later: dict[str, list[dict]] = {name: [] for name in corpora}
        data: dict[str, list[str]] = {}
        for i, (name, path) in enumerate(corpora.items()):
            cache = workdir / f"cache{i}"  # one per corpus, empty before its first run
            shutil.rmtree(cache, ignore_errors=True)
            data[name] = ["--data.path", str(path), "--data.cache_dir", str(cache)]
            result = run([*data[name], "--trainer.max_steps", "5", "--sampling.final_max_new_tokens", "0"], workdir)
            line = next(line for line in result["out"].splitlines() if line.startswith("tokenized"))
            mb, seconds, rate = TOKENIZED.search(line).groups()  # type: ignore[union-attr]
            first[name] = {"mb": _num(mb), "seconds": _num(seconds), "rate": _num(rate), "rss": result["rss_mb"]}
            print(f"first run, {name}: peak RSS {result['rss_mb']:.0f} MB; {line}", file=sys.stderr)
        for round_ in range(args.rounds):
            for name in corpora:
                result = run([*data[name], *later_args], workdir)
                assert "tokenized" not in result["out"], "a later run tokenized again"
                startup = result["first_step"] - result["start"]
                later[name].append({"startup": startup, "rss": result["rss_mb"], "rate": result["steps_per_s"]})
                print(f"round {round_ + 1}, {name}: {later[name][-1]}", file=sys.stderr)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)

    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in later[name])

    base = next(iter(corpora))
    b_start, b_rss, b_rate = median(base, "startup"), median(base, "rss"), median(base, "rate")
    cpu = platform.processor() or platform.machine()
    import torch

    print(f"# {time.strftime('%Y-%m-%d')}, {cpu}, {os.cpu_count()} cores, torch {torch.__version__}")
    print(f"# later runs: {args.steps} steps of configs/small.yaml, median of {args.rounds}; ratios vs {base}\n")
    print("| corpus | size | first run: tokenizing | first run: peak RSS | later: start-up (vs 1 MB) "
          "| later: peak RSS (vs 1 MB) | later: steps/s (vs 1 MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|")
    for name in corpora:
        f = first[name]
        start, rss, rate = median(name, "startup"), median(name, "rss"), median(name, "rate")
        print(
            f"| {name} | {f['mb']:,.1f} MB | {f['rate']:,.0f} MB/s ({f['seconds']:.2f} s) | {f['rss']:,.0f} MB "
            f"| {start:.2f} s ({start - b_start:+.2f} s) | {rss:,.0f} MB ({rss - b_rss:+,.0f} MB) "
            f"| {rate:.1f} ({rate / b_rate:.3f}×) |"
        )


if __name__ == "__main__":
    main()
