"""Training state and files: checkpoints (``checkpoint``, the one owner of training state), weights from files
(``weights``, ``pretrained``), ONNX export (``onnx_export``), the run directory's lock and identity (``rundir``),
atomic file writes (``fileio``).

May import engine.runtime, engine.config and engine.parallel.
"""
