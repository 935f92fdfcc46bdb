"""Dataset caching as a config choice: ``auto`` (memory within a memory budget, else a compact or a disk cache),
``none``, ``memory`` (``CacheDataset``) or ``disk`` (``PersistentDataset``).

The memory a cache takes grows with the dataset (about 77 MB per 240x240x155 BraTS case after the cached
transforms, so ~94 GB for 1,251 cases). ``make_dataset`` therefore measures one case, compares the total with a
``CacheBudget`` (``cache_memory_budget``, by default half of the memory available) and decides *before* filling,
with one log line saying what it chose and why (``plan_cache``). A disk cache file that cannot be read is named
in a warning and rebuilt (``RebuildingPersistentDataset``) instead of ending the epoch.
"""

from __future__ import annotations

import logging
import math
import os
import re
import secrets
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from custom.core.errors import DataError
from monai.data import CacheDataset, Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.transforms import Compose, RandomizableTrait, Transform

__all__ = [
    "make_dataset",
    "transform_hashing",
    "CACHE_MODES",
    "CacheBudget",
    "CachePlan",
    "plan_cache",
    "available_memory",
    "parse_bytes",
    "estimate_case_bytes",
    "CompactCacheDataset",
    "RebuildingPersistentDataset",
]

CACHE_MODES = ("auto", "none", "memory", "disk")
DEFAULT_BUDGET_FRACTION = 0.5  # of the memory available when the first cache is built
DISK_MARGIN = 1.1  # the disk cache is chosen only with 10 % more free disk than its files need
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


# ---- memory: what is available, the budget ---------------------------------------------------------------------


def _gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.1f} GB"


def _mb(nbytes: float) -> str:
    return f"{nbytes / 1e6:.1f} MB"


def _cgroup_limit() -> int | None:
    """Bytes a cgroup v2 memory limit still allows this process's group (containers), None without a limit."""
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text().strip()))
    except (OSError, ValueError):
        return None


def available_memory() -> int:
    """Bytes of memory available now: psutil's ``virtual_memory().available`` where psutil is installed, else
    ``MemAvailable`` of ``/proc/meminfo``; a cgroup v2 limit (a container's) lowers it."""
    try:
        import psutil

        available = int(psutil.virtual_memory().available)
    except ImportError:
        try:
            text = Path("/proc/meminfo").read_text()
            available = int(re.search(r"^MemAvailable:\s+(\d+)\s*kB", text, re.M).group(1)) * 1024
        except (OSError, AttributeError) as e:
            raise RuntimeError(
                "cannot tell the memory available (no psutil, no /proc/meminfo): set `cache_memory_budget` "
                "(e.g. --cache_memory_budget 32GB) or `pip install psutil`"
            ) from e
    limit = _cgroup_limit()
    return available if limit is None else min(available, limit)


_UNITS = {"": 1, "B": 1, "K": 1e3, "KB": 1e3, "M": 1e6, "MB": 1e6, "G": 1e9, "GB": 1e9, "T": 1e12, "TB": 1e12}
_UNITS.update({"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40})


def parse_bytes(value, key: str = "cache_memory_budget") -> int | float | None:
    """``value`` as bytes (an int), or as a fraction of the memory available (a float in (0, 1]); None for None.
    Accepted: a number of bytes (``32000000000``), a fraction (``0.5``), ``"32GB"``, ``"32 GiB"``, ``"500MB"``,
    ``"50%"``. Anything else names ``key`` and what to write."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"`{key}` must be bytes ('32GB'), a fraction of the available memory (0.5) or null")
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        text = str(value).strip().upper().replace(" ", "")
        match = re.fullmatch(r"([0-9]*\.?[0-9]+(?:E[+-]?[0-9]+)?)(%|[KMGT]?I?B?)", text)
        if not match or match.group(2) not in _UNITS and match.group(2) != "%":
            raise ValueError(
                f"`{key}` {value!r} is not a size: write bytes or a unit ('32GB', '500MB', '16GiB'), a percentage of "
                "the available memory ('50%'), a fraction (0.5), or null for the default (half the available memory)"
            )
        number = float(match.group(1))
        if match.group(2) == "%":
            number /= 100.0
            if not 0 < number <= 1:
                raise ValueError(f"`{key}` {value!r}: a percentage of the available memory must be in (0, 100]")
            return number
        number *= _UNITS[match.group(2)]
    if number <= 0:
        raise ValueError(f"`{key}` must be positive, got {value!r} (null: half the available memory)")
    return number if number <= 1 else int(number)


class CacheBudget:
    """The memory the caches of one run may take, shared by the datasets built from one config: the training and
    validation datasets draw from the same budget, in the order they are built.

    ``limit``: ``None`` for ``DEFAULT_BUDGET_FRACTION`` (half) of the memory available when the first cache asks, a
    fraction of it (``0.3``, ``"30%"``) or bytes (``"32GB"``), see ``parse_bytes``. Processes that share a node
    (torchrun's ``LOCAL_WORLD_SIZE``) each get their share of a fraction (each rank caches its own shard); a budget
    in bytes above the memory available is lowered to it."""

    def __init__(self, limit=None) -> None:
        self.limit = parse_bytes(limit)
        self._total: int | None = None
        self.description = ""
        self.used = 0

    def _resolve(self) -> None:
        if self._total is not None:
            return
        if isinstance(self.limit, int):
            self._total, self.description = self.limit, f"cache_memory_budget {_gb(self.limit)}"
            available = available_memory()
            if self.limit > available:  # a budget past the free memory would end in the out-of-memory killer
                self._total = available
                self.description = f"the {_gb(available)} available (cache_memory_budget {_gb(self.limit)} is more)"
            return
        fraction = DEFAULT_BUDGET_FRACTION if self.limit is None else float(self.limit)
        processes = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1))
        available = available_memory()
        self._total = int(available * fraction / processes)
        share = f", 1/{processes} for each process on this node" if processes > 1 else ""
        self.description = (
            f"cache_memory_budget {_gb(self._total)} ({fraction:.0%} of the {_gb(available)} available{share}"
            + (", the default" if self.limit is None else "")
            + ")"
        )

    @property
    def total(self) -> int:
        self._resolve()
        return self._total

    @property
    def remaining(self) -> int:
        return max(0, self.total - self.used)

    def reserve(self, nbytes: int) -> None:
        self.used += int(nbytes)


# ---- the decision -------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CachePlan:
    """What ``make_dataset`` builds: ``mode`` (``none``, ``memory`` or ``disk``), the fraction of cases held in
    memory, whether they are held as float16 (``compact``), the bytes reserved from the budget, and why."""

    mode: str
    cache_rate: float = 1.0
    compact: bool = False
    nbytes: int = 0
    reason: str = ""
    cache_num: int | None = None  # cases held in memory where the budget sets it (``CacheDataset``'s cache_num)


def plan_cache(
    num_cases: int,
    bytes_per_case: int,
    budget: int,
    cache: str = "auto",
    cache_rate: float = 1.0,
    compact_bytes_per_case: int | None = None,
    cache_dir: str | None = None,
    disk_free: int | None = None,
    budget_description: str = "the budget",
) -> CachePlan:
    """The cache for ``num_cases`` cases of ``bytes_per_case`` (measured after the cached transforms) within
    ``budget`` bytes. ``auto``, in this order: memory as it is; memory in float16 (``compact_bytes_per_case``); the
    disk cache when ``cache_dir`` has the room (``disk_free``, with a 10 % margin); memory in float16 for the
    fraction of the cases that fits (the others are read and transformed at every step, the slowest choice).
    An explicit ``memory`` that does not fit raises a ``DataError`` saying which key to set, before anything is
    loaded."""
    compact = compact_bytes_per_case if compact_bytes_per_case is not None else bytes_per_case
    cached = min(num_cases, int(num_cases * cache_rate))
    needed, needed_compact = cached * bytes_per_case, cached * compact
    what = f"{cached} cases x {_mb(bytes_per_case)} = {_gb(needed)}"
    if cache == "memory":
        if needed <= budget:
            return CachePlan("memory", cache_rate, False, needed, f"{what} fits {budget_description}")
        rate = math.floor(budget / max(1, bytes_per_case) / max(1, num_cases) * 100) / 100
        raise DataError(
            f"cache 'memory' needs {what} but {budget_description}: the run would run out of memory while filling "
            f"the cache. Choose one: --cache auto (the run picks float16, disk or a lower rate itself), --cache disk "
            f"(~{_gb(num_cases * bytes_per_case)} in cache_dir), --cache_rate {min(rate, 1.0):.2f}, or a larger "
            f"--cache_memory_budget (e.g. '{math.ceil(needed / 1e9)}GB')"
        )
    if needed <= budget:
        return CachePlan("memory", cache_rate, False, needed, f"{what} fits {budget_description}")
    if needed_compact <= budget:
        return CachePlan(
            "memory",
            cache_rate,
            True,
            needed_compact,
            f"{what} exceeds {budget_description}; in float16 ({_mb(compact)} a case, {_gb(needed_compact)}) it fits",
        )
    disk_needed = num_cases * bytes_per_case
    if cache_dir and disk_free is not None and disk_free >= DISK_MARGIN * disk_needed:
        return CachePlan(
            "disk",
            1.0,
            False,
            0,
            f"{what} exceeds {budget_description} even in float16 ({_gb(needed_compact)}); cache_dir {cache_dir} "
            f"has {_gb(disk_free)} free for the {_gb(disk_needed)} of files",
        )
    count = min(num_cases, budget // max(1, compact))
    if count <= 0:
        return CachePlan(
            "none", 0.0, False, 0, f"not even one case ({_mb(compact)} in float16) fits {budget_description}"
        )
    disk = (
        f"cache_dir has {_gb(disk_free or 0)} free, {_gb(DISK_MARGIN * disk_needed)} needed for disk"
        if cache_dir
        else "no cache_dir for disk"
    )
    rate = count / num_cases
    return CachePlan(
        "memory",
        rate,
        True,
        count * compact,
        f"{what} exceeds {budget_description} even in float16 ({_gb(needed_compact)}) and {disk}; "
        f"{count} of the cases ({rate:.3f}) fit in float16, the others are loaded at every step",
        cache_num=count,
    )


def _tensor_bytes(item) -> tuple[int, int]:
    """(bytes, bytes with float32 stored as float16) of the tensors and arrays in ``item``."""
    if isinstance(item, (torch.Tensor, np.ndarray)):
        nbytes = int(item.nbytes) if isinstance(item, np.ndarray) else item.element_size() * item.nelement()
        halved = item.dtype in (torch.float32, np.float32)
        return nbytes, nbytes // 2 if halved else nbytes
    if isinstance(item, dict):
        parts = [_tensor_bytes(v) for v in item.values()]
    elif isinstance(item, (list, tuple)):
        parts = [_tensor_bytes(v) for v in item]
    else:
        return 0, 0
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def _first_random(transform: Compose) -> int | None:
    return transform.get_index_of_first(lambda t: isinstance(t, RandomizableTrait) or not isinstance(t, Transform))


def estimate_case_bytes(data: Sequence[dict], transform: Callable) -> tuple[int, int]:
    """(bytes, bytes in float16) of the first case after the transforms a cache holds (those before the first
    random one), as ``CacheDataset`` would hold it."""
    if not isinstance(transform, Compose):
        transform = Compose([transform] if callable(transform) else list(transform))
    item = transform(dict(data[0]) if isinstance(data[0], dict) else data[0], end=_first_random(transform))
    return _tensor_bytes(item)


def _case_name(entry) -> str:
    if isinstance(entry, dict):
        for key in ("case_id", "image", "label"):
            value = entry.get(key)
            value = value[0] if isinstance(value, (list, tuple)) and value else value
            if isinstance(value, (str, os.PathLike)):
                return str(value)
    return "its source data"


# ---- the datasets -------------------------------------------------------------------------------------------------


def _cast(item, keys, dtype):
    if not isinstance(item, dict):
        return item
    out = dict(item)
    for key in keys:
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key].to(dtype)
    return out


class _RestoredCache(list):
    """The cache list of ``CompactCacheDataset``: holds float16, hands out float32 (a new tensor, so the cache is
    never changed by the transforms that follow)."""

    def __init__(self, items, keys: Sequence[str]) -> None:
        super().__init__(items)
        self.keys = tuple(keys)

    def __getitem__(self, index):
        item = super().__getitem__(index)
        return item if isinstance(index, slice) else _cast(item, self.keys, torch.float32)


class CompactCacheDataset(CacheDataset):
    """``CacheDataset`` that holds the float32 tensors of each cached case as float16 (half the memory; z-scored
    intensities keep about 3 significant digits, region masks are exact) and hands them to the random transforms
    as float32 again."""

    def _load_cache_item(self, idx: int):
        item = super()._load_cache_item(idx)
        if not isinstance(item, dict):
            return item
        keys = [k for k, v in item.items() if isinstance(v, torch.Tensor) and v.dtype == torch.float32]
        self._compact_keys = sorted(set(getattr(self, "_compact_keys", ())) | set(keys))
        return _cast(item, keys, torch.float16)

    def set_data(self, data: Sequence) -> None:
        super().set_data(data)
        self._cache = _RestoredCache(self._cache, getattr(self, "_compact_keys", ()))


def _own_storage(item):
    """``item`` with every tensor that is a view into a larger storage (``CropForegroundd`` crops by slicing) copied
    into a storage of its own: ``torch.save`` writes a tensor's whole storage, so a cached brain box would
    otherwise take the uncropped 240x240x155 volume on disk (169.6 MB instead of 80.7 MB for a BraTS case)."""
    if isinstance(item, torch.Tensor):
        if item.untyped_storage().nbytes() > item.element_size() * item.nelement():
            return item.clone(memory_format=torch.contiguous_format)
        return item
    if isinstance(item, dict):
        return {k: _own_storage(v) for k, v in item.items()}
    if isinstance(item, list):
        return [_own_storage(v) for v in item]
    return item


class RebuildingPersistentDataset(PersistentDataset):
    """``PersistentDataset`` that rebuilds a cache file it cannot read (truncated by a full disk, a killed copy, a
    bad sector, another PyTorch) instead of ending the epoch: the file is named in a warning, deleted and written
    again from the case's source files. MONAI's own check covers only unpickling errors. Cropped tensors are saved
    without the storage they were cropped from (``_own_storage``)."""

    def _pre_transform(self, item_transformed):
        return _own_storage(super()._pre_transform(item_transformed))

    def _cache_file(self, item_transformed) -> Path | None:
        if self.cache_dir is None:
            return None
        return self.cache_dir / f"{self.hash_func(item_transformed).decode('utf-8')}{self.transform_hash}.pt"

    def _cachecheck(self, item_transformed):
        try:
            return super()._cachecheck(item_transformed)
        except (PermissionError, MemoryError):
            raise
        except Exception as error:
            hashfile = self._cache_file(item_transformed)
            if hashfile is None or not hashfile.is_file():
                raise  # not a cache file problem: the transforms themselves failed
            logger.warning(
                f"disk cache: {hashfile} cannot be read ({type(error).__name__}: {(str(error).splitlines() or [''])[0][:200]}); "
                f"deleting and rebuilding it from {_case_name(item_transformed)}"
            )
            hashfile.unlink(missing_ok=True)
            return super()._cachecheck(item_transformed)


def _disk_free(cache_dir: str) -> int | None:
    folder = Path(cache_dir).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def make_dataset(
    data: Sequence[dict],
    transform: Callable,
    cache: str = "memory",
    cache_rate: float = 1.0,
    cache_dir: str | None = None,
    num_workers: int | None = 0,
    budget: CacheBudget | None = None,
) -> Dataset:
    """The dataset for ``cache``; MONAI caches the transforms up to the first random one (load, channel order,
    label conversion, normalisation), so augmentation stays random in every mode. Disk cache files are keyed on
    each case and on those transforms (``transform_hashing``): changed transforms never reuse old files, and an
    unreadable one is rebuilt.

    With a ``budget`` (train.json passes one ``CacheBudget`` to the training and validation datasets), ``auto`` and
    ``memory`` first measure the first case and decide with ``plan_cache`` before filling anything; ``auto``
    without a budget uses the default one (half the available memory)."""
    if cache in (None, False, "none"):
        return Dataset(data, transform)
    if cache not in CACHE_MODES:
        raise ValueError(f"`cache` must be one of {CACHE_MODES}, got {cache!r}.")
    if cache == "disk" and not cache_dir:
        raise ValueError("cache='disk' needs `cache_dir`, a folder for the cached volumes.")
    if not 0.0 <= float(cache_rate) <= 1.0:
        raise ValueError(f"`cache_rate` must be in [0, 1] (the fraction of the cases cached), got {cache_rate!r}")
    plan = CachePlan("disk" if cache == "disk" else "memory", float(cache_rate))
    if cache == "auto" and budget is None:
        budget = CacheBudget()
    if budget is not None and cache in ("auto", "memory") and len(data) > 0 and cache_rate > 0:
        per_case, compact = estimate_case_bytes(data, transform)
        plan = plan_cache(
            len(data),
            per_case,
            budget.remaining,
            cache=cache,
            cache_rate=float(cache_rate),
            compact_bytes_per_case=compact,
            cache_dir=cache_dir,
            disk_free=_disk_free(cache_dir) if cache_dir else None,
            budget_description=(
                budget.description if budget.used == 0 else f"the {_gb(budget.remaining)} left of {budget.description}"
            ),
        )
        budget.reserve(plan.nbytes)
        chosen = {"memory": "memory" + (", float16" if plan.compact else ""), "disk": "disk", "none": "none"}
        logger.info(
            f"cache {cache} -> {chosen[plan.mode]}, cache_rate {plan.cache_rate:.3g} "
            f"({_mb(per_case)} a case, measured on {_case_name(data[0])} after the cached transforms): {plan.reason}"
        )
    if plan.mode == "none":
        return Dataset(data, transform)
    if plan.mode == "disk":
        return RebuildingPersistentDataset(data, transform, cache_dir=cache_dir, hash_transform=transform_hashing)
    # threads that fill the cache: 0 or 1 = in this thread (None would mean one per core)
    dataset_class = CompactCacheDataset if plan.compact else CacheDataset
    limit = {} if plan.cache_num is None else {"cache_num": plan.cache_num}
    return dataset_class(
        data, transform, cache_rate=plan.cache_rate, num_workers=max(1, int(num_workers or 0)), **limit
    )
