"""What the machine under this process can do: native bf16 on the CPU, measured matmul throughput, and the
datasheet peaks of GPUs per model and precision (MFU's denominator).

The CPUs a job lands on differ from one day to the next: some have AVX512-BF16 or AMX (bf16 matmul several
times fp32), some only AVX2, where oneDNN emulates bf16 and it runs 30-130x slower than fp32. Nothing here
states a machine's speed as a fact: the flags are read from the kernel and speeds are measured.
"""
from __future__ import annotations

import functools
import os
import re
import time
from dataclasses import dataclass
from typing import FrozenSet, Optional, Tuple

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


# ---------------------------------------------------------------------------------------------------------------
# GPU peaks for MFU
# ---------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GpuPeaks:
    """Dense peak TFLOP/s of one GPU model per kind of math, from NVIDIA's datasheets (the figures without
    sparsity, i.e. half the starred ones). None: the model has no such units (V100: no bf16, no TF32)."""

    model: str
    bf16: Optional[float]
    fp16: Optional[float]
    tf32: Optional[float]
    fp32: float


# Ordered: the first row whose every token is among the device name's tokens wins, so the variants (NVL, PCIe,
# GH200) come before their family's default row. Device names as torch.cuda.get_device_name reports them, e.g.
# "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB",
# "NVIDIA A100-SXM4-80GB", "NVIDIA A100 80GB PCIe", "Tesla V100-SXM2-32GB".
GPU_PEAKS: Tuple[Tuple[Tuple[str, ...], GpuPeaks], ...] = (
    (("H100", "NVL"), GpuPeaks("H100 NVL", bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (("H100", "PCIE"), GpuPeaks("H100 PCIe", bf16=756.0, fp16=756.0, tf32=378.0, fp32=51.0)),
    (("GH200",), GpuPeaks("GH200", bf16=989.5, fp16=989.5, tf32=494.5, fp32=67.0)),
    (("H100",), GpuPeaks("H100 SXM", bf16=989.5, fp16=989.5, tf32=494.5, fp32=67.0)),
    (("H200", "NVL"), GpuPeaks("H200 NVL", bf16=835.5, fp16=835.5, tf32=417.5, fp32=60.0)),
    (("H200",), GpuPeaks("H200 SXM", bf16=989.5, fp16=989.5, tf32=494.5, fp32=67.0)),
    (("A100",), GpuPeaks("A100", bf16=312.0, fp16=312.0, tf32=156.0, fp32=19.5)),  # SXM4 and PCIe: same peaks
    (("A30",), GpuPeaks("A30", bf16=165.0, fp16=165.0, tf32=82.0, fp32=10.3)),
    (("A10",), GpuPeaks("A10", bf16=125.0, fp16=125.0, tf32=62.5, fp32=31.2)),
    (("L40S",), GpuPeaks("L40S", bf16=362.05, fp16=362.05, tf32=183.0, fp32=91.6)),
    (("L40",), GpuPeaks("L40", bf16=181.05, fp16=181.05, tf32=90.5, fp32=90.5)),
    (("L4",), GpuPeaks("L4", bf16=121.0, fp16=121.0, tf32=60.0, fp32=30.3)),
    (("V100", "PCIE"), GpuPeaks("V100 PCIe", bf16=None, fp16=112.0, tf32=None, fp32=14.0)),
    (("V100",), GpuPeaks("V100 SXM2", bf16=None, fp16=125.0, tf32=None, fp32=15.7)),
)


def _name_tokens(device_name: str) -> FrozenSet[str]:
    return frozenset(re.split(r"[\s_\-]+", device_name.upper()))


def gpu_model(device_name: str) -> Optional[GpuPeaks]:
    """The table row for a CUDA device name (torch.cuda.get_device_name), or None for a GPU not in it."""
    tokens = _name_tokens(device_name)
    for needed, peaks in GPU_PEAKS:
        if all(t in tokens for t in needed):
            return peaks
    return None


def tf32_in_effect() -> bool:
    """Whether an fp32 run's convolutions use TF32 tensor cores: cuDNN's allow_tf32 (on by default in PyTorch).
    The backbones' FLOPs are convolutions (IResNet, MobileFaceNet); fp32 matmuls follow
    torch.backends.cuda.matmul.allow_tf32, off by default."""
    return bool(torch.backends.cudnn.allow_tf32)


def gpu_peak_tflops(device_name: str, precision: str, tf32: Optional[bool] = None) -> Optional[Tuple[float, str]]:
    """(dense peak TFLOP/s, where it comes from) of a GPU at a run's precision ("bf16", "fp16", "fp32"), or None
    when the GPU is not in GPU_PEAKS or has no units for that precision (then measure, or pass a peak).

    fp32 is TF32 tensor-core math when `tf32` (default: `tf32_in_effect()`), else plain fp32: the two differ
    7x on an H100 SXM (494.5 vs 67 TFLOP/s), so an fp32 run's MFU names which one it is against.
    """
    peaks = gpu_model(device_name)
    if peaks is None:
        return None
    if precision == "fp32":
        kind = "tf32" if (tf32_in_effect() if tf32 is None else tf32) and peaks.tf32 is not None else "fp32"
    elif precision in ("bf16", "fp16"):
        kind = precision
    else:
        raise ValueError(f"precision: expected bf16, fp16 or fp32, got {precision!r}")
    value = getattr(peaks, kind)
    if value is None:
        return None
    return float(value), f"table: {peaks.model} {kind} dense"
