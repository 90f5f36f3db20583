"""The trainer's data side on spawned ranks: it reads an insightface rec (the MXNet-written golden one) across
epochs, and the data-wait figure and the corrupt-image count reach the log records and summary.json.

Reference for the wait: a loader that sleeps a known time before each batch and reports a known skip count, so
the measured wait has a hard lower bound (the sleeps) and an upper bound (the run's wall time).
"""
import json
import time

import torch

from engine.runtime.spawn import run_distributed

SLEEP_S = 0.3
STEPS = 3


class _SlowLoader:
    """Synthetic batches, each after SLEEP_S seconds; claims 2 skipped corrupt images."""

    num_corrupt_skipped = 2

    def __init__(self, batch_size: int, num_classes: int):
        self.batch_size, self.num_classes = batch_size, num_classes
        self.g = torch.Generator().manual_seed(0)

    def __next__(self):
        time.sleep(SLEEP_S)
        images = torch.rand(self.batch_size, 3, 112, 112, generator=self.g) * 2 - 1
        labels = torch.randint(0, self.num_classes, (self.batch_size,), generator=self.g)
        return images, labels


def _train(out_dir: str) -> dict:
    from engine.config import schema as config
    from engine.train.build import build_trainer

    cfg = config.from_dict({
        "train_micro_batch_size_per_gpu": 2,
        "engine": {"model": {"name": "mbf", "embedding_size": 16},
                   "head": {"num_classes": 5, "margin": [1.0, 0.0, 0.2], "scale": 16.0},
                   "train": {"max_steps": STEPS, "log_every": 1, "output_dir": out_dir},
                   "checkpoint": {"export": False}}})
    trainer = build_trainer(cfg, data=_SlowLoader(2, 5))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    trainer.close()
    return {"wall": wall, "history": trainer.hooks[0].history}


def test_data_wait_and_corrupt_count_are_reported(tmp_path):
    (res,) = run_distributed(_train, 1, str(tmp_path), timeout_s=600)
    summary = json.loads((tmp_path / "summary.json").read_text())
    (wait,) = summary["data_wait_s_per_rank"]
    assert STEPS * SLEEP_S <= wait <= res["wall"]
    assert 0 < summary["data_wait_fraction"] <= 1
    assert summary["num_corrupt_skipped"] == 2
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == STEPS
    assert all(0 < r["data_wait_fraction"] <= 1 and r["num_corrupt_skipped_rank0"] == 2 for r in records)


def _train_on_rec(rec_dir: str, out_dir: str) -> list:
    from engine.config import schema as config
    from engine.runtime import dist
    from engine.train.build import build_trainer

    dist.init()
    cfg = config.from_dict({
        "train_micro_batch_size_per_gpu": 4,
        "engine": {"model": {"name": "mbf", "embedding_size": 32},
                   "head": {"num_classes": 8, "margin": [1.0, 0.0, 0.2], "scale": 16.0},
                   "data": {"source": "recordio", "path": rec_dir, "num_workers": 0, "dali": "off"},
                   "train": {"max_steps": 12, "log_every": 4, "output_dir": out_dir}}})
    trainer = build_trainer(cfg)
    trainer.train()
    return [r["loss"] for r in trainer.hooks[0].history] + [trainer.epoch]


def test_trainer_reads_insightface_rec(shared_data, tmp_path):
    """The trainer's recordio source: 40 MXNet-written images, 8 identities; 12 steps of 4 cross epochs."""
    from engine.runtime.spawn import run_distributed

    (result,) = run_distributed(_train_on_rec, 1, str(shared_data / "recordio_golden"), str(tmp_path), timeout_s=600)
    *losses, epoch = result
    assert all(l == l and l < 1e4 for l in losses), losses  # finite
    assert epoch >= 1  # 40 images / batch 4 = 10 batches per epoch: step 12 is in the second epoch
