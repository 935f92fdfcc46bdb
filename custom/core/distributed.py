"""Helpers for distributed training with torchrun (multi_gpu_train.json): rank-0 logging and per-rank shard reports."""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch.distributed as dist
from ignite.engine import Engine, Events

__all__ = ["rank_and_world_size", "log_on_rank_zero", "ShardLogger"]

logger = logging.getLogger(__name__)


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, world size)`` of the default process group, ``(0, 1)`` outside distributed runs."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def log_on_rank_zero(rank: int) -> None:
    """On ranks other than 0, raises the root logger to WARNING so that INFO logs appear once (from rank 0);
    warnings and errors of every rank still show, and so do the per-rank lines of :class:`ShardLogger`."""
    if int(rank) != 0:
        logging.getLogger().setLevel(logging.WARNING)
        logger.setLevel(logging.INFO)


def _case_ids(batch: object, key: str) -> list[str]:
    """Case ids of a collated batch (a dict of lists) or of a decollated one (a list of dicts)."""
    if isinstance(batch, Mapping):
        ids = batch.get(key, [])
    else:
        ids = [item.get(key) for item in batch or [] if isinstance(item, Mapping)]
    return [ids] if isinstance(ids, str) else [str(i) for i in ids if i is not None]


class ShardLogger:
    """Logs, at the end of each epoch, which cases this rank processed: ``rank R/W trained on N cases in epoch E:
    ids`` (``action`` names the verb). Attached to an evaluator, the line also gives each metric with the number
    of cases it covers after MONAI's all-gather across ranks, which must equal the whole validation set.

    The id list is logged when it differs from the previous epoch's (a fixed data partition logs it once).
    """

    def __init__(self, action: str = "trained on", key: str = "case_id") -> None:
        self.action, self.key = action, key
        self._seen: list[str] = []
        self._previous: list[str] | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, engine: Engine) -> None:
        self._seen = []

    def _collect(self, engine: Engine) -> None:
        self._seen.extend(_case_ids(engine.state.batch, self.key))

    def __call__(self, engine: Engine) -> None:
        rank, world_size = rank_and_world_size()
        ids = sorted(self._seen)
        message = f"rank {rank}/{world_size} {self.action} {len(ids)} cases in epoch {engine.state.epoch}"
        message += f": {', '.join(ids)}" if ids != self._previous else " (the same as before)"
        details = getattr(engine.state, "metric_details", None) or {}
        metrics = [
            f"{name} {value:.6f} over {len(details[name]) if name in details else '?'} cases"
            for name, value in engine.state.metrics.items()
            if isinstance(value, (int, float))
        ]
        if metrics:
            message += "; all ranks: " + ", ".join(metrics)
        self._previous = ids
        logger.info(message)
