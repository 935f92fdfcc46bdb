"""Dataset caching as a config choice: none, memory (``CacheDataset``) or disk (``PersistentDataset``)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from monai.data import CacheDataset, Dataset, PersistentDataset

__all__ = ["make_dataset", "CACHE_MODES"]

CACHE_MODES = ("none", "memory", "disk")


def make_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: str | None = None,
    num_workers: int | None = 0,
) -> Dataset:
    """The dataset for ``cache``; MONAI caches the transforms up to the first random one (load, channel order,
    label conversion, normalisation), so augmentation stays random in every mode."""
    if cache in (None, False, "none"):
        return Dataset(data, transform)
    if cache == "memory":
        # threads that fill the cache: 0 or 1 = in this thread (None would mean one per core)
        return CacheDataset(data, transform, cache_rate=cache_rate, num_workers=max(1, int(num_workers or 0)))
    if cache == "disk":
        if not cache_dir:
            raise ValueError("cache='disk' needs `cache_dir`, a folder for the cached volumes.")
        return PersistentDataset(data, transform, cache_dir=cache_dir)
    raise ValueError(f"`cache` must be one of {CACHE_MODES}, got {cache!r}.")
