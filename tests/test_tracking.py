"""``--tracking mlflow`` (MONAI's bundle convention, default settings) records the loss, the learning rate and the
validation Dices of a training, and the MLflow run ends FINISHED (issue 23: the first iteration used to crash on a
tuple loss and leave the run RUNNING)."""

import pytest
from conftest import CONFIG_DIR, TINY_TRAINING
from monai.bundle import ConfigWorkflow

mlflow = pytest.importorskip("mlflow", reason="pip install -e '.[test]' installs mlflow-skinny for this test")
pytest.importorskip("sqlalchemy", reason="MLflow's SQLite store needs sqlalchemy (in the test extra)")
pytest.importorskip("alembic", reason="MLflow's SQLite store needs alembic (in the test extra)")

from custom.data.synthetic import synthesize  # noqa: E402


def test_mlflow_tracking_records_loss_lr_and_validation_dice(tmp_path):
    synthesize(str(tmp_path / "data"), num_cases=6, shape=(32, 32, 32), seed=3)
    # MONAI's default store is SQLite in output_dir (MLflow 3.13+ refuses a file: store); here a folder of tmp_path
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow' / 'mlruns.db'}"
    (tmp_path / "mlflow").mkdir()
    workflow = ConfigWorkflow(
        config_file=str(CONFIG_DIR / "train.json"),
        workflow_type="train",
        tracking="mlflow",
        dataset_dir=str(tmp_path / "data"),
        output_dir=str(tmp_path / "run"),
        tracking_uri=tracking_uri,
        **{**TINY_TRAINING, "cache": "none"},
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    experiment = client.get_experiment_by_name("monai_experiment")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    steps = workflow.parser.get_parsed_content("train#trainer").state.iteration
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert len(losses) == steps and all(0.0 < m.value < 10.0 for m in losses)  # the sum of 9 Dice losses
    learning_rates = client.get_metric_history(run.info.run_id, "lr_group_0")
    assert len(learning_rates) == steps and learning_rates[0].value == pytest.approx(1e-4 / 5)  # warm-up epoch 1
    for name in ("val_mean_dice", "val_dice_tc", "val_dice_wt", "val_dice_et"):
        (dice,) = client.get_metric_history(run.info.run_id, name)
        assert 0.0 <= dice.value <= 1.0 and dice.step == 1, name
