"""Importing `engine` hides DeepSpeed's "Setting accelerator to CPU" warning (printed on stdout by every
process that imports DeepSpeed without a GPU, so it opened every command's output) and nothing else DeepSpeed
says."""
import logging

import deepspeed
import torch
from deepspeed.accelerator import real_accelerator

import engine  # noqa: F401  (the import is what installs the filter)


class _Collect(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_cpu_accelerator_notice_hidden_other_warnings_kept(monkeypatch):
    ds_logger = deepspeed.utils.logger
    assert logging.getLogger("DeepSpeed") is ds_logger  # the logger the filter sits on
    seen = _Collect()  # beside DeepSpeed's own stdout handler: sees what a logger's filters let through
    ds_logger.addHandler(seen)
    try:
        # DeepSpeed's own detection, as on a machine without a GPU, run again (its choice is cached per process).
        monkeypatch.delenv("DS_ACCELERATOR", raising=False)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
        monkeypatch.setattr(real_accelerator, "ds_accelerator", None)
        assert real_accelerator.get_accelerator()._name == "cpu"
        ds_logger.warning("ZeRO stage 3: a warning of DeepSpeed's that must stay visible")
    finally:
        ds_logger.removeHandler(seen)
    assert not any("Setting accelerator to CPU" in m for m in seen.messages), seen.messages
    assert seen.messages == ["ZeRO stage 3: a warning of DeepSpeed's that must stay visible"], seen.messages
