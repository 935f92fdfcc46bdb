"""Where the bundle is and which device to run on: the two facts every config needs first."""

from __future__ import annotations

import os

import torch

__all__ = ["bundle_root", "resolve_device"]


def bundle_root() -> str:
    """The folder holding ``configs/``: the unzipped bundle (``custom/`` next to ``configs/``) or ``bundle/`` of the repo."""
    package_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # custom/core/ -> ..
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
