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
verification protocol's stable import path). Nothing runs at import time.
"""
