"""Multi-process jobs started by an outside launcher (torchrun, srun): the process group and the run's name.

torchrun (TorchElastic) restarts the whole worker group when one worker dies (``--max-restarts``). Its workers
build their process group on the rendezvous store that torchrun's agent hosts (``TORCHELASTIC_USE_AGENT_STORE``),
and that store outlives the worker group. PyTorch's ``env://`` rendezvous assumes a fresh store for every attempt
(torch/distributed/rendezvous.py: "We create a new TCPStore for every retry so no need to add prefix"), so the
restarted workers can read the addresses the dead group published and fail in gloo's ``connectFullMesh``
("Connection refused") or hang: measured here, a plain torch.distributed script under ``torchrun --max-restarts 1``
with one worker killed survived 2 of 8 trials. :class:`ElasticDDPStrategy` puts the process group under a key
prefix of its own for each restart attempt: 8 of 8 in the same trials. Through this project's CLI
(benchmarks/lost_worker.py): 10 of 10 jobs finished bit-for-bit equal to an unbroken run, against 4 of 8 with
Lightning's own DDPStrategy. It is what ``--trainer.strategy ddp`` means in this project.

The same store hands the run's name from global rank 0 (which claims ``checkpoints/RUN/``) to the other ranks. Under
srun without torchrun there is no store before the process group exists; a new unnamed run is then called
``slurm_<job id>`` on every rank.
"""

from __future__ import annotations

import atexit
import functools
import os
from datetime import timedelta
from typing import Optional

import torch.distributed as dist
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

# where rank 0 publishes the run's name, under this attempt's prefix of torchrun's store
_RUN_KEY = "lit_gpt_char/run_name"
# how long a rank waits for rank 0 to name the run (rank 0 may tokenize a large corpus first)
_NAME_TIMEOUT = timedelta(minutes=30)


@functools.lru_cache(maxsize=None)
def agent_store() -> Optional[dist.Store]:
    """torchrun's rendezvous store, seen under a prefix of this restart attempt's own; None if not under torchrun."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=_NAME_TIMEOUT
    )
    # Which attempt is this? TORCHELASTIC_RESTART_COUNT is per node: an agent whose own workers were healthy
    # restarts them without counting (a peer node failed, or joined), so two nodes can disagree. Every worker
    # of every attempt instead takes one ticket here, exactly once (lru_cache): the first WORLD_SIZE tickets
    # are the first attempt's, the next WORLD_SIZE the second's, and so on, on every node alike. main() takes it
    # first thing, so a worker lost at start-up has almost always taken it. Assumes the world size does not change
    # between attempts (elastic jobs with fewer nodes after a failure are not handled).
    ticket = store.add("lit_gpt_char/tickets", 1)
    generation = (ticket - 1) // int(os.environ["WORLD_SIZE"])
    return dist.PrefixStore(f"lit_gpt_char/generation_{generation}", store)


def publish_run_name(name: str) -> None:
    """Global rank 0: tell the job's other ranks which run this is (under torchrun; a no-op otherwise)."""
    store = agent_store()
    if store is not None:
        store.set(_RUN_KEY, name)


def published_run_name() -> Optional[str]:
    """Under torchrun, the run global rank 0 chose (waits until it has); None elsewhere."""
    store = agent_store()
    return store.get(_RUN_KEY).decode() if store is not None else None


def slurm_run_name() -> Optional[str]:
    """The name every rank of a several-task srun job gives a new unnamed run: ``slurm_<job id>``; None elsewhere
    (outside SLURM, a one-task job, or torchrun inside SLURM, whose ranks learn the name from rank 0)."""
    job = os.environ.get("SLURM_JOB_ID")
    several = int(os.environ.get("SLURM_NTASKS", "1") or "1") > 1
    return f"slurm_{job}" if job and several and "TORCHELASTIC_RUN_ID" not in os.environ else None


class ElasticDDPStrategy(DDPStrategy):
    """Lightning's DDP, with a process group that survives torchrun restarting the worker group.

    Under torchrun with the agent's shared store, every restart attempt forms its process group under its own
    key prefix of that store, so no rank reads an address the previous, dead group left there. Elsewhere
    (Lightning's own processes, srun, a single process) it is Lightning's ``DDPStrategy`` unchanged.
    """

    def setup_distributed(self) -> None:
        store = agent_store()
        if store is not None and not dist.is_initialized():
            self.set_world_ranks()
            kwargs = {"timeout": self._timeout}
            if self.root_device.type != "cpu":
                kwargs["device_id"] = self.root_device
            dist.init_process_group(
                self._get_process_group_backend(),
                store=dist.PrefixStore("process_group", store),
                rank=self.global_rank,
                world_size=self.world_size,
                **kwargs,
            )
            if self._get_process_group_backend() == "nccl":  # as Lightning does for the groups it creates
                atexit.register(_destroy_dist_connection)
        super().setup_distributed()  # Lightning's own set-up; it finds the group initialised and keeps it


# `--trainer.strategy ddp` (and "auto" with several devices or nodes) means this strategy
StrategyRegistry.register(
    "ddp", ElasticDDPStrategy, description="DDP that survives torchrun restarts", start_method="popen", override=True
)
