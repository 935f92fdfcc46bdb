"""Learning-rate schedule of the paper: linear warm-up, then polynomial decay (lr0 (1 - e/N)^0.9)."""

from __future__ import annotations

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["warmup_poly_factor", "WarmupPolyLR"]


def warmup_poly_factor(epoch: int, warmup_epochs: int, max_epochs: int, power: float = 0.9) -> float:
    """Multiplier of the base learning rate for 0-based ``epoch``.

    Warm-up epochs ``0 .. warmup_epochs - 1`` ramp linearly to 1 (``(epoch + 1) / warmup_epochs``); from then on
    the factor is ``(1 - epoch / max_epochs) ** power``.
    """
    if epoch < warmup_epochs:
        return (epoch + 1) / warmup_epochs
    return max(0.0, 1.0 - epoch / max_epochs) ** power


class WarmupPolyLR(LambdaLR):
    """``LambdaLR`` over ``warmup_poly_factor``, stepped once per epoch (MONAI's ``LrScheduleHandler``)."""

    def __init__(
        self, optimizer: Optimizer, max_epochs: int, warmup_epochs: int = 5, power: float = 0.9, last_epoch: int = -1
    ) -> None:
        self.max_epochs, self.warmup_epochs, self.power = max_epochs, warmup_epochs, power
        super().__init__(optimizer, lambda e: warmup_poly_factor(e, warmup_epochs, max_epochs, power), last_epoch)
