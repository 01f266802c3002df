"""Muon for the blocks' weight matrices and AdamW for everything else, as the one optimizer Lightning steps.

Muon (Keller Jordan, 2024; the update rule of ``torch.optim.Muon``): SGD momentum (Nesterov) whose update, for a
weight matrix, is replaced by the nearest semi-orthogonal matrix (five Newton-Schulz iterations). PyTorch's own
``torch.optim.Muon`` runs those iterations in bfloat16, which a device without native bf16 emulates (slowly: see
benchmarks/RESULTS.md), so here they run in float32 on a CPU, on Apple MPS and on GPUs without native bf16 (T4,
V100), and in bfloat16 on the others. Embeddings, the output head and the norms' gains stay on AdamW, as Muon's
authors prescribe.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional

import torch

from lit_gpt_char.precision import native_bf16

_NS = (3.4445, -4.775, 2.0315)  # quintic Newton-Schulz coefficients (Muon's)


def orthogonalize(update: torch.Tensor, steps: int = 5, eps: float = 1e-7) -> torch.Tensor:
    """Approximately U·Vᵀ of ``update`` = U·S·Vᵀ (singular values pushed to ~[0.5, 1.5]), as Muon computes it."""
    a, b, c = _NS
    x = update.bfloat16() if native_bf16(update.device) else update.float()  # CPUs, Apple MPS, older GPUs: float32
    tall = x.size(0) > x.size(1)
    if tall:
        x = x.T
    x = x / x.norm().clamp(min=eps)  # spectral norm at most 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return (x.T if tall else x).to(update.dtype)


def _evaluate(closure: Optional[Callable[[], float]]) -> Optional[float]:
    """The loss from ``closure`` (forward and backward, as Lightning passes it), computed with gradients on."""
    if closure is None:
        return None
    with torch.enable_grad():
        return closure()


class Muon(torch.optim.Optimizer):
    """Muon on 2-D parameters: momentum, Nesterov, orthogonalised update scaled by sqrt(max(1, rows/cols))."""

    def __init__(self, params: Any, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True) -> None:
        super().__init__(params, {"lr": lr, "momentum": momentum, "nesterov": nesterov})

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = _evaluate(closure)
        for group in self.param_groups:
            momentum = group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - momentum)
                update = p.grad.lerp(buf, momentum) if group["nesterov"] else buf
                scale = math.sqrt(max(1.0, p.size(0) / p.size(1)))
                p.add_(orthogonalize(update), alpha=-group["lr"] * scale)
        return loss


class MuonAdamW(torch.optim.Optimizer):
    """Muon for ``muon_params``, AdamW for ``adamw_groups``: one optimizer, one set of param groups (so one LR
    schedule scales both peaks alike) and one state dict (checkpoints and exact resume as for AdamW alone)."""

    def __init__(self, muon_params: list, adamw_groups: list[dict], muon_lr: float, muon_momentum: float, **adamw):
        self._adamw = torch.optim.AdamW(adamw_groups, **adamw)
        self._muon = Muon(muon_params, lr=muon_lr, momentum=muon_momentum)
        super().__init__(self._adamw.param_groups + self._muon.param_groups, {})
        self._link()

    def _link(self) -> None:
        # the inner optimizers work on this optimizer's group dicts and state (one state dict for all)
        n = len(self._adamw.param_groups)
        self._adamw.param_groups, self._muon.param_groups = self.param_groups[:n], self.param_groups[n:]
        self._adamw.state = self._muon.state = self.state

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = _evaluate(closure)  # once, then both steps
        self._adamw.step()
        self._muon.step()
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        self._link()  # loading replaced the group list and the state dict
