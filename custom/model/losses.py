"""The cascade's loss: soft Dice with squared denominators (eq. 2 of Jiang et al.), summed over regions and heads."""

from __future__ import annotations

from collections.abc import Sequence

from monai.losses import DeepSupervisionLoss, DiceLoss

__all__ = ["CascadeDiceLoss"]


class CascadeDiceLoss(DeepSupervisionLoss):
    """Sum over heads of ``head_weight * sum over regions of (1 - 2 sum(p g) / (sum p^2 + sum g^2))``.

    ``p`` is the sigmoid of the logits, ``g`` the binary region mask (eq. 2 of the paper); each region's sums run
    over the batch and all voxels (``batch=True``, which at the paper's batch size of 1 is per volume), and a
    small ``smooth`` keeps a region that is empty in both prediction and reference at loss 0 instead of 1.
    Takes the list of head logits that ``CascadedUNet`` returns in training mode, or a single logits tensor.
    """

    def __init__(self, head_weights: Sequence[float] = (1.0, 1.0, 1.0), smooth: float = 1e-5) -> None:
        dice = DiceLoss(
            sigmoid=True, squared_pred=True, batch=True, reduction="sum", smooth_nr=smooth, smooth_dr=smooth
        )
        super().__init__(dice, weight_mode="same", weights=[float(w) for w in head_weights])
