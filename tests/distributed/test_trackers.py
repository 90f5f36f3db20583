"""Experiment trackers (engine.train.trackers): a 2-rank run of the tiny r18 with Weights & Biases (offline: no
network) and MLflow (its default file store in the output directory) enabled; each holds exactly the values of
metrics.jsonl, training lines and evaluations alike, read back from what they wrote: W&B's run file
(run-<id>.wandb, its LevelDB-style log of protobuf records, read with wandb's own protobuf classes) and MLflow's
store (MlflowClient). Only rank 0 logs."""
import json
import struct
from pathlib import Path

import pytest

from engine.runtime.spawn import run_distributed
from tests.support.configs import tiny_r18_config

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

STEPS = 3


def _train(out: str, bin_path: str) -> None:
    from engine.config import schema
    from engine.train.build import build_trainer

    raw = tiny_r18_config(out, 2, 0, max_steps=STEPS)
    raw["engine"]["train"].update(wandb={"enabled": True, "mode": "offline", "project": "t", "notes": "test"},
                                  mlflow={"enabled": True, "experiment": "t"})
    raw["engine"]["eval"] = {"bins": [bin_path], "every": 2, "batch_size": 8}
    raw["engine"]["checkpoint"] = {"export": True}
    trainer = build_trainer(schema.from_dict(raw))
    trainer.train()
    trainer.close()


def read_wandb_history(run_file: Path) -> dict:
    """{step: {key: value}} of the history records of a W&B run file: a header (':W&B', magic, version) and
    32 KiB blocks of records, each a 7-byte header (crc32, length, type: full/first/middle/last) and a piece of
    one protobuf Record (wandb.proto.wandb_internal_pb2)."""
    from wandb.proto import wandb_internal_pb2 as pb

    raw = run_file.read_bytes()
    assert raw[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(raw):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        data, pos = raw[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:  # padding to the end of the block
            pos += left - 7 - length
        elif kind == 1:
            records.append(data)
        elif kind == 2:
            pending = data
        elif kind == 3:
            pending += data
        elif kind == 4:
            records.append(pending + data)
    history = {}
    for data in records:
        record = pb.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
            history.setdefault(int(row["_step"]), {}).update(row)
    return history


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from dali_pipes.make_demo import make_demo

    tmp = tmp_path_factory.mktemp("trackers")
    make_demo(tmp / "demo", identities=2, images_per_identity=2, eval_identities=4, eval_images_per_identity=3,
              eval_pairs=10, workers=1)
    out = tmp / "run"
    run_distributed(_train, 2, str(out), str(tmp / "demo" / "val.bin"), timeout_s=600)
    return out


def _expected(out: Path) -> dict:
    from engine.train.trackers import record_scalars

    expected = {}
    for line in (out / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        expected.setdefault(record["step"], {}).update(record_scalars(record))
    return expected


def test_metrics_jsonl_has_training_and_evaluation(run):
    expected = _expected(run)
    assert sorted(expected) == [1, 2, 3]
    assert {"train/loss", "train/lr", "train/samples_per_sec", "eval/val/acc_mean"} <= set(expected[2])
    assert "eval/val/acc_mean" not in expected[1] and "eval/val/best_acc" in expected[3]


def test_wandb_offline_run_holds_the_same_values(run):
    runs = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1, runs  # rank 0 only
    history = read_wandb_history(runs[0])
    for step, metrics in _expected(run).items():
        got = history[step]
        assert {k: got[k] for k in metrics} == metrics, step


def test_mlflow_file_store_holds_the_same_values(run, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 reads its file store only with this
    client = MlflowClient(tracking_uri=f"file:{run / 'mlruns'}")
    experiment = client.get_experiment_by_name("t")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1 and runs[0].info.status == "FINISHED" and runs[0].info.run_name == "run"
    assert runs[0].data.params["engine.model.name"] == "r18"
    expected = _expected(run)
    keys = {k for metrics in expected.values() for k in metrics}
    assert keys == set(runs[0].data.metrics)
    for key in keys:
        got = {m.step: m.value for m in client.get_metric_history(runs[0].info.run_id, key)}
        assert got == {step: metrics[key] for step, metrics in expected.items() if key in metrics}, key
