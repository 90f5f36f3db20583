"""Experiment trackers beside metrics.jsonl: Weights & Biases and MLflow (`engine.train.wandb`,
`engine.train.mlflow`; engine/config/tracking.py documents the keys).

The logging hook (engine.train.hooks.LoggerHook) owns metrics.jsonl and hands every record it writes there to
each tracker too, on rank 0 only (the metrics are already global), so a tracker holds exactly the values of
metrics.jsonl: a training record's numbers as ``train/<key>`` (loss, lr, samples_per_sec, peak_mem_gb,
data_wait_fraction, epoch, ...), an evaluation record's as ``eval/<set>/<key>`` (acc_mean, acc_std, threshold,
best_acc, ...), at the record's step; ``step`` and ``time`` are the axis, not metrics. The resolved config goes
with the run (W&B: its config; MLflow: parameters, dotted keys).

Both packages are optional extras, imported only when their section is enabled; a missing one stops the run at
start-up with the command that installs it. A tracker that fails while training (a server gone) is switched off
with one warning: the run and metrics.jsonl go on.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Dict, List

from engine.runtime.log import get_logger
from engine.state import rundir

log = get_logger(__name__)

__all__ = ["Tracker", "WandbTracker", "MLflowTracker", "build_trackers", "record_scalars"]

AXIS_KEYS = ("step", "time")


def record_scalars(record: Dict[str, Any]) -> Dict[str, float]:
    """The metrics of one metrics.jsonl record, flattened: ``train/<key>`` for a training line,
    ``eval/<set>/<key>`` for an evaluation; numbers only (bools and the step/time axis left out)."""
    out: Dict[str, float] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                walk(f"{prefix}/{key}", value)
        elif isinstance(node, (int, float)) and not isinstance(node, bool):
            out[prefix] = float(node)

    for key, value in record.items():
        if key in AXIS_KEYS:
            continue
        walk(key if key == "eval" else f"train/{key}", value)
    return out


class Tracker:
    """One experiment tracker: `log` a record's scalars at a step, `close` at the end of the run."""

    name = "?"

    def log(self, scalars: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def close(self, completed: bool, output_dir: Path) -> None:
        """`completed`: training reached max_steps (model.pt written) rather than stopping or failing."""


def _flat_config(config: Dict[str, Any]) -> Dict[str, str]:
    """{"a.b.c": leaf as text} of the resolved config, for the trackers' flat parameter tables."""
    return {name: value if isinstance(value, str) else json.dumps(value)
            for name, value in rundir.flatten(config).items()}


def _missing(package: str, extra: str, key: str) -> ImportError:
    return ImportError(f"{key}: {package} is not installed; install it with pip install -e '.[{extra}]' (or "
                       f"pip install {package}), or set {key}=false")


class WandbTracker(Tracker):
    """A W&B run in `<output_dir>/wandb`: offline (no network; `wandb sync` uploads it later) or online."""

    name = "wandb"

    def __init__(self, section, output_dir: Path, config: Dict[str, Any]):
        try:
            import wandb
        except ImportError:
            raise _missing("wandb", "wandb", "engine.train.wandb.enabled") from None
        self.wandb = wandb
        self.log_model = section.log_model
        output_dir.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=section.project, entity=section.entity,
                              name=section.name or output_dir.resolve().name, notes=section.notes,
                              mode=section.mode, dir=str(output_dir), config=config, reinit="create_new",
                              settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))
        log.info(f"wandb: run {self.run.name} ({section.mode}) in {self.run.dir}")

    def log(self, scalars: Dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, completed: bool, output_dir: Path) -> None:
        model = output_dir / "model.pt"
        if completed and self.log_model and model.is_file():
            artifact = self.wandb.Artifact(f"{self.run.name}-model", type="model")
            artifact.add_file(str(model))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=0 if completed else 1)


class MLflowTracker(Tracker):
    """An MLflow run, by default in a file store at `<output_dir>/mlruns` (``mlflow ui --backend-store-uri
    file:<output_dir>/mlruns`` shows it). MLflow 3 keeps its file store in maintenance mode and refuses it unless
    MLFLOW_ALLOW_FILE_STORE is set: it is set for a file store this run writes to."""

    name = "mlflow"

    def __init__(self, section, output_dir: Path, config: Dict[str, Any]):
        try:
            from mlflow.tracking import MlflowClient
        except ImportError:
            raise _missing("mlflow", "mlflow", "engine.train.mlflow.enabled") from None
        from mlflow.entities import Param

        uri = section.tracking_uri or f"file:{(output_dir / 'mlruns').resolve()}"
        if uri.startswith("file:") or "://" not in uri:
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        self.client = MlflowClient(tracking_uri=uri)
        experiment = self.client.get_experiment_by_name(section.experiment)
        experiment_id = (experiment.experiment_id if experiment is not None
                         else self.client.create_experiment(section.experiment))
        run = self.client.create_run(experiment_id, run_name=section.run_name or output_dir.resolve().name)
        self.run_id = run.info.run_id
        params = [Param(k, v[:6000]) for k, v in _flat_config(config).items()]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        log.info(f"mlflow: run {self.run_id} in experiment {section.experiment!r} at {uri}")

    def log(self, scalars: Dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def close(self, completed: bool, output_dir: Path) -> None:
        self.client.set_terminated(self.run_id, status="FINISHED" if completed else "KILLED")


def build_trackers(train_section, output_dir: Path, config: Dict[str, Any]) -> List[Tracker]:
    """The trackers `engine.train` enables (call on rank 0 only, once the run is accepted)."""
    trackers: List[Tracker] = []
    if train_section.wandb.enabled:
        trackers.append(WandbTracker(train_section.wandb, output_dir, config))
    if train_section.mlflow.enabled:
        trackers.append(MLflowTracker(train_section.mlflow, output_dir, config))
    return trackers
