"""Experiment tracking beside metrics.jsonl/TensorBoard: MlflowTracker, the training loop's hook
for `tracking.mlflow=true` (lmsys.train.loop, process 0 only). It uses the model registry's
tracking URI (lmsys.interop.registry) and imports mlflow only when a tracker is made.
"""

from __future__ import annotations

import time
from pathlib import Path

from lmsys.dotted import flatten
from lmsys.interop.registry import INSTALL_HINT, RegistryError, prepare_uri


class MlflowTracker:
    """Logs a training run to MLflow: the resolved config as params, each metrics record as
    metrics at its step. A resumed run_dir continues the same MLflow run (new params only)."""

    def __init__(self, cfg, uri: str | None = None):
        try:
            from mlflow import MlflowClient
            from mlflow.entities import Metric, Param
            from mlflow.exceptions import MlflowException
        except ImportError:
            raise RegistryError(f"tracking.mlflow=true: {INSTALL_HINT}") from None
        self._metric = Metric
        self.uri = prepare_uri(uri or cfg.tracking.uri or None)
        try:
            self.client = MlflowClient(tracking_uri=self.uri)
            self._start(cfg, Param)
        except MlflowException as e:
            raise RegistryError(f"tracking.mlflow=true: cannot start an MLflow run at {self.uri} "
                                f"({str(e.message).splitlines()[0]}); fix tracking.uri") from None

    def _start(self, cfg, Param) -> None:
        import dataclasses

        exp = self.client.get_experiment_by_name(cfg.tracking.experiment)
        if exp is None:
            location = None
            if self.uri.startswith("sqlite:///"):  # artifacts beside the database, not in cwd
                location = (Path(self.uri[len("sqlite:///"):]).expanduser().parent / "mlartifacts").as_uri()
            exp_id = self.client.create_experiment(cfg.tracking.experiment, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        run_dir = str(Path(cfg.run_dir).absolute())
        ckpts = Path(run_dir) / "checkpoints"  # resuming: continue that run dir's MLflow run
        resuming = ckpts.is_dir() and any(d.name.isdigit() for d in ckpts.iterdir())
        found = resuming and self.client.search_runs(
            [exp_id], filter_string="tags.`lmsys.run_dir` = '{}'".format(run_dir.replace("'", "\\'")),
            max_results=1, order_by=["attributes.start_time DESC"])
        if found:
            self.run_id = found[0].info.run_id
            self.client.update_run(self.run_id, status="RUNNING")
            have = set(found[0].data.params)
        else:
            run = self.client.create_run(exp_id, run_name=Path(run_dir).name,
                                         tags={"lmsys.run_dir": run_dir})
            self.run_id, have = run.info.run_id, set()
        params = [Param(k, str(v)[:6000]) for k, v in flatten(dataclasses.asdict(cfg)).items() if k not in have]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i:i + 100])

    def write(self, record: dict) -> None:
        now = int(time.time() * 1000)
        step = int(record["step"])
        metrics = [self._metric(k, float(v), now, step) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)]
        if metrics:
            self.client.log_batch(self.run_id, metrics=metrics)

    def close(self) -> None:
        """Ends the MLflow run: FAILED when called while an exception propagates."""
        import sys

        failed = sys.exc_info()[0] is not None and not isinstance(sys.exc_info()[1], KeyboardInterrupt)
        self.client.set_terminated(self.run_id, status="FAILED" if failed else "FINISHED")
