"""``python -m tests.slow_start ARGS``: the CLI, except that on torchrun's first attempt rank 1 dies while still
importing, after rank 0 has reached main() (a worker lost before it does)."""

import os
import signal
import time

import torch.distributed as dist

if os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and os.environ.get("RANK") == "1":
    # rank 0 has reached main() once it wrote to torchrun's store, or surely after 10 s
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False)
    deadline = time.monotonic() + 10
    while store.num_keys() == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    os.kill(os.getpid(), signal.SIGKILL)

from lit_gpt_char.cli import main  # noqa: E402

main()
