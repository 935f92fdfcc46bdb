"""Checkpoints that survive crashes: atomic saves, the last N epoch snapshots, resume of the full training state.

One training run owns the top level of its checkpoint folder (``<output_dir>/models``): ``snapshot_epoch=N.pt``
and ``model.pt``. A run that starts fresh (``resume`` false, or nothing to resume) first moves the previous run's
files into ``models/previous_runs/<run id>/`` (nothing is deleted), so pruning, resume and snapshot ensembles of
the folder only ever see one run. Every snapshot records its run id; a resumed run keeps it. Snapshots hold only
tensors and plain Python values, so they load with ``torch.load(..., weights_only=True)`` everywhere.

Every file ``atomic_save`` writes (snapshots, ``model.pt``) carries a SHA-256 checksum of its bytes in the comment
field at the end of its zip archive (``torch.save``'s format; ``torch.load`` and every other reader ignore the
comment, so the content stays a plain checkpoint). ``load_state_dict`` and the resume check it before loading: a
file whose bytes changed (bit rot, a bad copy) is refused with an error naming it, as a truncated file is, and the
resume falls back to the snapshot before it. Files without a checksum (older versions, ``torch.save``) load with a
log line saying they were not verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import secrets
import time
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from custom.core.io import atomic_path
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint

__all__ = [
    "atomic_save",
    "verify_checksum",
    "load_state_dict",
    "list_snapshots",
    "latest_snapshot",
    "start_run",
    "EpochSnapshotSaver",
    "BestModelSaver",
    "ResumeFromLatest",
]

logger = logging.getLogger(__name__)
TRAINING_ONLY = "stage2_trilinear_decoder."  # state-dict prefix of the decoder used only in training
SNAPSHOT_PATTERN = re.compile(r"^snapshot_epoch=(\d+)\.pt$")
BEST_MODEL = "model.pt"  # BestModelSaver's file, part of a run
PREVIOUS_RUNS = "previous_runs"  # where a fresh run moves the files of the run before it


CHECKSUM_TAG = b"brats_cascaded_unet sha256 "  # the zip comment: this tag and 64 hex digits
_CHECKSUM_LENGTH = len(CHECKSUM_TAG) + 64
_END_RECORD = b"PK\x05\x06"  # the zip archive's end-of-central-directory record: 22 bytes and the comment
_CHUNK = 1 << 22


def _sha256(f, length: int) -> str:
    """SHA-256 of the first ``length`` bytes of the open file ``f``."""
    digest, done = hashlib.sha256(), 0
    f.seek(0)
    while done < length:
        block = f.read(min(_CHUNK, length - done))
        if not block:
            break
        digest.update(block)
        done += len(block)
    return digest.hexdigest()


def _add_checksum(path: str) -> None:
    """Writes the SHA-256 of the zip archive ``path`` (up to its comment length field) as its comment."""
    with open(path, "r+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(size - 22)
        end = f.read(22)
        if size < 22 or end[:4] != _END_RECORD or end[20:22] != b"\0\0":
            raise RuntimeError(f"{path} is no zip archive without comment: torch.save wrote an unexpected format")
        checksum = _sha256(f, size - 2)
        f.seek(size - 2)
        f.write(_CHECKSUM_LENGTH.to_bytes(2, "little") + CHECKSUM_TAG + checksum.encode())


def verify_checksum(path: str) -> bool:
    """True when ``path`` carries a checksum (see the module docstring) that matches its bytes, False when it carries
    none (saved by an older version or by ``torch.save``); ``RuntimeError`` naming the file when it does not match."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        start = size - _CHECKSUM_LENGTH - 22
        if start < 0:
            return False
        f.seek(start)
        end = f.read(22 + _CHECKSUM_LENGTH)
        if (
            end[:4] != _END_RECORD
            or int.from_bytes(end[20:22], "little") != _CHECKSUM_LENGTH
            or not end[22:].startswith(CHECKSUM_TAG)
        ):
            return False
        stored = end[22 + len(CHECKSUM_TAG) :].decode(errors="replace")
        if _sha256(f, start + 20) != stored:
            raise RuntimeError(
                f"{path}: its checksum does not match its content (its bytes changed on disk or in a copy since "
                "it was saved); use another copy of it, or remove it"
            )
    return True


def atomic_save(obj: object, path: str) -> str:
    """``torch.save`` to a temporary file in the target folder, a checksum of it in the file (see the module
    docstring), fsync, then ``os.replace`` (``atomic_path``): a crash never leaves a partial file, and a file changed
    later is detected."""
    with atomic_path(path) as tmp_path:
        with open(tmp_path, "wb") as f:
            torch.save(obj, f)
        _add_checksum(tmp_path)
    return path


def _checked(path: str, what: str) -> bool:
    """``verify_checksum`` with the caller's wording: ``RuntimeError`` "<what> <path> cannot be loaded: ..."."""
    try:
        return verify_checksum(path)
    except RuntimeError as e:
        raise RuntimeError(f"{what} {path} cannot be loaded: {str(e)[len(path) + 2:]}") from None
    except OSError:
        return True  # unreadable: torch.load says why


def _unverified(path: str, what: str) -> None:
    logger.info(f"{what} {path} has no checksum (saved by an older version or by torch.save): loaded unverified")


def list_snapshots(ckpt_dir: str) -> list[tuple[int, str]]:
    """``(epoch, path)`` of every ``snapshot_epoch=N.pt`` in ``ckpt_dir``, oldest first: the snapshots of the
    current (latest) run, since a fresh run moves older runs' files to ``previous_runs/``."""
    if not os.path.isdir(ckpt_dir):
        return []
    found = [
        (int(m.group(1)), os.path.join(ckpt_dir, name))
        for name in os.listdir(ckpt_dir)
        if (m := SNAPSHOT_PATTERN.match(name))
    ]
    return sorted(found)


def latest_snapshot(ckpt_dir: str) -> str | None:
    snapshots = list_snapshots(ckpt_dir)
    return snapshots[-1][1] if snapshots else None


def load_state_dict(path: str, map_location: str | torch.device = "cpu") -> dict:
    """The network weights of a checkpoint file: a plain state dict or a training snapshot's ``"model"`` entry.

    Checks the file's checksum (when it has one) and loads with ``weights_only=True``; errors name the file and say
    what to do.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"checkpoint {path} does not exist: train first or set `checkpoints` to existing files."
        )
    verified = _checked(path, "checkpoint")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # unpickling errors, truncated files
        raise RuntimeError(
            f"checkpoint {path} could not be loaded ({type(e).__name__}: {e}); is it a complete .pt file?"
        ) from e
    if not verified:
        _unverified(path, "checkpoint")
    if isinstance(content, Mapping) and "model" in content and isinstance(content["model"], Mapping):
        content = content["model"]
    if not isinstance(content, Mapping) or not all(isinstance(v, torch.Tensor) for v in content.values()):
        raise RuntimeError(f"checkpoint {path} holds no state dict of network weights.")
    return dict(content)


def _rng_state() -> dict:
    """The RNG states as tensors and plain Python values (``weights_only`` loading rejects numpy arrays)."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state(legacy=True)
    state = {
        "python": random.getstate(),  # (version, tuple of ints, float or None)
        "numpy": {
            "name": name,
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached_gaussian),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    numpy_state = state["numpy"]
    keys = np.asarray(numpy_state["keys"], dtype=np.int64).astype(np.uint32)
    np.random.set_state(
        (numpy_state["name"], keys, numpy_state["pos"], numpy_state["has_gauss"], numpy_state["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _new_run_id() -> str:
    """``YYYYmmdd-HHMMSS-xxxxxx``: sortable by start time, unique thanks to the random tail."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"


def _read_snapshot(path: str, map_location: str | torch.device = "cpu") -> dict:
    """A training snapshot loaded with ``weights_only=True``; ``RuntimeError`` naming the file when it is truncated,
    unreadable, fails its checksum, holds anything but tensors and plain values (a planted pickle), or is no training
    snapshot."""
    verified = _checked(path, "snapshot")
    try:
        content = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, unpickling refused, I/O error
        raise RuntimeError(f"snapshot {path} cannot be loaded with weights_only=True ({type(e).__name__}: {e})") from e
    if not verified:
        _unverified(path, "snapshot")
    if not isinstance(content, Mapping) or not {"model", "trainer"} <= set(content):
        raise RuntimeError(f"snapshot {path} is no training snapshot (no 'model' and 'trainer' entries)")
    return dict(content)


def _run_id_of(paths: Sequence[str]) -> str | None:
    """The run id recorded in the newest readable snapshot of ``paths`` (oldest first)."""
    for path in reversed(paths):
        try:
            run_id = torch.load(path, map_location="cpu", weights_only=True, mmap=True).get("run_id")
        except Exception:
            continue
        if isinstance(run_id, str) and run_id and os.path.basename(run_id) == run_id and ".." not in run_id:
            return run_id
    return None


def start_run(ckpt_dir: str, best_model: str = BEST_MODEL) -> str:
    """Starts a new run in ``ckpt_dir`` and returns its run id.

    The files of the run before it (its ``snapshot_epoch=N.pt`` and ``best_model``) are moved, never deleted, to
    ``ckpt_dir/previous_runs/<its run id>/``, so that the new run's pruning cannot delete them and a later resume
    or snapshot ensemble of ``ckpt_dir`` cannot pick them up. Call it on one process only (rank 0).
    """
    os.makedirs(ckpt_dir, exist_ok=True)
    snapshots = [path for _, path in list_snapshots(ckpt_dir)]
    best = os.path.join(ckpt_dir, best_model)
    previous = snapshots + ([best] if os.path.isfile(best) else [])
    if previous:
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(max(os.path.getmtime(p) for p in previous)))
        name = _run_id_of(snapshots) or f"{stamp}-unnamed"
        target = os.path.join(ckpt_dir, PREVIOUS_RUNS, name)
        suffix = 1
        while os.path.exists(target):
            suffix += 1
            target = os.path.join(ckpt_dir, PREVIOUS_RUNS, f"{name}.{suffix}")
        os.makedirs(target)
        for path in previous:
            os.replace(path, os.path.join(target, os.path.basename(path)))
        logger.warning(
            f"new run in {ckpt_dir}: moved the previous run's {len(previous)} checkpoint file(s) to {target}"
        )
    return _new_run_id()


def _validator_state(validator: Engine | None) -> dict | None:
    if validator is None:
        return None
    state = validator.state
    best_metric = getattr(state, "best_metric", None)
    return {
        "key_metric_name": str(getattr(state, "key_metric_name", None) or ""),
        "best_metric": float(best_metric) if best_metric is not None else None,
        "best_metric_epoch": int(getattr(state, "best_metric_epoch", -1)),
    }


class EpochSnapshotSaver:
    """Saves ``snapshot_epoch=N.pt`` after every epoch and keeps the last ``n_saved`` of the current run.

    Each snapshot holds the objects of ``save_dict`` (network, optimizer, LR scheduler), the state of the trainer
    it is attached to (epoch and iteration counters, and its AMP ``scaler`` when it has one), the RNG states, the
    run id and, with ``validator``, the validator's best key metric (so a resume does not take its first
    validation for a new best), so it serves both resume and the paper's snapshot ensemble of the last epochs.
    Attach it after ``ResumeFromLatest`` (which sets the run id, or starts a new run) and after
    ``LrScheduleHandler`` so the saved schedule has stepped; without a run id it starts a new run itself
    (``start_run``). With ``rank`` other than 0 (distributed training) it does nothing.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: Mapping[str, object],
        n_saved: int = 8,
        rank: int = 0,
        validator: Engine | None = None,
    ) -> None:
        if n_saved < 1:
            raise ValueError(f"n_snapshots must be at least 1 (it keeps the resume point), got {n_saved}.")
        self.save_dir, self.save_dict, self.n_saved, self.rank = save_dir, save_dict, n_saved, rank
        self.validator = validator

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self.start)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def start(self, engine: Engine) -> None:
        if self.rank == 0 and not getattr(engine.state, "run_id", None):
            engine.state.run_id = start_run(self.save_dir)

    def __call__(self, engine: Engine) -> None:
        if self.rank != 0:
            return
        if not getattr(engine.state, "run_id", None):  # called without attach()
            self.start(engine)
        state = {key: _unwrap(obj).state_dict() for key, obj in self.save_dict.items() if obj is not None}
        state["trainer"] = engine.state_dict()
        if getattr(engine, "scaler", None) is not None:  # AMP's GradScaler of MONAI's SupervisedTrainer
            state["scaler"] = engine.scaler.state_dict()
        state["rng"] = _rng_state()
        state["run_id"] = engine.state.run_id
        if self.validator is not None:
            state["validator"] = _validator_state(self.validator)
        atomic_save(state, os.path.join(self.save_dir, f"snapshot_epoch={engine.state.epoch}.pt"))
        for _, old in list_snapshots(self.save_dir)[: -self.n_saved]:  # only this run's files are at the top level
            os.remove(old)


class BestModelSaver:
    """Writes the network weights to ``filename`` (atomically) whenever the validator's key metric improves.

    The file is the inference model: the training-only trilinear decoder is left out, so it loads strictly into
    the ``network_def`` of inference.json (and MONAI Label, ``ckpt_export``).
    Attach to the validation evaluator. The previous best survives any crash during a save; after a resume the
    best metric so far comes back from the snapshot (``ResumeFromLatest(validator=...)``), so only a better
    validation replaces the file.
    """

    def __init__(self, save_dir: str, network: torch.nn.Module, filename: str = BEST_MODEL, rank: int = 0) -> None:
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
    """At the trainer's start, restores the latest readable snapshot of ``ckpt_dir``: weights, optimizer, LR
    schedule, AMP scaler, trainer state (epoch and iteration counters), RNG states, the run id and, with
    ``validator``, the validator's best metric, so that an interrupted run (even one killed with SIGKILL)
    continues at the next epoch, ends at the configured ``max_epochs`` and replaces ``model.pt`` only with a
    better model.

    Snapshots load with ``weights_only=True``. One that cannot be read (truncated, or holding code) is named in
    a warning and the one before it is used. With ``enabled=False``, or nothing to resume, a new run starts
    (``start_run``: the previous run's files move to ``previous_runs/``); with ``rank`` other than 0 it only
    restores, and leaves the files to rank 0.
    """

    def __init__(
        self,
        ckpt_dir: str,
        load_dict: Mapping[str, object],
        enabled: bool = True,
        map_location: str = "cpu",
        validator: Engine | None = None,
        rank: int = 0,
    ) -> None:
        self.ckpt_dir, self.load_dict, self.enabled, self.map_location = ckpt_dir, load_dict, enabled, map_location
        self.validator, self.rank = validator, rank

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def _latest_readable(self) -> tuple[str, dict] | None:
        snapshots = list_snapshots(self.ckpt_dir)
        failures = []
        for _, path in reversed(snapshots):
            try:
                return path, _read_snapshot(path, self.map_location)
            except RuntimeError as e:
                failures.append(str(e))
                logger.warning(f"{e}; resuming from the snapshot before it instead")
        if failures:
            raise RuntimeError(
                f"no snapshot in {self.ckpt_dir} can be resumed from: {'; '.join(failures)}. Start a new run with "
                "--resume false (it moves these files to previous_runs/), or remove the bad files."
            )
        return None

    def __call__(self, engine: Engine) -> None:
        found = self._latest_readable() if self.enabled else None
        if found is None:
            if self.rank == 0:
                engine.state.run_id = start_run(self.ckpt_dir)
                logger.info(f"new run {engine.state.run_id} in {self.ckpt_dir}")
            return
        path, checkpoint = found
        max_epochs = engine.state.max_epochs
        objects = {key: _unwrap(obj) for key, obj in self.load_dict.items() if obj is not None and key in checkpoint}
        objects["trainer"] = engine
        if getattr(engine, "scaler", None) is not None and "scaler" in checkpoint:
            objects["scaler"] = engine.scaler
        try:
            Checkpoint.load_objects(to_load=objects, checkpoint=checkpoint)
        except (RuntimeError, KeyError, ValueError, TypeError) as e:
            raise RuntimeError(
                f"snapshot {path} does not fit this training ({type(e).__name__}: {str(e)[:300]}): resume with the "
                "settings it was trained with, or start a new run with --resume false."
            ) from e
        if "rng" in checkpoint:
            _set_rng_state(checkpoint["rng"])
        best = checkpoint.get("validator")
        best_note = ""
        if self.validator is not None and best and best.get("best_metric") is not None:
            self.validator.state.best_metric = best["best_metric"]
            self.validator.state.best_metric_epoch = best["best_metric_epoch"]
            best_note = (
                f", best {best['key_metric_name']} {best['best_metric']:.4f} at epoch {best['best_metric_epoch']}"
            )
        engine.state.run_id = checkpoint.get("run_id") or _new_run_id()  # snapshots of older versions had none
        engine.state.max_epochs = max_epochs  # a resumed run ends at the epoch count configured now
        logger.info(
            f"resumed from {path} (run {engine.state.run_id}): "
            f"epoch {engine.state.epoch} of {max_epochs} done{best_note}"
        )


def _unwrap(obj: object) -> object:
    """The module inside DistributedDataParallel / torch.compile wrappers, so state dict keys stay portable."""
    obj = getattr(obj, "module", obj) if isinstance(obj, torch.nn.parallel.DistributedDataParallel) else obj
    return getattr(obj, "_orig_mod", obj)
