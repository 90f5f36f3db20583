"""The lowest layer: the process group and devices (dist), failure handling (faults: stop signals, launcher
watch, step watchdog), spawning ranks in-process (spawn), and the private torch/DeepSpeed APIs in one place
(compat).

Imports nothing from the rest of engine/.
"""
