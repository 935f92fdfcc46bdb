"""Small pieces the configs wire into MONAI's engines: bundle paths, per-region metric views, devices."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from monai.handlers import from_engine

__all__ = ["bundle_root", "resolve_device", "RegionOutput", "REGION_NAMES"]

REGION_NAMES = ("tc", "wt", "et")  # network output channel order (MONAI's BraTS conversion order)


def bundle_root() -> str:
    """The folder holding ``configs/``: the unzipped bundle (``custom/`` next to ``configs/``) or ``bundle/`` of the repo."""
    package_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for candidate in (package_parent, os.path.join(package_parent, "bundle")):
        if os.path.isdir(os.path.join(candidate, "configs")):
            return candidate
    return os.getcwd()


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as given, or CUDA when present, else CPU; a CUDA request without CUDA is a clear error."""
    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device is 'cuda' but no CUDA GPU is available: use --device cpu.")
    return device


class RegionOutput:
    """``output_transform`` for a metric handler that looks at one region channel of ``pred`` and ``label``."""

    def __init__(self, region: int | str, keys: Sequence[str] = ("pred", "label")) -> None:
        self.index = REGION_NAMES.index(region) if isinstance(region, str) else int(region)
        self.keys = list(keys)

    def __call__(self, output):
        preds, labels = from_engine(self.keys)(output)
        i = self.index
        return [p[i : i + 1] for p in preds], [y[i : i + 1] for y in labels]
