"""Is a case's channel order plausibly T1, T1c, T2, FLAIR? A check from MR physics on intensity statistics.

A NIfTI file does not record which sequence it holds, and the network gives confident garbage on swapped channels.
``check_channel_order`` looks at the four volumes inside the brain (voxels non-zero in all
four) and infers which one is which from three facts of MR contrast that hold for any skull-stripped brain, with
or without tumour, whatever the scanner's intensity scale:

1. **T2 is the one with a bright, large tail: cerebrospinal fluid.** CSF (ventricles, sulci: about a tenth of a
   skull-stripped brain) is the brightest tissue on T2 and dark on T1, T1c and FLAIR (FLAIR nulls it). So T2's 95th
   percentile lies far above its median, further than its 5th percentile lies below it. Statistic per volume, in
   units that no scale or offset changes: ``U = (p95 - p50) / (p50 - p5)``. T2 has the largest ``U``; decided when
   it exceeds the runner-up by ``T2_RATIO`` (a big FLAIR-bright edema raises FLAIR's ``U``, but T2 is bright on
   the same edema and on CSF too).
2. **FLAIR is the other T2-weighted sequence.** FLAIR has T2's tissue contrast (white matter darker than grey
   matter, oedema bright) with CSF suppressed; T1 and T1c invert it (white matter brightest, oedema dark). So of the
   three left, FLAIR correlates most with T2 (Pearson, voxel-wise); decided when it beats the runner-up by
   ``FLAIR_MARGIN``.
3. **T1c is T1 plus enhancement.** Gadolinium shortens T1 only where it leaks or flows (enhancing tumour, vessels,
   choroid plexus, dura): a small fraction of voxels is much brighter on T1c than on T1, and nothing is much darker.
   With both z-scored (median and inter-quartile range), ``d = z(T1c) - z(T1)`` has a long positive tail and a short
   negative one; statistic ``A = (p99.9(d) + p0.1(d)) / (p99.9(d) - p0.1(d))`` in [-1, 1], decided when
   ``|A| >= T1C_ASYMMETRY``. A case without enhancement leaves T1 and T1c undecided: that is not an error.

Only robust, scale-free statistics are used (percentiles, correlations), so bias fields, scanner ranges and int16
rescaling change nothing. The inference is equivariant (permuting the inputs permutes the answer), so when a case's
true order is recognised, every one of the 23 other orders is recognised as wrong. A swap is reported only when the
step that contradicts the given order is decided; an undecided step never flags (false alarms cost a user's trust
more than a missed T1/T1c swap on a case without enhancement).

Measured (``tests/test_plausibility.py``, this module as it is): on the real BraTS 2023 case BraTS-GLI-00001-000
(``BRATS_TEST_CASE``), ``U`` of T2 is 3.72x the runner-up's, FLAIR's correlation with T2 beats the runner-up's by 0.30
and ``A`` is +0.50 (+0.48 without subsampling): all 23 wrong orders are flagged, each with its true order as the
likely one, and the right order is not. On synthetic cases (``custom.data.synthetic``, seeds 0-39, 32^3 and 48^3)
no right order is flagged (0 of 80); the T2 ratio was at least 1.27 (T2 was the top ``U`` every time), the FLAIR margin
at least 0.12, and ``A`` of the right order between -0.15 and +0.50: T1/T1c stayed undecided on 46 of the 80 (most
synthetic cases have little enhancement at these sizes). The thresholds sit between the right orders' worst figures
and what a swap gives (a swap flips the sign of ``A`` and puts the wrong sequence on top); they were set from these
physical statistics, not fitted to the 24 orders of the one real case, which every threshold passes with a wide
margin.

The volumes are subsampled (every 2nd voxel on each axis) when the brain has over 400,000 voxels: the statistics of
a 240x240x155 case hardly move. Measured on a 2-core AMD EPYC: 0.32 s for the real case at full size, 0.08 s on the
1/8 copies the pre-flight keeps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from custom.core.naming import SEQUENCE_NAMES

__all__ = ["ChannelOrderVerdict", "check_channel_order", "T2_RATIO", "FLAIR_MARGIN", "T1C_ASYMMETRY"]

T2_RATIO = 1.3  # U of T2 over the runner-up's
FLAIR_MARGIN = 0.1  # correlation with T2: FLAIR's minus the runner-up's
T1C_ASYMMETRY = 0.3  # |A| of z(T1c) - z(T1)
MIN_BRAIN_VOXELS = 1000  # fewer: no statistics worth a verdict
_SUBSAMPLE_ABOVE = 400_000


@dataclass(frozen=True)
class ChannelOrderVerdict:
    """What ``check_channel_order`` found. ``likely`` holds, for each slot of the given order (T1, T1c, T2, FLAIR),
    the sequence it most likely holds (``SEQUENCE_NAMES`` values); ``plausible`` is False when a decided step
    contradicts the given order; ``details`` gives the statistics behind it, for messages and tests."""

    plausible: bool
    likely: tuple[str, ...]
    decided: bool  # every step decided (False: some part of the order could not be checked)
    details: str

    @property
    def message(self) -> str:
        return (
            f"the channels look like {', '.join(self.likely)} instead of {', '.join(SEQUENCE_NAMES)} ({self.details})"
        )


def _zscores(volumes: Sequence[np.ndarray], mask: np.ndarray) -> np.ndarray:
    """(4, N) intensities inside ``mask``, each centred on its median and scaled by its inter-quartile range."""
    rows = []
    for volume in volumes:
        x = np.asarray(volume)[mask].astype(np.float32, copy=False)
        q25, q50, q75 = np.percentile(x, [25, 50, 75])
        rows.append((x - q50) / max(float(q75 - q25), 1e-6))
    return np.stack(rows)


def check_channel_order(volumes: Sequence[np.ndarray]) -> ChannelOrderVerdict | None:
    """The verdict on four co-registered 3-D volumes given as T1, T1c, T2, FLAIR; None when there are too few brain
    voxels (or a constant sequence) to judge. See the module docstring for the rule."""
    if len(volumes) != 4:
        raise ValueError(f"check_channel_order needs 4 volumes (T1, T1c, T2, FLAIR), got {len(volumes)}")
    volumes = [np.asarray(v) for v in volumes]
    mask = np.ones(volumes[0].shape, bool)
    for v in volumes:
        mask &= np.isfinite(v) & (v != 0)
    if int(mask.sum()) > _SUBSAMPLE_ABOVE:
        volumes, mask = [v[::2, ::2, ::2] for v in volumes], mask[::2, ::2, ::2]
    if int(mask.sum()) < MIN_BRAIN_VOXELS:
        return None
    z = _zscores(volumes, mask)
    p5, p50, p95 = np.percentile(z, [5, 50, 95], axis=1)
    if np.any(p95 - p5 <= 0):
        return None
    u = (p95 - p50) / np.maximum(p50 - p5, 1e-6)
    corr = np.corrcoef(z)

    order = list(np.argsort(-u, kind="stable"))
    t2 = int(order[0])
    t2_ratio = float(u[t2] / max(u[order[1]], 1e-6))
    rest = [i for i in range(4) if i != t2]
    by_corr = sorted(rest, key=lambda i: -corr[t2, i])
    flair = int(by_corr[0])
    flair_margin = float(corr[t2, by_corr[0]] - corr[t2, by_corr[1]])
    a, b = [i for i in rest if i != flair]
    d = z[b] - z[a]
    lo, hi = np.percentile(d, [0.1, 99.9])
    asym = float((hi + lo) / max(hi - lo, 1e-6))  # > 0: b is brighter in a small fraction: b is T1c
    t1c_decided = abs(asym) >= T1C_ASYMMETRY
    if t1c_decided:
        t1, t1c = (a, b) if asym > 0 else (b, a)
    else:  # keep the given order of the two (undecided)
        t1, t1c = (a, b) if a < b else (b, a)

    inferred = {t1: 0, t1c: 1, t2: 2, flair: 3}  # slot -> sequence index it holds
    likely = tuple(SEQUENCE_NAMES[inferred[slot]] for slot in range(4))
    t2_decided, flair_decided = t2_ratio >= T2_RATIO, flair_margin >= FLAIR_MARGIN
    plausible = True
    if t2 != 2:
        plausible = not t2_decided
    elif flair != 3:
        plausible = not flair_decided
    elif t1c != 1:
        plausible = not t1c_decided
    details = (
        f"CSF-bright tail: {SEQUENCE_NAMES[t2]} slot {t2_ratio:.2f}x the next; correlation with it: slot "
        f"{SEQUENCE_NAMES[flair]} +{flair_margin:.2f} over the next; enhancement asymmetry {abs(asym):.2f}"
        + ("" if t1c_decided else " (T1/T1c undecided: no enhancement seen)")
    )
    return ChannelOrderVerdict(plausible, likely, t2_decided and flair_decided and t1c_decided, details)
