"""Which network sees which flip: the paper's snapshot-flip ensemble, and the flip-TTA ensembles of any checkpoints.

Section 3.3 of Jiang et al.: the weights of the last eight epochs are kept and each snapshot predicts the case under a
different flip; the eight flipped-back probability maps are averaged (8 forward passes in all). ``ensemble`` picks:

- ``"paper"``: per snapshot set, its last ``n_snapshots`` snapshots; pass ``i`` runs snapshot ``i mod k`` on flip
  ``i mod tta`` (``k`` snapshots in the set), ``max(k, tta)`` passes. With 8 snapshots and 8 flips that is the paper's
  snapshot ``i`` on flip ``i``. With fewer snapshots than flips every flip is still used once and the snapshots take
  turns (a single ``model.pt`` gets all ``tta`` flips); with more snapshots than flips every snapshot runs once and the
  flips take turns.
- ``"all"``: every checkpoint with every one of the ``tta`` flips (``checkpoints x tta`` passes).
- ``"best"``: the best-validation ``model.pt`` of each folder (or each file given) with the ``tta`` flips.

A snapshot set is one entry of ``checkpoints``: a training output folder (its ``snapshot_epoch=N.pt`` files, or its
``model.pt`` when it holds none), a glob, or a list of files; a single file is a set of one. Folds or trainings
combine by listing one entry each; all passes of all sets are averaged with equal weight.
"""

from __future__ import annotations

import copy
import glob
import logging
import os
from collections.abc import Callable, Sequence

import torch
from custom.core.errors import WeightsNotFound
from custom.model.checkpoints import BEST_MODEL, SNAPSHOT_PATTERN, TRAINING_ONLY, list_snapshots, load_state_dict
from monai.data import MetaTensor

__all__ = [
    "FLIP_DIMS",
    "ENSEMBLES",
    "BEST_MODEL",
    "snapshot_sets",
    "plan_passes",
    "load_weights",
    "flip_chunk_size",
    "sum_flipped_probabilities",
    "SnapshotFlipEnsemble",
    "metrics_csv_name",
]

logger = logging.getLogger(__name__)

# The 8 flip combinations of the 3 spatial axes of a (B, C, H, W, D) tensor, identity first; ``tta=k`` uses the first k.
# Inference flips the case on its canonical grid (``custom.data.transforms.CanonicalGeometryd``: one orientation, the
# training voxel size), so flip i mirrors the same anatomical axes in every case, whatever its file's orientation.
FLIP_DIMS: tuple[tuple[int, ...], ...] = ((), (2,), (3,), (4,), (2, 3), (2, 4), (3, 4), (2, 3, 4))
ENSEMBLES = ("paper", "all", "best")
_NO_WEIGHTS = "train first or pass --checkpoints (files, training output folders of snapshots, or globs)"


def _check_choice(ensemble: str, tta: int) -> None:
    if ensemble not in ENSEMBLES:
        raise ValueError(f"`ensemble` must be one of {', '.join(ENSEMBLES)}, got {ensemble!r}.")
    if not 1 <= int(tta) <= len(FLIP_DIMS):
        raise ValueError(f"`tta` (flips) must be between 1 and {len(FLIP_DIMS)}, got {tta}.")


def _epoch_order(paths: list[str]) -> list[str]:
    """Snapshot files oldest first (by the epoch in their name; ``epoch=10`` after ``epoch=9``), other files by name."""
    return sorted(
        paths, key=lambda p: (int(m.group(1)), p) if (m := SNAPSHOT_PATTERN.match(os.path.basename(p))) else (-1, p)
    )


def _existing(path: str) -> str:
    if not os.path.isfile(path):
        raise WeightsNotFound(f"checkpoint {path} does not exist: {_NO_WEIGHTS}.")
    return path


def _folder_set(folder: str, ensemble: str) -> list[str]:
    best = os.path.join(folder, BEST_MODEL)
    if ensemble == "best":
        if not os.path.isfile(best):
            raise WeightsNotFound(f"{folder} holds no {BEST_MODEL} (the best-validation weights): {_NO_WEIGHTS}.")
        return [best]
    snapshots = [path for _, path in list_snapshots(folder)]
    if snapshots:
        return snapshots
    if os.path.isfile(best):
        logger.info(f"{folder} holds no snapshot_epoch=N.pt files: its {BEST_MODEL} is the snapshot set")
        return [best]
    raise WeightsNotFound(f"{folder} holds neither snapshot_epoch=N.pt files nor {BEST_MODEL}: {_NO_WEIGHTS}.")


def snapshot_sets(
    checkpoints: str | os.PathLike | Sequence,
    ensemble: str = "paper",
    n_snapshots: int = 8,
    base_dir: str | None = None,
) -> list[list[str]]:
    """The checkpoint files of each entry of ``checkpoints`` (one snapshot set per entry), checked to exist.

    ``paper`` keeps the last ``n_snapshots`` of each set (oldest first); ``all`` keeps every file; ``best`` takes the
    ``model.pt`` of a folder (a file or glob entry is used as given). Relative paths that do not exist are looked up
    under ``base_dir``. Errors name the entry and say what to do.
    """
    _check_choice(ensemble, 1)
    if int(n_snapshots) < 1:
        raise ValueError(f"`n_snapshots` must be at least 1, got {n_snapshots}.")
    entries = [checkpoints] if isinstance(checkpoints, (str, os.PathLike)) else list(checkpoints or [])
    if not entries:
        raise ValueError(f"`checkpoints` is empty: {_NO_WEIGHTS}.")
    sets = []
    for entry in entries:
        items = [entry] if isinstance(entry, (str, os.PathLike)) else list(entry)
        files: list[str] = []
        for item in items:
            item = str(item)
            if base_dir and not os.path.isabs(item) and not os.path.exists(item):
                item = os.path.join(base_dir, item)
            if os.path.isdir(item):
                files += _folder_set(item, ensemble)
            elif any(c in item for c in "*?["):
                matches = _epoch_order(glob.glob(item))
                if not matches:
                    raise WeightsNotFound(f"checkpoint pattern {item} matches no file: {_NO_WEIGHTS}.")
                files += matches
            else:
                files.append(_existing(item))
        if not files:
            raise ValueError(f"`checkpoints` entry {entry!r} names no file: {_NO_WEIGHTS}.")
        sets.append(files[-int(n_snapshots) :] if ensemble == "paper" else files)
    return sets


def plan_passes(
    sets: Sequence[Sequence[str]], ensemble: str = "paper", tta: int = 8
) -> list[tuple[str, tuple[int, ...]]]:
    """``(checkpoint, flip dims)`` of every forward pass, in order (see the module docstring for the rule)."""
    _check_choice(ensemble, tta)
    flips = FLIP_DIMS[: int(tta)]
    passes = []
    for files in sets:
        if ensemble == "paper":
            n = max(len(files), len(flips))
            passes += [(files[i % len(files)], flips[i % len(flips)]) for i in range(n)]
        else:  # all, best: every file of the set with every flip
            passes += [(path, dims) for path in files for dims in flips]
    return passes


def _head_mismatch(network: torch.nn.Module, state: dict) -> str | None:
    """What to set when the checkpoint's output heads are not the kind ``network`` builds (see ``CascadedUNet``)."""
    preactivated_file = any(k.endswith("head.0.weight") for k in state)
    preactivated_net = any(k.endswith("head.0.weight") for k in network.state_dict())
    if preactivated_file == preactivated_net or not any(".head." in k for k in state):
        return None
    if preactivated_file:
        return (
            "it has the pre-activated output heads (GroupNorm-ReLU before the Conv1) that this bundle trained "
            "before its heads followed Tables 1-2: set `network_def#preactivated_head` to true"
        )
    return "it has the tables' Conv1 output heads: set `network_def#preactivated_head` to false"


def load_weights(network: torch.nn.Module, path: str) -> None:
    """Strict loading, except for the training-only trilinear decoder, which is never used in eval mode: it may
    be absent from the file (``model.pt`` is saved without it) or from the network (inference.json builds none)."""
    hint = "was it trained with other `network_def` settings (init_filters, blocks_down, blocks_up)? Use those here."
    state = load_state_dict(path)
    head = _head_mismatch(network, state)
    if head:
        raise RuntimeError(f"checkpoint {path} does not fit `network_def`: {head}.")
    try:
        result = network.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches
        detail = str(e).splitlines()[1].strip()
        raise RuntimeError(f"checkpoint {path} does not fit `network_def` ({detail}); {hint}") from e
    missing = [k for k in result.missing_keys if not k.startswith(TRAINING_ONLY)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(TRAINING_ONLY)]
    if missing or unexpected:
        raise RuntimeError(
            f"checkpoint {path} does not fit `network_def` ({len(missing)} missing weights, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]}); {hint}"
        )


def flip_chunk_size(chunk_size: int | None, device: torch.device) -> int:
    """Flipped copies per forward pass: ``chunk_size``, or 4 on CUDA (fits a whole brain crop) and 1 on CPU."""
    return max(1, int(chunk_size)) if chunk_size else (4 if torch.device(device).type == "cuda" else 1)


def sum_flipped_probabilities(
    inputs: torch.Tensor,
    network: Callable[..., torch.Tensor],
    flips: Sequence[tuple[int, ...]],
    chunk_size: int | None = None,
    activation: Callable[[torch.Tensor], torch.Tensor] | None = torch.sigmoid,
    base_inferer: Callable | None = None,
) -> torch.Tensor:
    """Sum over ``flips`` of ``flip(activation(network(flip(inputs))))``, in float32.

    The flipped copies go through the network ``chunk_size`` at a time as one batch (``None``: 4 on CUDA, 1 on CPU),
    so memory grows with the chunk, not with the number of flips.
    """
    if isinstance(inputs, MetaTensor):
        inputs = inputs.as_tensor()
    n = inputs.shape[0]
    chunk = flip_chunk_size(chunk_size, inputs.device)
    total: torch.Tensor | None = None
    for start in range(0, len(flips), chunk):
        group = flips[start : start + chunk]
        batch = torch.cat([torch.flip(inputs, dims) if dims else inputs for dims in group], dim=0)
        outputs = base_inferer(batch, network) if base_inferer is not None else network(batch)
        if isinstance(outputs, MetaTensor):
            outputs = outputs.as_tensor()
        outputs = outputs.float()
        if activation is not None:
            outputs = activation(outputs)
        for i, dims in enumerate(group):
            part = outputs[i * n : (i + 1) * n]
            part = torch.flip(part, dims) if dims else part
            total = part.clone() if total is None else total.add_(part)
    assert total is not None, "no flips"
    return total


class SnapshotFlipEnsemble(torch.nn.Module):
    """The networks of ``checkpoints``, each with the flips that ``ensemble`` assigns to it (``plan_passes``).

    Nothing is read when it is built: the weights load at ``load()`` (the configs' ``run`` starts with it, as
    model-zoo bundles start with a checkpoint loader), so a config can be parsed and checked without weights.
    ``probabilities(x)`` is the mean over all passes of the flipped-back sigmoid probabilities, summed in float32;
    ``forward(x)`` returns its logit, so the ensemble stands in wherever one network's logits are expected.
    ``FlipTTAInferer`` hands a ``SnapshotFlipEnsemble`` its input as is (the flips are planned here).

    One forward pass per (network, flip) pair; the flips of one network run ``chunk_size`` at a time as one batch
    (several per network only with ``all``, ``best``, or fewer snapshots than flips). Passes of different networks
    are not batched together: that would need their weights stacked (``torch.func``), for a gain only on GPUs
    that are not already saturated by one 3-D volume.
    """

    def __init__(
        self,
        network_def: torch.nn.Module,
        checkpoints: str | os.PathLike | Sequence,
        ensemble: str = "paper",
        tta: int = 8,
        n_snapshots: int = 8,
        device: str | torch.device = "cpu",
        compile: bool = False,
        base_dir: str | None = None,
    ) -> None:
        super().__init__()
        _check_choice(ensemble, tta)
        self._template = (network_def,)  # a tuple: not a submodule, so its weights are not part of the ensemble's
        self.checkpoints, self.ensemble, self.tta, self.n_snapshots = checkpoints, ensemble, int(tta), int(n_snapshots)
        self.target_device, self.compile_members, self.base_dir = device, bool(compile), base_dir
        self.members = torch.nn.ModuleList()
        self.member_flips: list[list[tuple[int, ...]]] = []
        self.paths: list[str] = []  # one per member
        self.n_passes = 0
        self.loaded = False

    def load(self) -> SnapshotFlipEnsemble:
        """Resolves ``checkpoints``, loads each file once (``weights_only=True``), checks it fits ``network_def``."""
        if self.loaded:
            return self
        with torch.inference_mode(False):  # when loaded lazily inside an inference loop: keep normal tensors
            self._load()
        return self

    def _load(self) -> None:
        sets = snapshot_sets(self.checkpoints, self.ensemble, self.n_snapshots, self.base_dir)
        passes = plan_passes(sets, self.ensemble, self.tta)
        flips_of: dict[str, list[tuple[int, ...]]] = {}
        for path, dims in passes:
            flips_of.setdefault(path, []).append(dims)
        members = []
        for path in flips_of:  # every file is checked before the ensemble takes any (a failed load leaves it empty)
            member = copy.deepcopy(self._template[0])
            load_weights(member, path)
            member = member.to(self.target_device).eval()
            # static shapes: dynamic-shape compilation of strided 3-D convolutions fails in torch 2.13 inductor
            members.append(torch.compile(member, dynamic=False) if self.compile_members else member)
        self.members.extend(members)
        self.paths, self.member_flips = list(flips_of), list(flips_of.values())
        self.n_passes, self.loaded = len(passes), True
        self.eval()
        self._report(sets)

    def _report(self, sets: list[list[str]]) -> None:
        for files in sets:
            where = os.path.dirname(files[0]) or "."
            names = ", ".join(map(os.path.basename, files))
            message = f"{self.ensemble} ensemble: {len(files)} checkpoint(s) of {where} ({names})"
            if self.ensemble == "paper" and len(files) != self.tta:
                turns = "snapshots take turns so every flip is used" if len(files) < self.tta else "flips take turns"
                k = len(files)
                message += f" for {self.tta} flips: pass i runs snapshot i mod {k} on flip i mod {self.tta} ({turns})"
            departs = self.ensemble == "paper" and len(files) < self.tta  # not the paper's one snapshot per flip
            (logger.warning if departs else logger.info)(message)
        logger.info(f"{self.ensemble} ensemble: {self.n_passes} forward passes per case ({len(self.members)} networks)")

    def probabilities(
        self,
        x: torch.Tensor,
        chunk_size: int | None = None,
        base_inferer: Callable | None = None,
        activation: Callable[[torch.Tensor], torch.Tensor] | None = torch.sigmoid,
    ) -> torch.Tensor:
        self.load()
        total = None
        for member, flips in zip(self.members, self.member_flips):
            part = sum_flipped_probabilities(x, member, flips, chunk_size, activation, base_inferer)
            total = part if total is None else total.add_(part)
        return total / self.n_passes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.logit(self.probabilities(x), eps=1e-6)


def metrics_csv_name(ensemble: str, fold: int) -> str:
    """``metrics.csv``, or for ``best`` a name that says its weights were selected on the fold it scores."""
    _check_choice(ensemble, 1)
    return f"metrics_best_model_selected_on_fold{fold}.csv" if ensemble == "best" else "metrics.csv"
