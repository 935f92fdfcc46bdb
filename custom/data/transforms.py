"""Transforms the paper needs beyond MONAI's: a channel-order-safe image layout check, the canonical geometry (one
orientation, the training grid) and the brain mask of the input grid."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import InvertibleTransform, MapTransform, Orientation, Spacing
from monai.utils import TraceKeys, ensure_tuple_rep

__all__ = ["EnsureSequenceChannelsd", "CanonicalGeometryd", "BrainMaskd", "BRATS_ORIENTATION"]

# The orientation BraTS distributes its files in (NIfTI affine diag(-1, -1, 1): nibabel axis codes L, P, S), which is
# the orientation the network is trained in as long as training reads the files as stored.
BRATS_ORIENTATION = "LPS"


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


def _spacing_tuple(pixdim: float | Sequence[float] | None) -> tuple[float, float, float] | None:
    if pixdim is None:
        return None
    values = tuple(float(v) for v in ensure_tuple_rep(pixdim, 3))
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"`target_spacing` must be null or 3 positive voxel sizes in mm (e.g. [1.0, 1.0, 1.0]), got {pixdim!r}."
        )
    return values


class CanonicalGeometryd(MapTransform, InvertibleTransform):
    """Brings every case to one canonical orientation and to the training grid, invertibly (MONAI ``Invertd``).

    1. ``orientation`` (nibabel axis codes, default ``"LPS"``: BraTS's own; ``None``: keep the stored axes): MONAI's
       ``Orientation``, exact (axis flips and permutations of the voxels, no interpolation). A file already in that
       orientation keeps its voxels as they are.
    2. ``pixdim`` (mm, default 1 mm isotropic; ``None``: keep the stored grid): MONAI's ``Spacing`` with ``mode``
       (one per key: ``bilinear`` for images, ``nearest`` for label maps), only when the voxel size differs from
       ``pixdim`` by more than ``tolerance`` mm on some axis. A file already on the grid (BraTS's 1 mm files) is not
       resampled at all, not even by an identity resampling: its voxels pass bit-identical. An interpolated image
       keeps a background of exact zeros (its brain mask is resampled nearest): see ``_resample``.

    The transform records what it did on each MetaTensor (``extra_info["applied"]``: ``"orientation"`` and/or
    ``"spacing"``, and the stored voxel size), and ``inverse`` undoes exactly that, so ``Invertd`` brings a prediction
    back to the input's exact grid, affine and shape (``nearest_interp`` for labels, linear for probabilities).
    """

    def __init__(
        self,
        keys: KeysCollection,
        orientation: str | None = BRATS_ORIENTATION,
        pixdim: float | Sequence[float] | None = (1.0, 1.0, 1.0),
        tolerance: float = 0.01,
        mode: str | Sequence[str] = "bilinear",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if orientation is not None and (not isinstance(orientation, str) or len(orientation) != 3):
            raise ValueError(
                f"`orientation` must be null or 3 nibabel axis codes such as {BRATS_ORIENTATION!r} or 'RAS', "
                f"got {orientation!r}."
            )
        self.orientation = None if orientation is None else Orientation(axcodes=orientation.upper(), labels=None)
        self.pixdim = _spacing_tuple(pixdim)
        self.spacing = None if self.pixdim is None else Spacing(pixdim=self.pixdim)
        self.tolerance = float(tolerance)
        self.mode = ensure_tuple_rep(mode, len(self.keys))

    def needs_resampling(self, spacing: Sequence[float]) -> bool:
        """Whether a voxel size (mm, after reorientation) is off the target grid by more than ``tolerance``."""
        return self.pixdim is not None and not np.allclose(spacing, self.pixdim, rtol=0.0, atol=self.tolerance)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key, mode in self.key_iterator(d, self.mode):
            image = d[key]
            if not isinstance(image, MetaTensor):
                raise TypeError(
                    f"CanonicalGeometryd: `{key}` is a {type(image).__name__}, not a MetaTensor with its affine: put "
                    "it after LoadImaged (and EnsureTyped with track_meta true) in the preprocessing."
                )
            applied = []
            if self.orientation is not None:
                image = self.orientation(image)
                image = image if image.is_contiguous() else image.contiguous()  # a permutation: one memory layout
                applied.append("orientation")
            stored = [float(v) for v in image.pixdim[:3]]
            if self.needs_resampling(stored):
                image = self._resample(image, mode)
                applied.append("spacing")
            d[key] = self.push_transform(image, extra_info={"applied": applied, "stored_spacing": stored})
        return d

    def _resample(self, image: MetaTensor, mode: str) -> MetaTensor:
        """``Spacing`` to the target grid. An interpolated image is set back to 0 outside its brain (its non-zero
        voxels, resampled nearest), so that the background stays 0 and the brain crop and the z-score over the
        brain see the same brain as on the input grid, not a rim of interpolated near-zero voxels around it."""
        if mode == "nearest":
            return self.spacing(image, mode=mode)
        brain = MetaTensor((image.as_tensor() != 0).any(dim=0, keepdim=True).float(), affine=image.affine)
        resampled = self.spacing(image, mode=mode)
        outside = self.spacing(brain, mode="nearest").as_tensor() < 0.5
        return resampled.masked_fill_(outside, 0)

    def inverse(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            applied = self.pop_transform(image)[TraceKeys.EXTRA_INFO]["applied"]
            if "spacing" in applied:
                image = self.spacing.inverse(image)
            if "orientation" in applied:
                image = self.orientation.inverse(image)
            d[key] = image
        return d


class BrainMaskd(MapTransform):
    """Stores the brain mask of ``keys`` (a ``(C, H, W, D)`` image of the input grid): the union of the non-zero
    voxels of its sequences, ``(1, H, W, D)`` bool with the image's affine, in ``mask_key``. Placed right after
    loading (before any crop, reorientation or resampling), it is the mask of the input's own grid, which
    post-processing uses to write no label outside the brain (``custom.inference.inferer.RestrictToBraind``)."""

    def __init__(self, keys: KeysCollection, mask_key: str = "brain_mask", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            values = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
            mask = (values != 0).any(dim=0, keepdim=True)
            d[self.mask_key] = MetaTensor(mask, affine=image.affine) if isinstance(image, MetaTensor) else mask
        return d
