"""Training state and files: checkpoints (``checkpoint``, the one owner of training state), weights from files
(``weights``: the one weights-only read; ``pretrained``: ``init_from``), ONNX export (``onnx_export``), the run
directory's lock and identity (``rundir``). Atomic writes are engine.runtime.fileio's (every layer writes files).

May import engine.runtime, engine.config and engine.parallel.
"""
