"""Small pieces train.json wires into MONAI's engines: per-region metric views and the CPU memory layout."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from custom.core.naming import REGION_NAMES
from monai.handlers import from_engine

__all__ = ["RegionOutput", "fastest_memory_format"]


class RegionOutput:
    """``output_transform`` for a metric handler that looks at one region channel of ``pred`` and ``label``."""

    def __init__(self, region: int | str, keys: Sequence[str] = ("pred", "label")) -> None:
        self.index = REGION_NAMES.index(region) if isinstance(region, str) else int(region)
        self.keys = list(keys)

    def __call__(self, output):
        preds, labels = from_engine(self.keys)(output)
        i = self.index
        return [p[i : i + 1] for p in preds], [y[i : i + 1] for y in labels]


def fastest_memory_format(
    network: torch.nn.Module,
    patch_size: Sequence[int],
    batch_size: int = 1,
    in_channels: int = 4,
    device: str | torch.device = "cpu",
    repeats: int = 2,
    memory_format: str = "auto",
) -> torch.nn.Module:
    """``network`` in the memory layout that trains fastest on this CPU: PyTorch's CPU 3-D convolutions take
    different kernels for NCDHW and channels-last (NDHWC) tensors, and which is faster depends on the CPU family and
    the sizes (on a 2-core AMD EPYC (AVX2), a demo step took 1.13 s channels-last and 1.50 s NCDHW). The choice is made at
    run time by timing ``repeats`` forward and backward passes of a random batch in both layouts, so nobody has to
    pick it per machine. The network is converted in place (its parameters stay the optimizer's), at the start of
    the run rather than when the config is parsed. On CUDA the network is returned unchanged (NCDHW).
    ``memory_format`` ``contiguous`` or ``channels_last`` (train.json's key) skips the timing and uses that layout."""
    import logging
    import time

    device = torch.device(device)
    if device.type != "cpu" or isinstance(network, torch.nn.parallel.DistributedDataParallel):
        return network  # GPUs keep NCDHW; a DDP probe would run collectives
    fixed = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last_3d}
    if memory_format in fixed:  # chosen by the user: no probe (it costs about 4 training steps)
        return network.to(memory_format=fixed[memory_format])
    if memory_format != "auto":
        raise ValueError(f"memory_format must be 'auto', 'contiguous' or 'channels_last', got {memory_format!r}")
    batch = torch.randn(int(batch_size), int(in_channels), *[int(s) for s in patch_size])
    was_training = network.training
    network.train()
    timings = {}
    for layout in (torch.contiguous_format, torch.channels_last_3d):
        network = network.to(memory_format=layout)
        inputs = batch.contiguous(memory_format=layout)
        best = float("inf")
        for _ in range(max(1, int(repeats))):
            start = time.perf_counter()
            outputs = network(inputs)
            sum(o.float().mean() for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])).backward()
            best = min(best, time.perf_counter() - start)
        timings[layout] = best
    network.zero_grad(set_to_none=True)
    chosen = min(timings, key=timings.get)
    network = network.to(memory_format=chosen).train(was_training)
    names = {torch.contiguous_format: "NCDHW", torch.channels_last_3d: "channels-last"}
    logging.getLogger(__name__).info(
        "memory layout: "
        + ", ".join(f"{names[k]} {v * 1000:.0f} ms" for k, v in timings.items())
        + f" per forward+backward of a {tuple(batch.shape)} batch; training in {names[chosen]}"
    )
    return network
