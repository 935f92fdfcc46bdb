"""Checkpoints that survive crashes: atomic saves, the last N epoch snapshots, resume of the full training state."""

from __future__ import annotations

import logging
import os
import random
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

from custom.io import atomic_path

__all__ = [
    "atomic_save",
    "load_state_dict",
    "list_snapshots",
    "latest_snapshot",
    "resolve_checkpoints",
    "EpochSnapshotSaver",
    "BestModelSaver",
    "ResumeFromLatest",
]

logger = logging.getLogger(__name__)
TRAINING_ONLY = "stage2_trilinear_decoder."  # state-dict prefix of the decoder used only in training
SNAPSHOT_PATTERN = re.compile(r"^snapshot_epoch=(\d+)\.pt$")


def atomic_save(obj: object, path: str) -> str:
    """``torch.save`` to a temporary file in the target folder, then ``os.replace``: a crash never leaves a partial file."""
    with atomic_path(path) as tmp_path, open(tmp_path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    return path


def list_snapshots(ckpt_dir: str) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every ``snapshot_epoch=N.pt`` in ``ckpt_dir``, oldest first."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [(int(m.group(1)), os.path.join(ckpt_dir, name)) for name in os.listdir(ckpt_dir) if (m := SNAPSHOT_PATTERN.match(name))]
    return sorted(found)


def latest_snapshot(ckpt_dir: str) -> str | None:
    snapshots = list_snapshots(ckpt_dir)
    return snapshots[-1][1] if snapshots else None


def load_state_dict(path: str, map_location: str | torch.device = "cpu") -> dict:
    """The network weights of a checkpoint file: a plain state dict or a training snapshot's ``"model"`` entry.

    Loads with ``weights_only=True``; errors name the file and say what to do.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist: train first or set `checkpoints` to existing files.")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, truncated files
        raise RuntimeError(f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); is it a complete .pt file?") from e
    if isinstance(content, Mapping) and "model" in content and isinstance(content["model"], Mapping):
        content = content["model"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise RuntimeError(f"checkpoint {path} holds no state dict of network weights.")
    return dict(content)


def resolve_checkpoints(checkpoints: str | Sequence[str], base_dir: str | None = None) -> list[str]:
    """Expands ``checkpoints`` (a path, a list of paths, glob patterns, or a folder of snapshots) to existing files."""
    import glob

    items = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints)
    resolved: list[str] = []
    for item in items:
        item = str(item)
        if base_dir and not os.path.isabs(item) and not os.path.exists(item):
            item = os.path.join(base_dir, item)
        if os.path.isdir(item):
            snapshots = [p for _, p in list_snapshots(item)]
            if not snapshots:
                raise FileNotFoundError(f"checkpoint folder {item} holds no snapshot_epoch=N.pt files.")
            resolved.extend(snapshots)
        elif any(c in item for c in "*?["):
            matches = sorted(glob.glob(item))
            if not matches:
                raise FileNotFoundError(f"checkpoint pattern {item} matches no file.")
            resolved.extend(matches)
        else:
            if not os.path.isfile(item):
                raise FileNotFoundError(
                    f"checkpoint {item} does not exist: train first, or pass --checkpoints with existing files."
                )
            resolved.append(item)
    if not resolved:
        raise ValueError("`checkpoints` is empty: give at least one checkpoint file.")
    return resolved


def _rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class EpochSnapshotSaver:
    """Saves ``snapshot_epoch=N.pt`` after every epoch and keeps the last ``n_saved``.

    Each snapshot holds the objects of ``save_dict`` (network, optimizer, LR scheduler), the state of the trainer
    it is attached to (epoch and iteration counters, and its AMP ``scaler`` when it has one) and the RNG states, so it serves both resume and
    the paper's snapshot ensemble of the last epochs. Attach it after ``LrScheduleHandler`` so the saved schedule
    has stepped; with ``rank`` other than 0 (distributed training) it does nothing.
    """

    def __init__(self, save_dir: str, save_dict: Mapping[str, object], n_saved: int = 8, rank: int = 0) -> None:
        if n_saved < 1:
            raise ValueError(f"n_snapshots must be at least 1 (it keeps the resume point), got {n_saved}.")
        self.save_dir, self.save_dict, self.n_saved, self.rank = save_dir, save_dict, n_saved, rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.rank != 0:
            return
        state = {key: _unwrap(obj).state_dict() for key, obj in self.save_dict.items() if obj is not None}
        state["trainer"] = engine.state_dict()
        if getattr(engine, "scaler", None) is not None:  # AMP's GradScaler of MONAI's SupervisedTrainer
            state["scaler"] = engine.scaler.state_dict()
        state["rng"] = _rng_state()
        atomic_save(state, os.path.join(self.save_dir, f"snapshot_epoch={engine.state.epoch}.pt"))
        for _, old in list_snapshots(self.save_dir)[: -self.n_saved]:
            os.remove(old)


class BestModelSaver:
    """Writes the network weights to ``filename`` (atomically) whenever the validator's key metric improves.

    The file is the inference model: the training-only trilinear decoder is left out, so it loads strictly into
    the ``network_def`` of inference.json (and MONAI Label, ``ckpt_export``).
    Attach to the validation evaluator. The previous best survives any crash during a save.
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = "model.pt", rank: int = 0) -> None:
        self.path = os.path.join(save_dir, filename)
        self.network, self.rank = network, rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.rank != 0 or engine.state.best_metric_epoch != engine.state.epoch:
            return
        weights = {k: v for k, v in _unwrap(self.network).state_dict().items() if not k.startswith(TRAINING_ONLY)}
        atomic_save(weights, self.path)
        logger.info(f"new best {engine.state.key_metric_name}={engine.state.best_metric:.4f}: saved {self.path}")


class ResumeFromLatest:
    """At the trainer's start, restores the latest snapshot of ``ckpt_dir``: weights, optimizer, LR schedule, AMP
    scaler, trainer state (epoch and iteration counters) and RNG states, so that an interrupted run (even one
    killed with SIGKILL) continues at the next epoch and ends at the configured ``max_epochs``.
    """

    def __init__(self, ckpt_dir: str, load_dict: Mapping[str, object], enabled: bool = True, map_location: str = "cpu") -> None:
        self.ckpt_dir, self.load_dict, self.enabled, self.map_location = ckpt_dir, load_dict, enabled, map_location

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        path = latest_snapshot(self.ckpt_dir) if self.enabled else None
        if path is None:
            return
        max_epochs = engine.state.max_epochs
        checkpoint = torch.load(path, map_location=self.map_location, weights_only=False)
        objects = {key: _unwrap(obj) for key, obj in self.load_dict.items() if obj is not None and key in checkpoint}
        objects["trainer"] = engine
        if getattr(engine, "scaler", None) is not None and "scaler" in checkpoint:
            objects["scaler"] = engine.scaler
        Checkpoint.load_objects(to_load=objects, checkpoint=checkpoint)
        if "rng" in checkpoint:
            _set_rng_state(checkpoint["rng"])
        engine.state.max_epochs = max_epochs  # a resumed run ends at the epoch count configured now
        logger.info(f"resumed from {path}: epoch {engine.state.epoch} of {max_epochs} done")


def _unwrap(obj: object) -> object:
    """The module inside DistributedDataParallel / torch.compile wrappers, so state dict keys stay portable."""
    obj = getattr(obj, "module", obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
    return getattr(obj, "_orig_mod", obj)
