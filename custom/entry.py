"""The functions the bundle's configs call: each is a library function behind ``clean_exit``, so that a problem
with the user's data ends ``python -m monai.bundle run`` with one message and exit status 1 (no traceback).

Nothing in the library imports this module; it is the boundary between the library and the command line.
"""

from __future__ import annotations

from custom.core import lock
from custom.core.errors import clean_exit
from custom.core.labels import get_scheme
from custom.data import datalist, datasets, validation
from custom.evaluation import folders
from custom.inference import inferer
from custom.inference.segment import SegmentationSummary, Segmenter

__all__ = [
    "require_dataset",
    "dataset_datalist",
    "preflight_datalist",
    "inference_files",
    "make_dataset",
    "lock_output_dir",
    "release_output_dir",
    "segment",
    "evaluate",
]

require_dataset = clean_exit(datalist.require_dataset)
preflight_datalist = clean_exit(validation.preflight_datalist)
# train.json's datasets: a memory cache that cannot fit the budget, in one line naming the keys to change
make_dataset = clean_exit(datasets.make_dataset)
# inference.json's cases: a folder with no recognisable case or a datalist with an unusable case id, in one line
inference_files = clean_exit(inferer.inference_files)


@clean_exit
def dataset_datalist(source: str, folds: int = 5, seed: int = 0) -> dict:
    """The datalist of a training or evaluation config: incomplete cases kept for the pre-flight to report, and an
    empty datalist while ``source`` does not exist, so that a config can be inspected before a dataset is given
    (the run's ``require_dataset`` then says what is missing)."""
    return datalist.load_datalist(source, folds=folds, seed=seed, allow_incomplete=True, missing_ok=True)


lock_output_dir = clean_exit(lock.lock_output_dir)
release_output_dir = lock.release_output_dir


@clean_exit
def segment(segmenter: Segmenter) -> SegmentationSummary:
    """inference.json's run: every case segmented and written (a failed case: exit 1 after the others)."""
    return segmenter.run()


@clean_exit
def evaluate(segmenter: Segmenter, metrics_csv: str, lesion_wise: bool = False) -> list[dict]:
    """evaluate.json's run: the validation cases segmented by the inference pipeline, then scored against their
    labels into ``metrics_csv`` (a case that fails is reported and the others are scored)."""
    segmenter.run()
    scheme = get_scheme(segmenter.labels)
    return folders.evaluate_entries(
        segmenter.data, segmenter.output_dir, metrics_csv, et_label=scheme.et_label, label_scheme=scheme.name,
        lesion_wise=lesion_wise,
    )  # fmt: skip
