"""Muon for the blocks' weight matrices and AdamW for everything else, as the one optimizer Lightning steps.

Muon (Keller Jordan, 2024; the update rule of ``torch.optim.Muon``): SGD momentum (Nesterov) whose update, for a
weight matrix, is replaced by the nearest semi-orthogonal matrix (five Newton-Schulz iterations). PyTorch's own
``torch.optim.Muon`` runs those iterations in bfloat16, which a device without native bf16 emulates (slowly: see
benchmarks/RESULTS.md), so here they run in float32 on a CPU, on Apple MPS and on GPUs without native bf16 (T4,
V100), and in bfloat16 on the others. Embeddings, the output head and the norms' gains stay on AdamW, as Muon's
authors prescribe.
"""

import math
from typing import Any, Callable, Optional

import torch

from lit_gpt_char.precision import native_bf16


def orthogonalize(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·Vᵀ of ``update`` = U·S·Vᵀ (singular values pushed to ~[0.5, 1.5]), as Muon computes it."""
    a, b, c = 3.4445, -4.775, 2.0315  # Muon's quintic Newton-Schulz coefficients
    x = update.bfloat16() if native_bf16(update.device) else update.float()  # CPUs, Apple MPS, older GPUs: float32
    tall = x.size(0) > x.size(1)
    x = x.T if tall else x
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon for ``muon_params``, AdamW for ``adamw_groups``: one optimizer, one set of param groups (so one LR
    schedule scales both peaks alike) and one state dict (checkpoints and exact resume as for AdamW alone).

    Muon's step on a weight matrix: Nesterov momentum, then the orthogonalised update scaled by
    sqrt(max(1, rows/cols)), as in Keller Jordan's Muon and torch.optim.Muon's default.
    """

    def __init__(self, muon_params: list, adamw_groups: list[dict], muon_lr: float, muon_momentum: float, **adamw):
        self._adamw = torch.optim.AdamW(adamw_groups, **adamw)
        muon = {"params": muon_params, "lr": muon_lr, "momentum": muon_momentum}
        super().__init__([*self._adamw.param_groups, muon], {})
        self._link()

    def _link(self) -> None:
        # AdamW works on this optimizer's group dicts and state (one state dict for all); loading replaces both
        self._adamw.param_groups = self.param_groups[: len(self._adamw.param_groups)]
        self._adamw.state = self.state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = self._adamw.step(closure)  # runs the forward and backward Lightning passes (once), then AdamW's step
        for group in self.param_groups[len(self._adamw.param_groups) :]:  # Muon's
            for p in group["params"]:
                if p.grad is None:
                    continue
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
                buf = self.state[p]["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"])  # Nesterov
                p.add_(orthogonalize(update), alpha=-group["lr"] * math.sqrt(max(1.0, p.size(0) / p.size(1))))
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()
