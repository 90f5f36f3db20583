"""The data-wait figure and the corrupt-image count reach the log records and summary.json.

Reference: a loader that sleeps a known time before each batch and reports a known skip count, so the measured
wait has a hard lower bound (the sleeps) and an upper bound (the run's wall time)."""
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
