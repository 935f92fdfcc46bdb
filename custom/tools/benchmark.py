"""Speed and memory of the cascade against the model-zoo SegResNet: ``python -m custom benchmark --help``.

Prints one JSON line per measurement (and appends them to ``--output``):

``train_step``
    one training step of the cascade as ``train.json`` configures it (network, loss, Adam) at ``--patch``:
    forward, loss, backward and optimizer step, median ms after warm-up (CUDA-synchronised), TFLOP per step
    (``torch.utils.flop_counter.FlopCounterMode`` over forward + loss + backward, counted once on the meta device
    outside the timing; it counts convolutions and matrix products only, not the optimizer), achieved TFLOP/s and
    peak memory; eager and, with ``--compile``, ``torch.compile``-d. The same for the anchor, MONAI's SegResNet
    as the model-zoo ``brats_mri_segmentation`` bundle trains it; ``train_step_ratio`` lines give cascade/anchor.
``infer_case``
    one whole case as ``inference.json`` runs it: the brain's bounding-box crop of ``--volume`` (a synthetic
    ellipsoidal brain with the bounding-box proportions of the BraTS 2023 case BraTS-GLI-00001-000), or of a real
    case with ``--case DIR`` (the folder of one BraTS case, any naming) through the bundle's own preprocessing;
    inference.json's ``network`` (``custom.inference.ensemble.SnapshotFlipEnsemble``, ``paper`` ensemble) over one
    checkpoint of random weights, loaded as inference.json's ``run`` loads it, and its ``inferer``
    (``FlipTTAInferer``) with ``--tta`` flips in chunks of ``--tta_chunk``; eager and compiled (the ensemble's
    ``compile``). The anchor runs the same number of flips in
    a plain loop on the full (not cropped) volume, as the anchor bundle does; ``infer_case_ratio`` gives
    cascade/anchor.
``loader``
    samples per second delivered by ``train.json``'s train dataloader (memory cache, ``--workers`` workers) over
    ``--loader_cases`` synthetic cases of ``--volume``, and its ratio to the cascade's measured step rate
    (above 1: the loader keeps up with the GPU).

Memory: on CUDA ``torch.cuda.max_memory_allocated`` over the timed steps (weights, optimizer state and
activations); on CPU the peak resident set size over the timed steps minus the RSS before the models were built
(Linux: ``VmHWM`` reset through ``/proc/self/clear_refs``; elsewhere the increase of ``ru_maxrss``, which misses
peaks below an earlier one). Each line's ``memory_method`` says which.

Each measurement catches its own failure (no compiler, out of memory) and prints a line with ``"error"``.

The configs are those of ``custom.core.runtime.bundle_root()``: ``bundle/configs`` in the repository,
``configs/`` of an unpacked bundle zip, so the benchmark runs from either; their ``label_scheme`` is set to the
default (``brats2018``: 3 output regions, as the anchor's), so no dataset is read to build a network.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from custom.core.labels import DEFAULT_SCHEME
from custom.core.runtime import bundle_root, resolve_device

__all__ = ["MEASURES", "REAL_CASE_BRAIN_FRACTION", "benchmark", "anchor_network", "anchor_loss", "synthetic_brain"]

MEASURES = ("train", "infer", "loader")

#: bounding box of the brain in the BraTS 2023 case BraTS-GLI-00001-000 (140x190x137 of 240x240x155), per axis
REAL_CASE_BRAIN_FRACTION = (140 / 240, 190 / 240, 137 / 155)


def config_dir() -> Path:
    """The bundle's configs: ``bundle/configs`` of the repository or ``configs/`` of the unpacked bundle."""
    return Path(bundle_root()) / "configs"


# ----------------------------------------------------------------------------------------------------------------
# the anchor: MONAI model-zoo brats_mri_segmentation


def anchor_network() -> torch.nn.Module:
    """SegResNet as the model-zoo ``brats_mri_segmentation`` bundle configures it."""
    from monai.networks.nets import SegResNet

    return SegResNet(
        blocks_down=[1, 2, 2, 4], blocks_up=[1, 1, 1], init_filters=16, in_channels=4, out_channels=3, dropout_prob=0.2
    )


def anchor_loss() -> torch.nn.Module:
    """The anchor bundle's loss."""
    from monai.losses import DiceLoss

    return DiceLoss(smooth_nr=0, smooth_dr=1e-5, squared_pred=True, to_onehot_y=False, sigmoid=True)


# ----------------------------------------------------------------------------------------------------------------
# small helpers


def _triple(value, name: str) -> tuple[int, int, int]:
    """``128``, ``(128, 128, 128)`` or ``"240,240,155"`` -> a 3-tuple of ints."""
    if isinstance(value, str):
        value = [v for v in value.replace("x", ",").split(",") if v.strip()]
    if isinstance(value, (int, float)):
        value = (value,) * 3
    value = tuple(int(v) for v in value)
    if len(value) != 3 or min(value) < 1:
        raise ValueError(f"--{name} needs 3 positive sizes (x,y,z), got {value!r}")
    return value  # type: ignore[return-value]


def _measures(value) -> list[str]:
    items = value.split(",") if isinstance(value, str) else list(value)
    items = [str(i).strip() for i in items if str(i).strip()]
    unknown = sorted(set(items) - set(MEASURES))
    if unknown or not items:
        raise ValueError(f"--measures takes a comma-separated subset of {','.join(MEASURES)}, got {value!r}")
    return [m for m in MEASURES if m in items]  # train first: the loader's ratio uses its step rate


def _ceil8(n: int) -> int:
    return -(-int(n) // 8) * 8


def _sig(x: float, digits: int = 4) -> float:
    return float(f"{x:.{digits}g}")


def _device_info(device: torch.device) -> dict:
    info = {"device_type": device.type, "torch": torch.__version__}
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if device.type == "cuda":
        info["device"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    else:
        name = platform.processor()
        if not name and os.path.exists("/proc/cpuinfo"):
            with open("/proc/cpuinfo") as f:
                name = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        info["device"] = f"{name or 'cpu'} ({cores} cores, {torch.get_num_threads()} torch threads)"
    info["cpu_cores"] = cores
    return info


def _describe(error: BaseException, limit: int = 400) -> str:
    """``Type: first line of the message`` (compiler errors run to pages), at most ``limit`` characters."""
    lines = str(error).strip().splitlines() or [""]
    text = f"{type(error).__name__}: {lines[0]}" + (" [...]" if len(lines) > 1 else "")
    return text if len(text) <= limit else text[: limit - 5] + "[...]"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _autocast(device: torch.device, amp: bool):
    if amp:
        return lambda: torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext


def _release(device: torch.device) -> None:
    """Frees what the previous measurement left, so that the next one's memory starts from a clean slate."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with contextlib.suppress(Exception):  # glibc only: hand freed heap memory back to the system
        ctypes.CDLL(None).malloc_trim(0)


class _PeakMemory:
    """Peak memory of the code between ``reset()`` and ``peak_mib()``; see the module docstring."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        _release(device)
        if device.type == "cuda":
            self.method = "cuda max_memory_allocated over the timed steps"
            self.base = 0
        else:
            self.base = self._rss_kib()
            self.method = (
                "cpu peak RSS over the timed steps (VmHWM) minus RSS before the models were built"
                if self.base is not None
                else "cpu ru_maxrss increase (process peak; misses peaks below an earlier one)"
            )
            if self.base is None:
                self.base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    @staticmethod
    def _status(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except OSError:
            return None
        return None

    def _rss_kib(self) -> int | None:
        if self._status("VmRSS") is None:
            return None
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS
        except OSError:
            return None
        return self._status("VmRSS")

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.method.startswith("cpu peak RSS"):
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")

    def peak_mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        if self.method.startswith("cpu peak RSS"):
            return ((self._status("VmHWM") or 0) - self.base) / 1024
        return (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self.base) / 1024


def _case_timing(timing: dict) -> dict:
    """The per-case fields of an inference record from ``_time_calls``' result."""
    return {
        "s_per_case": round(timing["median_s"], 3),
        "s_min": round(timing["min_s"], 3),
        "s_max": round(timing["max_s"], 3),
        "first_call_s": round(timing["first_s"], 3),
        "peak_memory_mib": timing["peak_memory_mib"],
        "memory_method": timing["memory_method"],
    }


def _time_calls(fn: Callable[[], object], calls: int, warmup: int, device: torch.device, memory: _PeakMemory) -> dict:
    """Runs ``fn`` ``warmup`` times, then ``calls - warmup`` timed times; median, min, max seconds and peak memory."""
    times = []
    first = None
    for i in range(calls):
        if i == warmup:
            _sync(device)
            memory.reset()
        start = time.perf_counter()
        fn()
        _sync(device)
        elapsed = time.perf_counter() - start
        if i == 0:
            first = elapsed
        if i >= warmup:
            times.append(elapsed)
    return {
        "median_s": statistics.median(times),
        "min_s": min(times),
        "max_s": max(times),
        "first_s": first,
        "peak_memory_mib": round(memory.peak_mib(), 1),
        "memory_method": memory.method,
    }


def _count_flops(
    build: Callable[[], tuple[torch.nn.Module, torch.nn.Module]], inputs: Sequence[Sequence[int]], device: torch.device
) -> int:
    """FLOPs of forward + loss + backward of ``build()``'s (network, loss) on inputs of shapes ``inputs`` (image,
    target), counted with ``FlopCounterMode`` on the meta device (no compute, no memory), or on ``device`` if some
    operation has no meta kernel."""
    from torch.utils.flop_counter import FlopCounterMode

    for where in (torch.device("meta"), device):
        try:
            with torch.device(where):
                network, loss_fn = build()
                x = torch.randn(*inputs[0])
                y = torch.ones(*inputs[1])
            network.train()
            with FlopCounterMode(display=False) as counter:
                loss_fn(network(x), y).backward()
            return int(counter.get_total_flops())
        except RuntimeError:  # NotImplementedError (no meta kernel) included
            if where == device:
                raise
    raise AssertionError("unreachable")


# ----------------------------------------------------------------------------------------------------------------
# measurements


def _config(name: str):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    path = config_dir() / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the benchmark measures the bundle's own configs")
    parser.read_config(str(path))
    # the paper's 3 regions (as the anchor's 3 outputs), never read from a dataset that may lie at the default path
    parser["label_scheme"] = DEFAULT_SCHEME
    return parser


def _train_models(models: Sequence[str]) -> dict[str, tuple[Callable, float, float]]:
    """model name -> (``build() -> (network, loss)``, Adam lr, weight decay): train.json's for the cascade, the model
    zoo bundle's for the anchor."""
    parser = _config("train.json")
    lr, wd = float(parser["learning_rate"]), float(parser["weight_decay"])
    builders = {
        "cascade": (
            lambda: (
                parser.get_parsed_content("network_def", lazy=False),
                parser.get_parsed_content("loss", lazy=False),
            ),
            lr,
            wd,
        ),
        "anchor": (lambda: (anchor_network(), anchor_loss()), 1e-4, 1e-5),
    }
    return {m: builders[m] for m in models}


def _train_step(
    name: str, mode: str, patch, steps: int, warmup: int, device: torch.device, amp: bool, flops: int
) -> dict:
    make, lr, wd = _train_models([name])[name]
    memory = _PeakMemory(device)
    with torch.device(device):
        network, loss_fn = make()
    network = network.to(device).train()
    loss_fn = loss_fn.to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=lr, weight_decay=wd)
    parameters = sum(p.numel() for p in network.parameters())
    model = torch.compile(network) if mode == "compiled" else network
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, *patch, generator=generator).to(device)
    y = (torch.rand(1, 3, *patch, generator=generator) > 0.5).float().to(device)
    autocast = _autocast(device, amp)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        with autocast():
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    timing = _time_calls(step, steps, warmup, device, memory)
    ms = timing["median_s"] * 1e3
    record = {
        "ms_per_step": round(ms, 3),
        "ms_min": round(timing["min_s"] * 1e3, 3),
        "ms_max": round(timing["max_s"] * 1e3, 3),
        "first_step_s": round(timing["first_s"], 3),
        "flop_per_step": flops,
        "tflop_per_step": flops / 1e12,
        "tflop_per_s": _sig(flops / 1e12 / (ms / 1e3)),
        "peak_memory_mib": timing["peak_memory_mib"],
        "memory_method": timing["memory_method"],
        "parameters": parameters,
    }
    return record  # the models and tensors go with this frame; attempt() then collects them


def synthetic_brain(
    volume: Sequence[int], fraction: Sequence[float] = REAL_CASE_BRAIN_FRACTION, seed: int = 0
) -> torch.Tensor:
    """A 4-channel ``(4, *volume)`` float32 image: positive values inside a centred ellipsoid whose bounding box is
    ``fraction`` of each axis (by default that of the real case: 140x190x137 of 240x240x155, 43 % of the volume
    padded to multiples of 8), zero outside."""
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) - (n - 1) / 2 for n in volume], indexing="ij")
    radii = [max(1.0, f * n / 2) for f, n in zip(fraction, volume)]
    inside = sum((g / r) ** 2 for g, r in zip(grids, radii)) <= 1.0
    generator = torch.Generator().manual_seed(seed)
    values = 100.0 + 1000.0 * torch.rand(4, *volume, generator=generator)
    return values * inside


def _inference_inputs(volume, case: str | None, seed: int) -> dict:
    """The cropped, normalised image the cascade sees (inference.json's preprocessing) and the full volume padded
    to multiples of 8 that the anchor sees; plus their shapes."""
    from monai.data import MetaTensor
    from monai.transforms import CropForegroundd, DivisiblePad, LoadImaged

    preprocessing = _config("inference.json").get_parsed_content("preprocessing")
    start = time.perf_counter()
    if case:
        from custom.inference.inferer import inference_files

        entries = [e for e in inference_files(case) if e["image"]]
        if not entries:
            raise ValueError(f"--case {case}: no complete BraTS case found there.")
        data = {"image": entries[0]["image"]}
        source = entries[0]["case_id"]
    else:
        data = {"image": MetaTensor(synthetic_brain(volume, seed=seed))}
        source = "synthetic ellipsoid brain"
    full = None
    for transform in preprocessing.transforms:
        if isinstance(transform, LoadImaged) and not case:
            continue
        if isinstance(transform, CropForegroundd):
            full = data["image"]
        data = transform(data)
    preprocess_s = time.perf_counter() - start
    image = data["image"].as_tensor() if isinstance(data["image"], MetaTensor) else data["image"]
    full = full.as_tensor() if isinstance(full, MetaTensor) else full
    full = DivisiblePad(k=8)(full)
    full = full.as_tensor() if isinstance(full, MetaTensor) else full
    padded_volume = [_ceil8(n) for n in full.shape[1:]]
    return {
        "image": image[None].contiguous(),
        "full": full[None].contiguous(),
        "source": source,
        "crop": list(image.shape[1:]),
        "full_padded": padded_volume,
        "crop_fraction": _sig(image[0].numel() / float(torch.tensor(padded_volume).prod())),
        "preprocess_s": round(preprocess_s, 3),
    }


def _infer_cascade(
    mode: str, inputs: dict, tta: int, tta_chunk, steps: int, warmup: int, device: torch.device, amp: bool
) -> dict:
    """inference.json's ``network`` (the snapshot-flip ensemble) and ``inferer`` (flip TTA) as its ``run`` uses them,
    over one checkpoint of random weights: the paper ensemble of one ``model.pt`` runs all ``tta`` flips on it."""
    from custom.inference.ensemble import SnapshotFlipEnsemble, flip_chunk_size

    memory = _PeakMemory(device)
    parser = _config("inference.json")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = os.path.join(tmp, "model.pt")
        torch.save(parser.get_parsed_content("network_def", lazy=False).state_dict(), checkpoint)
        overrides = {
            "checkpoints": [checkpoint],
            "tta": int(tta),
            "tta_chunk_size": tta_chunk,
            "device": device,
            "compile": mode == "compiled",
        }
        for key, value in overrides.items():
            parser[key] = value
        network = parser.get_parsed_content("network", lazy=False)
        if not isinstance(network, SnapshotFlipEnsemble):
            raise TypeError(
                f"inference.json's network is a {type(network).__name__}, not the SnapshotFlipEnsemble "
                "that this measurement times"
            )
        network.load()  # as inference.json's run starts: every checkpoint read before the first case
    inferer = parser.get_parsed_content("inferer", lazy=False)
    image = inputs["image"]
    autocast = _autocast(device, amp)

    def call() -> None:
        with torch.inference_mode(), autocast():
            inferer(image.to(device), network)[0].float().cpu()

    timing = _time_calls(call, steps, warmup, device, memory)
    return {
        **_case_timing(timing),
        "tta_chunk_used": flip_chunk_size(tta_chunk, device),
        "ensemble": network.ensemble,
        "forward_passes": network.n_passes,
    }


def _infer_anchor(inputs: dict, tta: int, steps: int, warmup: int, device: torch.device, amp: bool) -> dict:
    from custom.inference.ensemble import FLIP_DIMS

    memory = _PeakMemory(device)
    network = anchor_network().to(device).eval()
    flips = FLIP_DIMS[:tta]
    image = inputs["full"]
    autocast = _autocast(device, amp)

    def call() -> None:
        with torch.inference_mode(), autocast():
            x = image.to(device)
            total = None
            for dims in flips:  # the anchor bundle's way: one flip at a time
                probability = torch.sigmoid(network(torch.flip(x, dims) if dims else x).float())
                probability = torch.flip(probability, dims) if dims else probability
                total = probability if total is None else total.add_(probability)
            (total / len(flips)).cpu()

    return _case_timing(_time_calls(call, steps, warmup, device, memory))


def _loader(volume, patch, workers: int, num_cases: int, min_samples: int, seed: int) -> dict:
    """Samples/s of train.json's train dataloader over synthetic cases, memory cache, ``workers`` workers; times
    ``max(min_samples, training cases)`` samples after the first (which carries the workers' start-up)."""
    from custom.data.synthetic import synthesize

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        synthesize(os.path.join(tmp, "data"), num_cases=num_cases, shape=volume, seed=seed)
        synth_s = time.perf_counter() - start
        parser = _config("train.json")
        overrides = {
            "dataset_dir": os.path.join(tmp, "data"),
            "output_dir": os.path.join(tmp, "run"),
            "cache": "memory",
            "num_workers": int(workers),
            "patch_size": list(patch),
            # caching (not timed) in one thread: MONAI's NibabelReader keeps the file names of its last `read` on
            # the instance, so LoadImaged(keys=[image, label]) in CacheDataset's thread pool sometimes stacks one
            # sequence instead of four when a label is read in between (EnsureSequenceChannelsd then stops the run)
            "train#dataset#num_workers": 1,
        }
        for key, value in overrides.items():
            parser[key] = value
        start = time.perf_counter()
        loader = parser.get_parsed_content("train#dataloader")
        cache_s = time.perf_counter() - start
        n_cases = len(loader.dataset)
        samples = max(int(min_samples), n_cases)
        count, timed_start, first_s = 0, None, None
        start = time.perf_counter()
        while count < samples + 1:
            for batch in loader:
                assert tuple(batch["image"].shape[2:]) == tuple(patch), batch["image"].shape
                count += 1
                if count == 1:  # the first sample carries the workers' start-up
                    first_s = time.perf_counter() - start
                    timed_start = time.perf_counter()
                if count == samples + 1:
                    break
        elapsed = time.perf_counter() - timed_start
        del loader
    return {
        "samples_per_s": _sig(samples / elapsed),
        "timed_samples": samples,
        "first_sample_s": round(first_s, 3),
        "train_cases": n_cases,
        "case_shape": list(volume),
        "synthesize_s": round(synth_s, 2),
        "cache_s": round(cache_s, 2),
        "cache_threads": 1,
    }


# ----------------------------------------------------------------------------------------------------------------
# the command


def benchmark(
    device: str | None = None,
    patch: int | Sequence[int] | str = 128,
    volume: Sequence[int] | str = (240, 240, 155),
    tta: int = 8,
    steps: int = 10,
    measures: str | Sequence[str] = "train,infer,loader",
    compile: bool | None = None,
    amp: bool | None = None,
    tta_chunk: int | None = None,
    case: str | None = None,
    workers: int = 4,
    loader_cases: int = 5,
    warmup: int | None = None,
    output: str | None = None,
    seed: int = 0,
) -> list[dict]:
    """Speed and memory of training, inference and data loading; one JSON line per measurement on stdout.

    Args:
        device: ``cuda`` or ``cpu`` (default: CUDA when present). Nothing shrinks by itself on CPU: pass small sizes.
        patch: training patch size, one number or ``x,y,z`` (divisible by 8).
        volume: full image size of the synthetic inference case and of the loader's synthetic cases.
        tta: flip variants at inference (1 to 8), for the cascade and the anchor alike.
        steps: calls per variant, warm-up included (training steps, inference cases); the loader times
            ``max(steps, training cases)`` samples.
        measures: comma-separated subset of ``train,infer,loader``.
        compile: also measure ``torch.compile``-d networks (default: on CUDA yes, on CPU no).
        amp: bf16 autocast (default: on CUDA yes, on CPU no).
        tta_chunk: flips per network call in ``FlipTTAInferer`` (default: its own, 4 on CUDA, 1 on CPU).
        case: a real BraTS case folder for inference, read through inference.json's preprocessing (``volume``
            then only sizes the loader's synthetic cases).
        workers: train dataloader workers.
        loader_cases: synthetic cases for the loader (train.json's fold 0 of 5 keeps about 4/5 for training).
        warmup: untimed calls of the ``steps`` (default: 0 for 1 step, else ``max(1, steps // 4)``).
        output: a ``.jsonl`` file that the lines are also appended to.
        seed: seed of the synthetic data.

    Returns the records (also printed).
    """
    out = sys.stdout  # the JSON lines; everything else the libraries print goes to stderr
    device = resolve_device(device)
    patch, volume = _triple(patch, "patch"), _triple(volume, "volume")
    selected = _measures(measures)
    steps = int(steps)
    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    warmup = (0 if steps == 1 else max(1, steps // 4)) if warmup is None else int(warmup)
    if not 0 <= warmup < steps:
        raise ValueError(f"--warmup must be between 0 and steps - 1 = {steps - 1}, got {warmup}")
    if not 1 <= int(tta) <= 8:
        raise ValueError(f"--tta must be between 1 and 8, got {tta}")
    compile = device.type == "cuda" if compile is None else bool(compile)
    amp = device.type == "cuda" if amp is None else bool(amp)
    modes = ["eager", "compiled"] if compile else ["eager"]
    base = {
        **_device_info(device),
        "dtype": "bfloat16 autocast" if amp else "float32",
        "settings": {
            "patch": list(patch),
            "volume": list(volume),
            "tta": int(tta),
            "tta_chunk": tta_chunk,
            "steps": steps,
            "warmup": warmup,
            "compile": compile,
            "amp": amp,
            "case": case,
            "workers": int(workers),
            "loader_cases": int(loader_cases),
            "batch": 1,
        },
    }
    records: list[dict] = []

    def emit(record: dict) -> dict:
        record = {**base, **record}
        line = json.dumps(record)
        print(line, file=out, flush=True)
        if output:
            with open(output, "a") as f:
                f.write(line + "\n")
        records.append(record)
        return record

    def attempt(head: dict, work: Callable[[], dict]) -> dict:
        try:
            with contextlib.redirect_stdout(sys.stderr):
                result = work()
            return emit({**head, **result})
        except Exception as e:  # one failed measurement must not stop the others
            return emit({**head, "error": _describe(e)})
        finally:
            _release(device)

    def ratio(measure: str, mode: str, cascade: dict, anchor: dict, keys: dict) -> None:
        head = {"measure": measure, "mode": mode, "of": "cascade / anchor"}
        if "error" in cascade or "error" in anchor:
            emit({**head, "error": "the cascade's or the anchor's measurement failed"})
            return
        emit({**head, **{name: _sig(cascade[k] / anchor[k]) if anchor[k] else None for name, k in keys.items()}})

    step_ms: dict[str, float] = {}
    if "train" in selected:
        results: dict = {}
        flops: dict[str, int] = {}
        for mode in modes:
            for name in ("cascade", "anchor"):
                head = {"measure": "train_step", "model": name, "mode": mode}

                def work(name=name, mode=mode) -> dict:
                    if name not in flops:
                        make = _train_models([name])[name][0]
                        flops[name] = _count_flops(make, [(1, 4, *patch), (1, 3, *patch)], device)
                    return _train_step(name, mode, patch, steps, warmup, device, amp, flops[name])

                results[(name, mode)] = attempt(head, work)
        for mode in modes:
            keys = {"ms_ratio": "ms_per_step", "tflop_ratio": "tflop_per_step", "memory_ratio": "peak_memory_mib"}
            ratio("train_step_ratio", mode, results[("cascade", mode)], results[("anchor", mode)], keys)
            if "ms_per_step" in results[("cascade", mode)]:
                step_ms[mode] = results[("cascade", mode)]["ms_per_step"]

    if "infer" in selected:
        results = {}
        prepared: dict = {}

        def inputs() -> dict:
            if not prepared:
                prepared.update(_inference_inputs(volume, case, seed))
            return prepared

        def shapes() -> dict:
            return {k: prepared[k] for k in ("source", "crop", "full_padded", "crop_fraction", "preprocess_s")}

        for mode in modes:
            head = {"measure": "infer_case", "model": "cascade", "mode": mode, "flips": int(tta)}

            def work(mode=mode) -> dict:
                result = _infer_cascade(mode, inputs(), int(tta), tta_chunk, steps, warmup, device, amp)
                return {"input": "brain crop", **shapes(), **result}

            results[("cascade", mode)] = attempt(head, work)
        head = {"measure": "infer_case", "model": "anchor", "mode": "eager", "flips": int(tta)}
        results[("anchor", "eager")] = attempt(
            head,
            lambda: {
                "input": "full volume, flips in a loop",
                **_infer_anchor(inputs(), int(tta), steps, warmup, device, amp),
                **shapes(),
            },
        )
        for mode in modes:  # the anchor bundle runs eager
            ratio(
                "infer_case_ratio",
                mode,
                results[("cascade", mode)],
                results[("anchor", "eager")],
                {"s_ratio": "s_per_case", "memory_ratio": "peak_memory_mib"},
            )

    if "loader" in selected:
        head = {"measure": "loader", "workers": int(workers)}

        def work() -> dict:
            result = _loader(volume, patch, int(workers), int(loader_cases), steps, seed)
            for mode in modes:
                rate = 1e3 / step_ms[mode] if mode in step_ms else None
                result[f"ratio_to_{mode}_train_steps"] = _sig(result["samples_per_s"] / rate) if rate else None
            if not step_ms:
                result["note"] = "no train_step in this run: add train to --measures for the ratio"
            return result

        attempt(head, work)
    return records
