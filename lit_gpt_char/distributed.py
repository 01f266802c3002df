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

Under srun (without torchrun) global rank 0 hosts such a store itself, at the address Lightning's SLURMEnvironment
gives the process group. Through it rank 0 (which claims ``checkpoints/RUN/``) hands the run's name to the other
ranks, or its error, so that a rank 0 that fails on the user's input never leaves the others waiting for it.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
from datetime import timedelta
from typing import Optional

import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.fabric.utilities.distributed import _destroy_dist_connection
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lit_gpt_char.errors import LitGPTCharError

# where rank 0 publishes the run's name, under this attempt's prefix of torchrun's store
_RUN_KEY = "lit_gpt_char/run_name"
_TOLD_KEY = "lit_gpt_char/told"  # how many ranks have read it
# how long a rank waits for rank 0 to name the run (rank 0 may tokenize a large corpus first)
_NAME_TIMEOUT = timedelta(minutes=30)
# how long a failing srun rank 0 keeps its store up for the other ranks to read why (they may still be importing)
_TOLD_TIMEOUT = 300


@functools.lru_cache(maxsize=None)
def agent_store() -> Optional[dist.Store]:
    """The store the processes of a job started by torchrun or srun share before their process group exists: under
    torchrun the agent's, seen under a prefix of this restart attempt's own; under srun one that global rank 0
    hosts at the job's address; None for a single process or Lightning's own processes."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=_NAME_TIMEOUT
        )
        # Which attempt is this? TORCHELASTIC_RESTART_COUNT is per node: an agent whose own workers were healthy
        # restarts them without counting (a peer node failed, or joined), so two nodes can disagree. Every worker
        # of every attempt instead takes one ticket here, exactly once (lru_cache): the first WORLD_SIZE tickets
        # are the first attempt's, the next WORLD_SIZE the second's, and so on, on every node alike. main() takes
        # it first thing, so a worker lost at start-up has almost always taken it. Assumes the world size does not
        # change between attempts (elastic jobs with fewer nodes after a failure are not handled).
        ticket = store.add("lit_gpt_char/tickets", 1)
        generation = (ticket - 1) // int(os.environ["WORLD_SIZE"])
        return dist.PrefixStore(f"lit_gpt_char/generation_{generation}", store)
    if _srun_tasks() > 1:
        # a requeued job runs again on the same address: the new rank 0 hosts a new store, no stale keys
        slurm = SLURMEnvironment()
        return dist.TCPStore(
            slurm.main_address, slurm.main_port, is_master=slurm.global_rank() == 0, timeout=_NAME_TIMEOUT
        )
    return None


def _srun_tasks() -> int:
    """How many tasks srun started for this job step (without torchrun); 0 if none."""
    if "TORCHELASTIC_RUN_ID" in os.environ or not SLURMEnvironment.detect():
        return 0
    return int(os.environ["SLURM_NTASKS"])


def slurm_run_name() -> Optional[str]:
    """The run of this SLURM job (``slurm_<job id>``), which an unnamed run is inside one; None elsewhere."""
    job = SLURMEnvironment.job_id() if SLURMEnvironment.detect() else None
    return f"slurm_{job}" if job is not None else None


def publish_run_name(name: str) -> None:
    """Global rank 0: tell the job's other ranks which run this is (a no-op outside torchrun and srun)."""
    store = agent_store()
    if store is not None:
        store.set(_RUN_KEY, "run " + name)


def publish_error(message: str) -> None:
    """Global rank 0, failing before it named the run: the other ranks fail with the same message instead of
    waiting for a process group rank 0 never joins. Under srun the store lives in this process: it waits (a
    bounded time) until every rank has read the message."""
    store = agent_store()
    if store is None or os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":
        return
    if store.check([_RUN_KEY]):  # the run was named: the other ranks are past this point
        return
    store.set(_RUN_KEY, "error " + message)
    if _srun_tasks():
        deadline = time.monotonic() + _TOLD_TIMEOUT
        while store.add(_TOLD_KEY, 0) < _srun_tasks() - 1 and time.monotonic() < deadline:
            time.sleep(0.1)


def published_run_name() -> Optional[str]:
    """The run global rank 0 chose (waits until it has) under torchrun or srun; None elsewhere. Rank 0's error, if it
    failed first, is raised here."""
    store = agent_store()
    if store is None:
        return None
    kind, _, value = store.get(_RUN_KEY).decode().partition(" ")
    store.add(_TOLD_KEY, 1)
    if kind == "error":
        raise LitGPTCharError(value)
    return value


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
