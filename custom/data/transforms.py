"""Transforms the paper needs beyond MONAI's: a channel-order-safe image layout check and region/label conversion."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

__all__ = ["EnsureSequenceChannelsd"]


class EnsureSequenceChannelsd(MapTransform):
    """Puts the 4 MR sequences on the first axis, from either 4 stacked files or one 4-channel NIfTI.

    ``LoadImaged`` stacks a list of 4 files on axis 0 (``original_channel_dim == 0``). A single 4-D file is
    accepted channels last ``(H, W, D, 4)`` (what MONAI Label sends) or channels first ``(4, H, W, D)``. Any other
    shape is rejected with the expected shapes in the message; this is what stops a 4-D file from being read as
    240 channels or 3 sequences from passing as 4.
    """

    def __init__(self, keys: KeysCollection, num_channels: int = 4, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.num_channels = num_channels

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self._channels_first(d[key])
        return d

    def _channels_first(self, image: torch.Tensor) -> torch.Tensor:
        meta = image.meta if isinstance(image, MetaTensor) else {}
        stacked = meta.get("original_channel_dim") == 0
        n = self.num_channels
        if image.ndim == 4 and image.shape[0] == n and (stacked or image.shape[-1] != n):
            result = image
        elif image.ndim == 4 and image.shape[-1] == n and not stacked:
            result = image.permute(3, 0, 1, 2)
        elif image.ndim == 5 and image.shape[3] == 1 and image.shape[4] == n and not stacked:
            # NIfTI stores vector images as (H, W, D, 1, C): drop the singleton time axis
            result = image[:, :, :, 0].permute(3, 0, 1, 2)
        else:
            source = meta.get("filename_or_obj", "the input")
            raise ValueError(
                f"{source}: expected {n} sequences (T1, T1c, T2, FLAIR) as {n} files of shape (H, W, D), or one "
                f"file of shape (H, W, D, {n}) or ({n}, H, W, D); got shape {tuple(image.shape)}"
                + (" from stacked files" if stacked else "")
                + ". Check that every case lists exactly its 4 sequence files."
            )
        if isinstance(result, MetaTensor):
            result.meta["original_channel_dim"] = 0
        return result.contiguous()
