"""Dataset caching as a config choice: none, memory (``CacheDataset``) or disk (``PersistentDataset``)."""

from __future__ import annotations

import logging
import secrets
from collections.abc import Callable, Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing

__all__ = ["make_dataset", "transform_hashing", "CACHE_MODES"]

CACHE_MODES = ("none", "memory", "disk")
logger = logging.getLogger(__name__)


def transform_hashing(transforms: Sequence[Callable]) -> bytes:
    """The disk cache's key for the cached (deterministic) transforms: a hash of the pickled transform objects, so
    any changed class or argument (crop margin, ``et_label``, normalisation, ...) gives new cache files.

    Transforms that cannot be pickled (lambdas) get a one-off key: such a cache is rebuilt on every run instead of
    being served stale."""
    try:
        return pickle_hashing(list(transforms))
    except Exception as e:  # pickling errors come as PicklingError, AttributeError or TypeError
        logger.warning(f"disk cache: cannot hash the transforms ({type(e).__name__}: {e}); it is rebuilt every run")
        return secrets.token_hex(16).encode()


def make_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: str | None = None,
    num_workers: int | None = 0,
) -> Dataset:
    """The dataset for ``cache``; MONAI caches the transforms up to the first random one (load, channel order,
    label conversion, normalisation), so augmentation stays random in every mode. Disk cache files are keyed on
    each case and on those transforms (``transform_hashing``): changed transforms never reuse old files."""
    if cache in (None, False, "none"):
        return Dataset(data, transform)
    if cache == "memory":
        # threads that fill the cache: 0 or 1 = in this thread (None would mean one per core)
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=max(1, int(num_workers or 0)))
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs `cache_dir`, a folder for the cached volumes.")
        return PersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=transform_hashing)
    raise ValueError(f"`cache` must be one of {CACHE_MODES}, got {cache!r}.")
