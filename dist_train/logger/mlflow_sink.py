"""logging.mlflow: one MLflow run per dist_train run, found again on every resume.

The tracking store is logging.mlflow.tracking_uri, by default a local file store in
RUN_DIR/mlruns (`mlflow ui --backend-store-uri RUN_DIR/mlruns` shows it; MLflow keeps that
backend in maintenance mode, so dist_train opts in to it with MLFLOW_ALLOW_FILE_STORE, for its
own default only). A run is tagged with the dist_train run's id (kept in every checkpoint, the
one W&B resumes by), so a resumed invocation logs into the same MLflow run. Params are the
config's scalar settings, logged once when the run is made; the final validation metrics are
logged with them when the run trains its last step.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from dist_train.config import Config, UserError
from dist_train.logger.base import hyperparameters, scalars

RUN_ID_TAG = "dist_train.run_id"


class MLflow:
    def __init__(self, cfg: Config, run_dir: Path, run_id: str, resumed_step: int) -> None:
        try:
            from mlflow.tracking import MlflowClient
        except ImportError as exc:
            raise UserError(
                f"logging.mlflow.enabled=true needs the mlflow package ({exc}); "
                "pip install mlflow-skinny, or set logging.mlflow.enabled=false"
            ) from None
        settings = cfg.logging.mlflow
        uri = settings.tracking_uri
        if uri is None:
            uri = (run_dir / "mlruns").resolve().as_uri()
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        try:
            self.client = MlflowClient(tracking_uri=uri)
            experiment = self.client.get_experiment_by_name(settings.experiment)
            experiment_id = (
                experiment.experiment_id if experiment else self.client.create_experiment(settings.experiment)
            )
            found = self.client.search_runs([experiment_id], filter_string=f"tags.`{RUN_ID_TAG}` = '{run_id}'")
            if found:
                self.run_id = found[0].info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
            else:
                made = self.client.create_run(experiment_id, run_name=cfg.run.name, tags={RUN_ID_TAG: run_id})
                self.run_id = made.info.run_id
                self._log_params(hyperparameters(cfg))
        except Exception as exc:  # an unreachable server, a store it cannot write
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"MLflow could not start a run at {uri} (logging.mlflow): {first_line}") from None

    def _log_params(self, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(key, str(value)) for key, value in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(self.run_id, params=items[start : start + 100])

    def log(self, step: int, metrics: dict[str, Any], walltime: float) -> None:
        from mlflow.entities import Metric

        timestamp = int(walltime * 1000)
        batch = [Metric(key, float(value), timestamp, step) for key, value in scalars(metrics).items()]
        self.client.log_batch(self.run_id, metrics=batch)

    def finished(self, hparams: dict[str, float | int | str], final_metrics: dict[str, float], step: int) -> None:
        self.client.set_tag(self.run_id, "dist_train.finished_step", str(step))

    def close(self, exit_code: int) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if exit_code == 0 else "FAILED")
