"""summary.json's GPU memory: peak allocated and peak reserved, both counted from the start of the first step
(set-up transients excluded). CUDA's allocator counters are replaced by a small model of them (current and
peak, allocated and reserved, reset_peak_memory_stats restarting the peaks from the current values), since
the CPU has none; on the CPU the figure stays the process's peak RSS."""
import json
from types import SimpleNamespace

import pytest
import torch

from engine.train import hooks

GiB = 2 ** 30


class FakeCudaAllocator:
    """torch.cuda's peak counters for one device: what reset_peak_memory_stats and max_memory_* do."""

    def __init__(self):
        self.allocated = self.reserved = self.peak_allocated = self.peak_reserved = 0

    def alloc(self, nbytes: int) -> None:
        self.allocated += nbytes
        self.reserved = max(self.reserved, self.allocated)  # the cache keeps what it ever reserved
        self.peak_allocated = max(self.peak_allocated, self.allocated)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def free(self, nbytes: int, release: bool = False) -> None:
        self.allocated -= nbytes
        if release:  # empty_cache()
            self.reserved = self.allocated

    def install(self, monkeypatch) -> None:
        def reset(device=None):
            self.peak_allocated, self.peak_reserved = self.allocated, self.reserved

        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak_allocated)
        monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda device=None: self.peak_reserved)


def _trainer(device: torch.device):
    cfg = SimpleNamespace(precision="bf16", zero_stage=0, digest=lambda: "0" * 16,
                          engine=SimpleNamespace(model=SimpleNamespace(name="r50"),
                                                 head=SimpleNamespace(num_classes=10)))
    return SimpleNamespace(device=device, step=0, global_batch_size=4, hooks=[], data=None, cfg=cfg,
                           backbone=SimpleNamespace(name="deepspeed"), max_steps=2)


def _run(tmp_path, device, during_setup, steps):
    """SummaryHook over a fake run: `during_setup()` before on_train_start, `steps[i]()` in step i+1."""
    logger = hooks.LoggerHook(log_every=100, output_dir=tmp_path)
    summary = hooks.SummaryHook(tmp_path, logger)
    trainer = _trainer(device)
    trainer.hooks = [summary]
    during_setup()
    summary.on_train_start(trainer)
    for i, step in enumerate(steps, 1):
        step()
        trainer.step = i
        summary.on_step_end(trainer, i, torch.tensor(1.0))
    summary.on_train_end(trainer)
    return json.loads((tmp_path / "summary.json").read_text())


def test_gpu_peaks_are_the_training_steps_allocated_and_reserved(tmp_path, monkeypatch):
    cuda = FakeCudaAllocator()
    cuda.install(monkeypatch)

    def setup():  # a 10 GiB checkpoint read onto the GPU and dropped; 2 GiB of model stays; cache emptied
        cuda.alloc(12 * GiB)
        cuda.free(10 * GiB, release=True)

    def step():  # 3 GiB of activations, freed into the cache; the next step reuses them
        cuda.alloc(3 * GiB)
        cuda.free(3 * GiB)

    summary = _run(tmp_path, torch.device("cuda", 0), setup, [step, step])
    assert summary["peak_memory_kind"] == "cuda_max_allocated"
    assert summary["peak_memory_bytes_per_rank"] == [5 * GiB]  # not the set-up's 12 GiB
    assert summary["peak_reserved_bytes_per_rank"] == [5 * GiB]
    assert summary["peak_memory_gb_max"] == pytest.approx(5.0)


def test_reserved_exceeds_allocated_when_the_cache_holds_more(tmp_path, monkeypatch):
    cuda = FakeCudaAllocator()
    cuda.install(monkeypatch)

    def setup():  # the set-up leaves 4 GiB cached: reserved from the start of the window
        cuda.alloc(5 * GiB)
        cuda.free(4 * GiB)

    def step():
        cuda.alloc(2 * GiB)
        cuda.free(2 * GiB)

    summary = _run(tmp_path, torch.device("cuda", 0), setup, [step])
    assert summary["peak_memory_bytes_per_rank"] == [3 * GiB]
    assert summary["peak_reserved_bytes_per_rank"] == [5 * GiB]


def test_cpu_peak_is_the_process_rss_and_no_reserved_figure(tmp_path):
    summary = _run(tmp_path, torch.device("cpu"), lambda: None, [lambda: None])
    assert summary["peak_memory_kind"] == "rss"
    assert summary["peak_reserved_bytes_per_rank"] is None
    import resource

    assert 0 < summary["peak_memory_bytes_per_rank"][0] <= resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
