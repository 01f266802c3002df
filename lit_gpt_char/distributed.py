"""Multi-process jobs started by an outside launcher (torchrun, srun): the process group and the run's name.

torchrun (TorchElastic) restarts the whole worker group when one worker dies (``--max-restarts``). Its workers
build their process group on the rendezvous store that torchrun's agent hosts (``TORCHELASTIC_USE_AGENT_STORE``),
and that store outlives the worker group. PyTorch's ``env://`` rendezvous assumes a fresh store for every attempt
(torch/distributed/rendezvous.py: "We create a new TCPStore for every retry so no need to add prefix"), so the
restarted workers can read the addresses the dead group published and fail in gloo's ``connectFullMesh``
("Connection refused") or hang (benchmarks/lost_worker.py measures it; figures in benchmarks/RESULTS.md).
:class:`ElasticDDPStrategy` forms the process group on a store of each restart attempt's own, which global rank 0
hosts. It is what ``--trainer.strategy ddp`` means in this project.

Under srun (without torchrun) global rank 0 hosts such a store itself, at the address Lightning's SLURMEnvironment
gives the process group. Through it rank 0 (which claims ``checkpoints/RUN/``) hands the run's name to the other
ranks, or its error, so that a rank 0 that fails on the user's input never leaves the others waiting for it.
"""

from __future__ import annotations

import atexit
import functools
import os
import time
import uuid
from datetime import timedelta
from typing import Optional

import torch.distributed as dist
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry

from lit_gpt_char.errors import LitGPTCharError
from lit_gpt_char.internals import destroy_dist_connection

# where rank 0 publishes the run's name (or its error) in the store it hosts
_RUN_KEY = "lit_gpt_char/run_name"
_TOLD_KEY = "lit_gpt_char/told"  # how many ranks have read it
_HELLO, _WELCOME = "lit_gpt_char/hello", "lit_gpt_char/welcome"  # in torchrun's store: finding rank 0's
# how long a rank waits for rank 0 to name the run (rank 0 may tokenize a large corpus first)
_NAME_TIMEOUT = timedelta(minutes=30)
# how long a failing rank 0 keeps its store up for the other ranks to read why (they may still be importing)
_TOLD_TIMEOUT = 300


@functools.lru_cache(maxsize=None)
def job_store() -> Optional[dist.Store]:
    """The store the processes of a job started by torchrun or srun share before their process group exists, hosted
    by global rank 0, so it is new for every attempt and holds no key of an earlier one; None for a single process
    or Lightning's own processes."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        return _attempt_store()
    srun = "TORCHELASTIC_RUN_ID" not in os.environ and SLURMEnvironment.detect()  # srun without torchrun
    if srun and int(os.environ["SLURM_NTASKS"]) > 1:  # a requeued job runs again on the same address, new rank 0
        slurm = SLURMEnvironment()
        return dist.TCPStore(
            slurm.main_address, slurm.main_port, is_master=slurm.global_rank() == 0, timeout=_NAME_TIMEOUT
        )
    return None


def _attempt_store() -> dist.Store:
    """Under torchrun: a store that this restart attempt's global rank 0 hosts, found through the agent's.

    The agent's store outlives the attempts, and nothing in it or in the workers' environment says which attempt a
    worker belongs to on every node alike (TORCHELASTIC_RESTART_COUNT is per node: an agent whose own workers were
    healthy restarts them without counting). So each process asks with a nonce of its own: rank r writes its nonce
    under ``hello/r`` in the agent's store and waits for the port of rank 0's store under ``welcome/<nonce>``; rank 0
    answers every hello it finds (a stale one from a dead attempt too, harmlessly) until every rank has joined its
    store. No rank has to have reached any point in an earlier attempt.
    """
    address, world_size = os.environ["MASTER_ADDR"], int(os.environ["WORLD_SIZE"])
    agent = dist.TCPStore(address, int(os.environ["MASTER_PORT"]), is_master=False, timeout=_NAME_TIMEOUT)
    if os.environ["RANK"] == "0":
        store = dist.TCPStore(address, 0, is_master=True, timeout=_NAME_TIMEOUT)
        others = [str(rank) for rank in range(1, world_size)]
        while not store.check([f"joined/{rank}" for rank in others]):
            for rank in others:
                if agent.check([f"{_HELLO}/{rank}"]):
                    agent.set(f"{_WELCOME}/{agent.get(f'{_HELLO}/{rank}').decode()}", str(store.port))
            time.sleep(0.1)
        return store
    nonce = uuid.uuid4().hex
    agent.set(f"{_HELLO}/{os.environ['RANK']}", nonce)
    store = dist.TCPStore(address, int(agent.get(f"{_WELCOME}/{nonce}")), is_master=False, timeout=_NAME_TIMEOUT)
    store.set(f"joined/{os.environ['RANK']}", "")
    return store


def is_child() -> bool:
    """A process other than rank 0 of a multi-process job: it joins the run rank 0 claims, and claims nothing."""
    return any(os.environ.get(var, "0") != "0" for var in ("LOCAL_RANK", "RANK", "SLURM_PROCID"))


def slurm_run_name() -> Optional[str]:
    """Inside a SLURM job, the name an unnamed run gets: the job's, ``slurm_<job id>``, so a requeued job (same id)
    finds its run; None elsewhere, also in an interactive allocation (Lightning's test)."""
    job = SLURMEnvironment.job_id() if SLURMEnvironment.detect() else None
    return f"slurm_{job}" if job is not None else None


def publish(message: str, error: bool = False) -> None:
    """Global rank 0: tell the job's other ranks which run this is, or, failing before it named the run, its error, so
    that they fail with the same message instead of waiting for a process group rank 0 never joins (a no-op outside
    torchrun and srun). The store lives in this process: after an error it waits (a bounded time) until every rank
    has read the message."""
    store = job_store()
    if store is None or store.check([_RUN_KEY]):  # named: the other ranks are past this point
        return
    store.set(_RUN_KEY, ("error " if error else "run ") + message)
    others = int(os.environ.get("WORLD_SIZE") or os.environ["SLURM_NTASKS"]) - 1
    deadline = time.monotonic() + _TOLD_TIMEOUT
    while error and store.add(_TOLD_KEY, 0) < others and time.monotonic() < deadline:
        time.sleep(0.1)


def published_run_name() -> Optional[str]:
    """The run global rank 0 chose (waits until it has) under torchrun or srun; None elsewhere. Rank 0's error, if it
    failed first, is raised here."""
    store = job_store()
    if store is None:
        return None
    kind, _, value = store.get(_RUN_KEY).decode().partition(" ")
    store.add(_TOLD_KEY, 1)
    if kind == "error":
        raise LitGPTCharError(value)
    return value


class ElasticDDPStrategy(DDPStrategy):
    """Lightning's DDP, with a process group that survives torchrun restarting the worker group.

    Under torchrun and srun, every attempt forms its process group on the store its global rank 0 hosts
    (:func:`job_store`), so no rank reads an address a previous, dead group left. Elsewhere (Lightning's own
    processes, a single process) Lightning's ``DDPStrategy`` forms it. Every process takes its group down at exit.
    """

    def setup_distributed(self) -> None:
        store = job_store()
        if store is not None and not dist.is_initialized():
            self.set_world_ranks()
            dist.init_process_group(
                self._get_process_group_backend(),
                store=dist.PrefixStore("process_group", store),
                rank=self.global_rank,
                world_size=self.world_size,
                timeout=self._timeout,
                device_id=None if self.root_device.type == "cpu" else self.root_device,
            )
        super().setup_distributed()  # Lightning's own set-up; it finds the group initialised and keeps it
        # Lightning takes down only NCCL groups at exit. A gloo group left to the interpreter's finalization aborts
        # the process now and then ("terminate called without an active exception": a worker thread of the group
        # releases the last collective's tensors after Python stopped handing out the GIL), failing a finished job
        atexit.register(destroy_dist_connection)


# `--trainer.strategy ddp` (and "auto" with several devices or nodes) means this strategy
StrategyRegistry.register(
    "ddp", ElasticDDPStrategy, description="DDP that survives torchrun restarts", start_method="popen", override=True
)
