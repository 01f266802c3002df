"""The precision a run computes in: ``--trainer.precision auto`` decided from the device, and bf16 mixed precision
that allows gradient clipping with a fused optimizer.

Lightning's MixedPrecision refuses to clip the gradients of an optimizer that "handles unscaling"
(fused AdamW), because under fp16 the gradients it would clip are still multiplied by the loss
scale. bf16 has no loss scale: the gradients are the true ones, and clipping them before the fused
step is the same as clipping before a plain step. nanoGPT's recipe (bf16, clip 1.0, fused AdamW)
needs exactly that.
"""

from typing import Any

import torch
from lightning.pytorch.plugins.precision import MixedPrecision, Precision


class BF16MixedPrecision(MixedPrecision):
    """``precision="bf16-mixed"``, with clipping allowed for any optimizer (there is no loss scale)."""

    clip_gradients = Precision.clip_gradients  # the plain clipping, without MixedPrecision's refusal (for fp16)


def allow_clipping_with_fused_optimizers(plugin: Precision) -> Precision:
    """``plugin``, or for Lightning's bf16-mixed the same with clipping allowed before a fused optimizer step."""
    bf16 = type(plugin) is MixedPrecision and plugin.precision == "bf16-mixed"
    return BF16MixedPrecision("bf16-mixed", plugin.device) if bf16 else plugin


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` computes bf16 natively: a CUDA GPU of compute capability 8.0 or later."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 0)


def auto_precision(accelerator: Any) -> tuple[str, str]:
    """``--trainer.precision auto`` on the device ``--trainer.accelerator`` picks: the precision it runs natively, and
    why.

    bf16 autocast where the GPU computes bf16 natively (compute capability 8.0 and up: A100, H100, RTX 30xx);
    fp16 with loss scaling on older GPUs (T4, V100), which emulate bf16 slowly or not at all; float32 on a CPU
    (most emulate bf16, slower than float32) and on Apple's MPS (its mixed precision is untried here).
    """
    if accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
        if native_bf16(device):
            return "bf16-mixed", "this GPU computes bf16 natively"
        major, minor = torch.cuda.get_device_capability(device)
        return "16-mixed", f"this GPU, compute capability {major}.{minor}, has no native bf16: fp16 with loss scaling"
    if accelerator in ("auto", "gpu", "mps") and torch.backends.mps.is_available():
        return "32-true", "Apple MPS: mixed precision there is untried by this project"
    return "32-true", "on a CPU, float32 is the fast path: most CPUs emulate bf16"
