"""The model zoo's unit test of this bundle, in the zoo's form (``ci/unit_tests/test_<bundle>.py``, run by its
``ci/unit_tests/runner.py --b brats_mri_cascaded_unet_segmentation`` from the zoo's root): synthesize a few BraTS-like
cases, train one epoch, evaluate, infer, each through ``monai.bundle.ConfigWorkflow`` with the zoo's property check.

It finds the bundle at ``models/brats_mri_cascaded_unet_segmentation`` (the zoo's layout) or at ``$BUNDLE_ROOT``, and
skips without one: ``tests/test_zoo.py`` of the repository packages the bundle, unzips it into a zoo-like folder and
runs this file there. The network is narrowed (8 filters, one block per level) to keep it a CPU test.
"""

import glob
import os
import shutil
import sys
import tempfile
import unittest

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow

BUNDLE_ROOT = os.environ.get("BUNDLE_ROOT", os.path.join("models", "brats_mri_cascaded_unet_segmentation"))
NARROW = {"network_def#init_filters": 8, "network_def#blocks_down": [1, 1, 1, 1]}
TRAIN_OVERRIDE = {
    "epochs": 1,
    "val_interval": 1,
    "patch_size": [32, 32, 32],
    "num_workers": 0,
    "num_folds": 3,
    "n_snapshots": 1,
    "tta": 1,  # evaluation: one flip per case
    "memory_format": "contiguous",  # no CPU layout timing
    **NARROW,
}
INFER_OVERRIDE = {"tta": 1, **NARROW}


def check_workflow(workflow: ConfigWorkflow, check_properties: bool = True) -> None:
    """initialize, the workflow's required properties, run, finalize: the zoo's sequence."""
    workflow.initialize()
    if check_properties:
        missing = workflow.check_properties()
        if missing:
            raise ValueError(f"check properties for workflow failed: {missing}")
    workflow.run()
    workflow.finalize()


@unittest.skipUnless(
    os.path.isfile(os.path.join(BUNDLE_ROOT, "configs", "metadata.json")),
    f"no bundle at {BUNDLE_ROOT}: run from the model zoo's root, or set BUNDLE_ROOT to an unzipped bundle",
)
class TestBratsCascadedUNet(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        # the bundle's own `custom` package, as verify_bundle.py puts the bundle first on sys.path
        sys.path.insert(0, os.path.abspath(BUNDLE_ROOT))
        import custom

        if not os.path.abspath(custom.__file__).startswith(os.path.abspath(BUNDLE_ROOT) + os.sep):
            raise RuntimeError(f"`custom` came from {custom.__file__}, not from the bundle at {BUNDLE_ROOT}")
        from custom.data.synthetic import synthesize

        cls.work_dir = tempfile.mkdtemp()
        cls.dataset_dir = os.path.join(cls.work_dir, "data")
        cls.output_dir = os.path.join(cls.work_dir, "run")
        synthesize(cls.dataset_dir, num_cases=6, shape=(32, 32, 32), seed=0)

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.work_dir)

    def _workflow(self, workflow_type, config_files, **override):
        return ConfigWorkflow(
            workflow_type=workflow_type,
            config_file=[os.path.join(BUNDLE_ROOT, "configs", name) for name in config_files],
            logging_file=os.path.join(BUNDLE_ROOT, "configs", "logging.conf"),
            meta_file=os.path.join(BUNDLE_ROOT, "configs", "metadata.json"),
            bundle_root=BUNDLE_ROOT,
            dataset_dir=self.dataset_dir,
            **override,
        )

    def test_1_train_and_evaluate(self):
        check_workflow(self._workflow("train", ["train.json"], output_dir=self.output_dir, **TRAIN_OVERRIDE))
        self.assertTrue(os.path.isfile(os.path.join(self.output_dir, "models", "model.pt")))
        # evaluate.json over train.json, as the zoo runs an evaluation: a "train" workflow of both files
        check_workflow(
            self._workflow("train", ["train.json", "evaluate.json"], output_dir=self.output_dir, **TRAIN_OVERRIDE)
        )
        self.assertTrue(os.path.isfile(os.path.join(self.output_dir, "eval", "metrics.csv")))

    def test_2_infer(self):
        predictions = os.path.join(self.work_dir, "predictions")
        checkpoints = [os.path.join(self.output_dir, "models", "model.pt")]
        check_workflow(
            self._workflow(
                "infer", ["inference.json"], output_dir=predictions, checkpoints=checkpoints, **INFER_OVERRIDE
            )
        )
        written = sorted(glob.glob(os.path.join(predictions, "*.nii.gz")))
        self.assertEqual(len(written), 6)
        labels = np.asarray(nib.load(written[0]).dataobj)
        self.assertEqual(labels.shape, (32, 32, 32))
        self.assertTrue(set(np.unique(labels).tolist()) <= {0, 1, 2, 4})


def test_order(test_name1, test_name2):
    """The zoo runner's order (``loader.sortTestMethodsUsing``): training first, inference uses its model."""

    def rank(name):
        return 1 if "train" in name else 2 if "infer" in name else 3

    return rank(test_name1) - rank(test_name2)


if __name__ == "__main__":
    unittest.main()
