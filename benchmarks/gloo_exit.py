"""How often a 2-process gloo job aborts at exit when its process group is left to the interpreter's finalization.

    python benchmarks/gloo_exit.py [--trials 60]

Each trial starts two processes on 127.0.0.1: rank 0 hosts a TCPStore, both form a gloo group on it (as
lit_gpt_char's DDP strategy does under torchrun and srun), run 50 all_reduces and exit; rank 0 waits 50 ms
first, as a rank 0 that writes checkpoints does. "left" exits with the group still up; "destroyed" calls
``destroy_process_group()`` first, as every process of this project now does at exit. A gloo worker thread can
release the last collective's tensors after Python stopped handing out the GIL: "terminate called without an
active exception", SIGABRT, and a finished torchrun job reported as failed. The trials alternate; the table
counts the processes that did not exit 0.
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys

WORKER = """
import sys, time
from datetime import timedelta
import torch
import torch.distributed as dist
rank, port, destroy = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "destroyed"
store = dist.TCPStore("127.0.0.1", port, is_master=rank == 0, timeout=timedelta(seconds=60))
dist.init_process_group("gloo", store=dist.PrefixStore("process_group", store), rank=rank, world_size=2)
x = torch.ones(1000)
for _ in range(50):
    dist.all_reduce(x)
if rank == 0:
    time.sleep(0.05)
if destroy:
    dist.destroy_process_group()
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def trial(mode: str) -> list[int]:
    """The exit status of each of the two processes."""
    port = str(free_port())
    procs = [
        subprocess.Popen([sys.executable, "-c", WORKER, str(rank), port, mode], stderr=subprocess.DEVNULL)
        for rank in (0, 1)
    ]
    return [proc.wait(timeout=120) for proc in procs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=60)
    args = parser.parse_args()
    failed = {"left": 0, "destroyed": 0}
    for _ in range(args.trials):
        for mode in failed:
            failed[mode] += sum(status != 0 for status in trial(mode))
    print(f"# {args.trials} trials of each, alternating; 2 processes a trial")
    print("| process group at exit | processes that did not exit 0 |")
    print("|---|---|")
    for mode, count in failed.items():
        print(f"| {mode} | {count} of {2 * args.trials} |")


if __name__ == "__main__":
    main()
