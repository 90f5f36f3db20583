"""ArcScale's engine: everything that knows about processes and devices.

Subpackages, lowest layer first; a module imports only from its own layer and the ones before it
(tests/unit/test_layering.py enforces the order, docs/architecture.md explains it):

    runtime   process group, devices, logging, atomic file writes, failure handling, spawning ranks,
              torch/DeepSpeed compat
    config    the typed run config: schema, file and --set layer, DeepSpeed and FSDP sections, arcface_torch
              converter
    parallel  the backend seam (ParallelBackbone) and its DeepSpeed and FSDP2 implementations, activation
              checkpointing
    state     checkpoints (the one owner of training state), weights from files, run directory
    eval      verification (.bin, 10 folds) and IJB-B/C
    perf      memory planner, profiler, profile report, memory/communication census, hardware facts
    train     Trainer, builders (config -> components), hooks

The modules left at this top level are the public entry points: ``python -m engine.profile``, ``engine.plan``,
``engine.export``, ``engine.eval_ijb``, ``engine.convert_config``, and ``engine.verification`` (the
verification protocol's stable import path).

Importing the package does one thing: it hides DeepSpeed's "Setting accelerator to CPU" warning, which
DeepSpeed prints to stdout when it finds no GPU, on every import, in every process; on a CPU machine the
engine runs on the CPU by design (engine.runtime.dist picks the device). Every other DeepSpeed message passes.
"""
import logging as _logging

_CPU_NOTICE = "Setting accelerator to CPU"


class _HideCpuAcceleratorNotice(_logging.Filter):
    """Drops DeepSpeed's record that starts with `_CPU_NOTICE`; passes every other record."""

    def filter(self, record: _logging.LogRecord) -> bool:
        return not str(record.msg).startswith(_CPU_NOTICE)


# DeepSpeed logs it through its logger "DeepSpeed" (deepspeed.utils.logging), created on first import; a filter on
# the logger object added before that import stays, since logging.getLogger returns the same object.
if not any(isinstance(f, _HideCpuAcceleratorNotice) for f in _logging.getLogger("DeepSpeed").filters):
    _logging.getLogger("DeepSpeed").addFilter(_HideCpuAcceleratorNotice())
