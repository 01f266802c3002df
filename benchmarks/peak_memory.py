"""A callback the benchmarks add to `lightning fit` runs: peak GPU memory and host RSS, printed at the end.

lightning fit ... --trainer.callbacks+=benchmarks.peak_memory.PeakMemory   (with the repo root on PYTHONPATH)
"""

from __future__ import annotations

import json
import resource

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class PeakMemory(Callback):
    """Prints one line `PEAK_MEMORY {"gpu_mib": ..., "rss_mib": ...}` when fit ends (rank 0)."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        gpu = torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        if trainer.is_global_zero:
            print("PEAK_MEMORY " + json.dumps({"gpu_mib": gpu, "rss_mib": rss}), flush=True)
