"""The training cache fits a memory budget, decided before anything is filled (issue 23), and a corrupt disk cache
file is named and rebuilt instead of ending the epoch."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from custom.core.errors import DataError
from custom.data.datasets import (
    CacheBudget,
    CompactCacheDataset,
    RebuildingPersistentDataset,
    available_memory,
    make_dataset,
    parse_bytes,
    plan_cache,
)
from monai.data import CacheDataset, Dataset
from monai.transforms import Compose, EnsureTyped, RandFlipd, ShiftIntensityd

MB, GB = 10**6, 10**9
BRATS_CASE = 81 * MB  # a BraTS case after train.json's cached transforms: 80.7 MB measured, 46.7 MB in float16


def _cases(n: int, size: int = 16) -> list[dict]:
    """``n`` in-memory cases of 4 x size^3 float32 (the cached part of a pipeline: no files to read)."""
    image = np.random.default_rng(0).normal(size=(4, size, size, size)).astype(np.float32)
    return [{"image": image, "case_id": f"case{i:04d}"} for i in range(n)]


def _pipeline() -> Compose:  # deterministic part cached, then a random flip
    return Compose([EnsureTyped(keys="image", dtype=torch.float32), RandFlipd(keys="image", prob=0.5, spatial_axis=0)])


CASE_BYTES = 4 * 16**3 * 4  # one case of _cases()


def test_1251_brats_cases_under_32_gb_do_not_fill_memory():
    kwargs = dict(num_cases=1251, bytes_per_case=BRATS_CASE, budget=32 * GB, compact_bytes_per_case=47 * MB)
    with_disk = plan_cache(**kwargs, cache_dir="/data/cache", disk_free=500 * GB)
    assert (with_disk.mode, with_disk.nbytes) == ("disk", 0)
    without_disk = plan_cache(**kwargs, cache_dir="/data/cache", disk_free=20 * GB)
    assert without_disk.mode == "memory" and without_disk.compact
    assert 0.5 < without_disk.cache_rate < 0.56 and without_disk.nbytes <= 32 * GB  # 32 GB / (1251 x 47 MB)
    # a small dataset keeps float32, a middle one float16
    assert plan_cache(300, BRATS_CASE, 32 * GB) == plan_cache(300, BRATS_CASE, 32 * GB, cache_rate=1.0)
    assert not plan_cache(300, BRATS_CASE, 32 * GB).compact
    assert plan_cache(600, BRATS_CASE, 32 * GB, compact_bytes_per_case=47 * MB).compact
    # an explicit `memory` that does not fit is refused before filling, saying what to set
    with pytest.raises(DataError) as refused:
        plan_cache(1251, BRATS_CASE, 32 * GB, cache="memory", compact_bytes_per_case=47 * MB)
    assert all(key in str(refused.value) for key in ("--cache auto", "--cache disk", "--cache_rate", "budget"))


def test_a_small_budget_chooses_disk_or_a_lower_rate(tmp_path, caplog):
    data = _cases(1251)  # the datalist length of BraTS 2021; only the first case is measured
    caplog.set_level(logging.INFO, logger="custom.data.datasets")
    small = 40 * CASE_BYTES  # 40 cases in float32, 80 in float16
    on_disk = make_dataset(
        data, _pipeline(), cache="auto", cache_dir=str(tmp_path / "cache"), budget=CacheBudget(small)
    )
    assert isinstance(on_disk, RebuildingPersistentDataset) and not any((tmp_path / "cache").iterdir())  # none filled
    assert "cache auto -> disk" in caplog.text and "exceeds cache_memory_budget" in caplog.text
    caplog.clear()
    partial = make_dataset(data, _pipeline(), cache="auto", cache_dir=None, budget=CacheBudget(small))
    assert isinstance(partial, CompactCacheDataset) and partial.cache_num == 80
    assert (
        "cache auto -> memory, float16, cache_rate 0.0639" in caplog.text
        and "80 of the cases" in caplog.text
        and "no cache_dir" in caplog.text
    )
    assert partial[0]["image"].dtype == torch.float32  # handed out as float32
    reference = torch.as_tensor(data[1]["image"])  # float16-close to the source, flipped on its first axis or not
    got = torch.as_tensor(partial[1]["image"])
    assert any(torch.allclose(got, ref, atol=2e-3) for ref in (reference, reference.flip(1)))
    with pytest.raises(DataError, match="--cache disk"):  # explicit memory over the budget: say what to choose
        make_dataset(data, _pipeline(), cache="memory", budget=CacheBudget(small))
    roomy = make_dataset(data[:30], _pipeline(), cache="auto", budget=CacheBudget(small))
    assert type(roomy) is CacheDataset and roomy.cache_num == 30


def test_the_training_and_validation_caches_share_one_budget():
    budget = CacheBudget(50 * CASE_BYTES)
    first = make_dataset(_cases(40), _pipeline(), cache="auto", budget=budget)
    second = make_dataset(_cases(40), _pipeline(), cache="auto", budget=budget)
    assert type(first) is CacheDataset and isinstance(second, CompactCacheDataset)  # 10 left: 20 in float16
    assert second.cache_num == 20 and budget.used <= budget.total


def test_budget_values_and_available_memory(monkeypatch):
    assert parse_bytes("32GB") == 32 * GB and parse_bytes("16 GiB") == 16 * 2**30 and parse_bytes(None) is None
    assert parse_bytes("25%") == 0.25 and parse_bytes(0.5) == 0.5 and parse_bytes(1e9) == GB
    with pytest.raises(ValueError, match="cache_memory_budget"):
        parse_bytes("lots")
    assert 0 < available_memory() < 2**50
    assert CacheBudget().total == pytest.approx(available_memory() / 2, rel=0.2)
    assert CacheBudget(2**50).total <= 1.2 * available_memory()  # never more than there is
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")  # 4 ranks on this node: a quarter of the default each
    assert CacheBudget().total == pytest.approx(available_memory() / 8, rel=0.2)


def test_a_corrupt_disk_cache_file_is_named_and_rebuilt(tmp_path, caplog):
    data = [{"image": np.full((1, 8, 8, 8), 3.0, np.float32)}]
    transform = Compose([EnsureTyped(keys="image"), ShiftIntensityd(keys="image", offset=1.0)])
    cache = tmp_path / "cache"
    dataset = make_dataset(data, transform, cache="disk", cache_dir=str(cache))
    assert float(dataset[0]["image"].max()) == 4.0
    (cached,) = cache.glob("*.pt")
    good = cached.read_bytes()
    for corrupt in (good[: len(good) // 2], good[:100] + bytes(200) + good[300:], b""):  # truncated, zeroed, empty
        cached.write_bytes(corrupt)
        caplog.clear()
        fresh = make_dataset(data, transform, cache="disk", cache_dir=str(cache))  # a new run on the same cache
        with caplog.at_level(logging.WARNING, logger="custom.data.datasets"):
            assert float(fresh[0]["image"].max()) == 4.0
        assert cached.read_bytes() != corrupt and torch.load(cached, weights_only=False)["image"].max() == 4.0
        assert cached.name in caplog.text or not caplog.text  # MONAI's own check (unpickling errors) warns itself


def test_disk_cache_files_hold_the_crop_not_the_volume_it_was_cut_from(tmp_path):
    from monai.transforms import SpatialCropd

    data = [{"image": np.ones((4, 64, 64, 64), np.float32)}]
    transform = Compose(
        [EnsureTyped(keys="image"), SpatialCropd(keys="image", roi_start=(8, 8, 8), roi_end=(24, 24, 24))]
    )
    make_dataset(data, transform, cache="disk", cache_dir=str(tmp_path))[0]
    (cached,) = tmp_path.glob("*.pt")
    assert cached.stat().st_size < 4 * 16**3 * 4 + 100_000  # the 16^3 crop, not the 64^3 storage (4.2 MB)


def test_none_mode_and_bad_values():
    assert type(make_dataset(_cases(2), _pipeline(), cache="none")) is Dataset
    with pytest.raises(ValueError, match="cache_rate"):
        make_dataset(_cases(2), _pipeline(), cache="auto", cache_rate=2.0)
    with pytest.raises(ValueError, match="`cache` must be one of"):
        make_dataset(_cases(2), _pipeline(), cache="ram")
