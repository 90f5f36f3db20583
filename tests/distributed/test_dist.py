"""engine.runtime.dist in a spawned gloo group: the device follows the group's backend, so gloo ranks use CPU
tensors even where CUDA is visible (faked here: the decision is taken before any CUDA call)."""
import torch

from engine.runtime.spawn import run_distributed


def _device_and_collective():
    from engine.runtime import dist

    torch.cuda.is_available = lambda: True  # a machine with GPUs, as far as the device choice can tell
    torch.cuda.device_count = lambda: 2
    device = dist.get_device()
    # the collective works because the tensor is where gloo can move it
    return str(device), dist.all_reduce_max(float(dist.get_rank()), device)


def test_gloo_ranks_use_the_cpu_where_gpus_are_visible():
    assert run_distributed(_device_and_collective, 2, timeout_s=120) == [("cpu", 1.0), ("cpu", 1.0)]
