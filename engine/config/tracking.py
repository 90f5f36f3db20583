"""Experiment trackers beside metrics.jsonl and TensorBoard: the `engine.train.wandb` and `engine.train.mlflow`
sections (engine/train/trackers.py writes to them).

Both are optional extras (``pip install '.[wandb]'``, ``'.[mlflow]'``) and get the same scalars as
metrics.jsonl, from rank 0, at the same steps. Weights & Biases runs offline by default: everything is written
under ``<output_dir>/wandb`` with no network, for ``wandb sync`` to upload later (``mode: online`` logs live,
with the API key from ``wandb login`` or ``WANDB_API_KEY``, never from the config: config.json is written into
the output directory). MLflow writes to a local file store in ``<output_dir>/mlruns`` unless `tracking_uri`
names another store (a server, ``sqlite:///...``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from engine.config.files import ConfigError, setting

WANDB_MODES = ("offline", "online")

__all__ = ["WANDB_MODES", "WandbConfig", "MLflowConfig", "check_tracking"]


@dataclass
class WandbConfig:
    enabled: bool = setting(False, doc="also log the metrics to Weights & Biases (pip install '.[wandb]'), from "
                                       "rank 0")
    mode: str = setting("offline", doc="offline: written under <output_dir>/wandb with no network (upload later "
                                       "with `wandb sync`); online: logged live (wandb login first)",
                        choices=WANDB_MODES)
    project: str = setting("arcscale", doc="W&B project")
    entity: Optional[str] = setting(None, doc="W&B entity (team or user); null: the account's default")
    name: Optional[str] = setting(None, doc="run name; null: output_dir's folder name")
    notes: Optional[str] = setting(None, doc="run notes")
    log_model: bool = setting(False, doc="at the end, model.pt as a W&B model artifact (arcface_torch's "
                                         "save_artifacts)")


@dataclass
class MLflowConfig:
    enabled: bool = setting(False, doc="also log the metrics to MLflow (pip install '.[mlflow]'), from rank 0")
    tracking_uri: Optional[str] = setting(None, doc="MLflow tracking URI; null: a file store in "
                                                    "<output_dir>/mlruns")
    experiment: str = setting("arcscale", doc="MLflow experiment name")
    run_name: Optional[str] = setting(None, doc="run name; null: output_dir's folder name")


def check_tracking(wandb: WandbConfig, mlflow: MLflowConfig) -> None:
    """Names that must not be empty when set."""
    for where, value in (("engine.train.wandb.project", wandb.project),
                         ("engine.train.mlflow.experiment", mlflow.experiment)):
        if not value.strip():
            raise ConfigError(f"{where}: expected a non-empty name, got {value!r}")
    if mlflow.tracking_uri is not None and not mlflow.tracking_uri.strip():
        raise ConfigError("engine.train.mlflow.tracking_uri: expected a URI or null (a file store in "
                          "<output_dir>/mlruns), got ''")
