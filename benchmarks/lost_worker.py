"""A torchrun job that loses a worker, many times: does it finish, and with the weights of an unbroken run?

    PYTHONPATH=. python benchmarks/lost_worker.py [--trials 10] [--baseline-trials 10]

One job: `torchrun --standalone --nproc-per-node 2 --max-restarts 1 -m lit_gpt_char fit` (CPU, gloo, a tiny model,
40 steps, `--ckpt_path last`, a checkpoint every 10 steps). It runs once unbroken; then, per trial, rank 1 is
SIGKILLed at the start of step 25 (tests.probes.LoseWorker, first attempt only), torchrun restarts both workers,
and the job must end at step 40 with final weights bit-for-bit equal to the unbroken run's. The baseline is the
same job with Lightning's own DDPStrategy (`--trainer.strategy '{"class_path":
"lightning.pytorch.strategies.DDPStrategy"}'`), whose process group sits on torchrun's shared store without a
prefix per attempt. Each job has --limit seconds (default 60; an unbroken one takes ~15 s); one that runs past it
(a hang) is killed with everything it started and counts as failed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.conftest import TINY, make_text  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
JOB = [
    "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts", "1",
    "-m", "lit_gpt_char", "fit", *TINY, "--trainer.max_steps", "40", "--trainer.val_check_interval", "20",
    "--sampling.every_n_steps", "20", "--trainer.accelerator", "cpu", "--trainer.devices", "2",
    "--ckpt_path", "last", "--periodic_checkpoint.every_n_train_steps", "10",
]  # fmt: skip
LOSE = ["--trainer.callbacks+=tests.probes.LoseWorker", "--trainer.callbacks.at_step", "25"]
# Lightning's own class, as a class_path: a plain dotted name would be read as a (lower-cased) registry name
LIGHTNING_DDP = '{"class_path": "lightning.pytorch.strategies.DDPStrategy"}'
STRATEGIES = {"ElasticDDPStrategy (ddp)": "ddp", "Lightning's DDPStrategy": LIGHTNING_DDP}


def run_job(work: Path, corpus: Path, strategy: str, extra: list[str], limit: float) -> tuple[str, float]:
    """Run the job in ``work``: (outcome, seconds). Outcome: "ok", "exit N" or "hung"."""
    work.mkdir(parents=True)
    command = [sys.executable, *JOB, "--trainer.strategy", strategy, "--data.path", str(corpus), *extra]
    start = time.perf_counter()
    proc = subprocess.Popen(
        command, cwd=work, env={**os.environ, "PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        outcome = "ok" if proc.wait(timeout=limit) == 0 else f"exit {proc.returncode}"
    except subprocess.TimeoutExpired:
        outcome = "hung"
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and any worker left behind
        except ProcessLookupError:
            pass
        proc.wait()
    return outcome, time.perf_counter() - start


def final_weights(work: Path) -> dict[str, torch.Tensor] | None:
    path = work / "checkpoints" / "version_0" / "last.ckpt"
    if not path.is_file():
        return None
    checkpoint = torch.load(path, weights_only=False)
    return checkpoint["state_dict"] if checkpoint["global_step"] == 40 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=10, help="kills with this project's ddp (default 10)")
    parser.add_argument("--baseline-trials", type=int, default=10, help="kills with Lightning's DDPStrategy")
    parser.add_argument("--limit", type=float, default=60, help="seconds a job may take before it counts as hung")
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="lit_gpt_char_lost_worker_"))
    corpus = scratch / "corpus.txt"
    corpus.write_text(make_text(30_000), encoding="utf-8")

    outcome, seconds = run_job(scratch / "unbroken", corpus, "ddp", [], args.limit)
    expected = final_weights(scratch / "unbroken")
    if outcome != "ok" or expected is None:
        raise SystemExit(f"the unbroken job failed ({outcome}); see {scratch / 'unbroken'}")
    print(f"unbroken job: {seconds:.1f} s")

    rows = []
    for name, strategy in STRATEGIES.items():
        trials = args.trials if strategy == "ddp" else args.baseline_trials
        finished = exact = 0
        times = []
        for trial in range(trials):
            work = scratch / f"{'ddp' if strategy == 'ddp' else 'lightning'}-{trial}"
            outcome, seconds = run_job(work, corpus, strategy, LOSE, args.limit)
            final = final_weights(work) if outcome == "ok" else None
            same = final is not None and all(torch.equal(final[k], expected[k]) for k in expected)
            finished += outcome == "ok"
            exact += same
            times.append(seconds)
            print(f"  {name}, trial {trial + 1}: {outcome}, {'bit-for-bit equal' if same else 'not equal'}, "
                  f"{seconds:.1f} s", flush=True)  # fmt: skip
        if trials:
            rows.append((name, trials, finished, exact, sorted(times)[len(times) // 2]))

    print("\n| strategy | trials | finished | bit-for-bit equal to the unbroken run | median s |")
    print("|---|---|---|---|---|")
    for name, trials, finished, exact, median in rows:
        print(f"| {name} | {trials} | {finished} of {trials} | {exact} of {trials} | {median:.1f} |")
    print(f"\n{torch.__version__}, python {sys.version.split()[0]}, {os.cpu_count()} cores; scratch: {scratch}")


if __name__ == "__main__":
    main()
