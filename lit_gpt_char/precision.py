"""bf16 mixed precision that allows gradient clipping with a fused optimizer.

Lightning's MixedPrecision refuses to clip the gradients of an optimizer that "handles unscaling"
(fused AdamW), because under fp16 the gradients it would clip are still multiplied by the loss
scale. bf16 has no loss scale: the gradients are the true ones, and clipping them before the fused
step is the same as clipping before a plain step. nanoGPT's recipe (bf16, clip 1.0, fused AdamW)
needs exactly that.
"""

from __future__ import annotations

from typing import Union

from lightning.pytorch.plugins.precision import MixedPrecision, Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch.optim import Optimizer


class BF16MixedPrecision(MixedPrecision):
    """``precision="bf16-mixed"``, with clipping allowed for any optimizer (there is no loss scale)."""

    def __init__(self, device: str) -> None:
        super().__init__("bf16-mixed", device)

    def clip_gradients(
        self,
        optimizer: Optimizer,
        clip_val: Union[int, float] = 0.0,
        gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM,
    ) -> None:
        Precision.clip_gradients(self, optimizer, clip_val, gradient_clip_algorithm)


def allow_clipping_with_fused_optimizers(plugin: Precision) -> Precision:
    """``plugin``, or for Lightning's bf16-mixed the same with clipping allowed before a fused optimizer step."""
    if type(plugin) is MixedPrecision and plugin.precision == "bf16-mixed":
        return BF16MixedPrecision(plugin.device)
    return plugin
