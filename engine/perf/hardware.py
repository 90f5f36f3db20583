"""What the machine under this process can do: native bf16 on the CPU, and measured matmul throughput.

The CPUs a job lands on differ from one day to the next: some have AVX512-BF16 or AMX (bf16 matmul several
times fp32), some only AVX2, where oneDNN emulates bf16 and it runs 30-130x slower than fp32. Nothing here
states a machine's speed as a fact: the flags are read from the kernel and speeds are measured.
"""
from __future__ import annotations

import functools
import os
import time
from typing import FrozenSet, Optional

import torch

# CPU flags (as /proc/cpuinfo spells them) that give native bf16 dot products to oneDNN's kernels.
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16"})

# oneDNN's ISA cap (ONEDNN_MAX_CPU_ISA) values below which bf16 instructions are not used even when present.
_ISA_WITHOUT_BF16 = {"sse41", "avx", "avx2", "avx2_vnni", "avx2_vnni_2", "avx512_core", "avx512_core_vnni"}


def _cpuinfo_field(path: str, name: str) -> Optional[str]:
    """The value of the first ``name : value`` line of a /proc/cpuinfo-format file (None: absent or unreadable)."""
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() == name:
                    return value.strip()
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def cpu_flags(path: str = "/proc/cpuinfo") -> FrozenSet[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is absent, e.g. macOS)."""
    return frozenset((_cpuinfo_field(path, "flags") or "").split())


def cpu_has_native_bf16(flags: Optional[FrozenSet[str]] = None) -> bool:
    """Whether bf16 matmuls/convolutions on this CPU use native bf16 instructions (AVX512-BF16 or AMX).

    False also when oneDNN is capped below those instructions with ONEDNN_MAX_CPU_ISA.
    """
    flags = cpu_flags() if flags is None else flags
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA", "").strip().lower()
    if cap in _ISA_WITHOUT_BF16:
        return False
    return bool(flags & NATIVE_BF16_FLAGS)


def cpu_description(path: str = "/proc/cpuinfo") -> str:
    """One line naming the CPU model and its ISA support relevant to training precision (for logs, profile.json
    and BENCHMARKS), read from `path` (the kernel's /proc/cpuinfo) and torch."""
    model = _cpuinfo_field(path, "model name") or "unknown CPU"
    flags = cpu_flags(path)
    shown = sorted(f for f in flags if f in NATIVE_BF16_FLAGS | {"avx2", "avx512f", "avx512_vnni", "amx_tile"})
    return (f"{model}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}, flags: "
            f"{' '.join(shown) or 'none'}")


def measure_matmul_tflops(dtype: torch.dtype, *, size: int = 512, min_time_s: float = 0.05,
                          device: Optional[torch.device] = None) -> float:
    """Measured matmul throughput in TFLOP/s for `dtype` on `device` (default: CPU), on this process's threads.

    A square `size` matmul repeated for at least `min_time_s` after one warm-up call. Small and fast (about
    0.1 s): it is a start-up probe of the order of magnitude, not a benchmark.
    """
    device = device or torch.device("cpu")
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    torch.mm(a, b)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    n, t0 = 0, time.perf_counter()
    while True:
        torch.mm(a, b)
        n += 1
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_time_s:
            break
    return 2.0 * size ** 3 * n / elapsed / 1e12


def bf16_slowdown_on_cpu() -> float:
    """How many times slower a bf16 matmul is than an fp32 one on this CPU (measured now; < 1 means faster).

    Measured on one thread: with several threads on a loaded machine, waiting for a busy core dominates
    both timings and the ratio says nothing about the instructions.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fp32 = measure_matmul_tflops(torch.float32, size=256)
        bf16 = measure_matmul_tflops(torch.bfloat16, size=256)
    finally:
        torch.set_num_threads(threads)
    return fp32 / max(bf16, 1e-12)


def bf16_cpu_warning(precision: str, device: torch.device,
                     flags: Optional[FrozenSet[str]] = None) -> Optional[str]:
    """The start-up warning (its text; the logger adds "warning:") for bf16 autocast on a CPU without native
    bf16, or None when it does not apply.

    The slowdown in the message is measured on this CPU (a short matmul probe), not quoted.
    """
    if precision != "bf16" or device.type != "cpu" or cpu_has_native_bf16(flags):
        return None
    slowdown = bf16_slowdown_on_cpu()
    cap = os.environ.get("ONEDNN_MAX_CPU_ISA")
    why = f"oneDNN capped by ONEDNN_MAX_CPU_ISA={cap}" if cap else "no AVX512-BF16/AMX"
    return (f"bf16 autocast on a CPU without native bf16 ({why}; {cpu_description()}): "
            f"a bf16 matmul measured {slowdown:.0f}x slower than fp32 here, and training slows down about as "
            f"much. Train in fp32 with --set torch_autocast.enabled=false")
