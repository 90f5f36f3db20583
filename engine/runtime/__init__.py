"""The lowest layer: the process group and devices (dist), the rank-aware logger and train.log (log), atomic
file writes that name the file (fileio), failure handling (faults: stop signals, launcher watch, step
watchdog), spawning ranks in-process (spawn), and the private torch/DeepSpeed APIs in one place (compat).

Imports nothing from the rest of engine/.
"""
