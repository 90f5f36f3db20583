"""engine.perf.hardware: native-bf16 detection from the CPU's flags (never a fixed statement about "these CPUs"),
and the start-up warning for bf16 autocast on a CPU without it."""
import re

import torch

from engine.perf import hardware

AVX2_ONLY = frozenset({"sse4_2", "avx", "avx2", "fma"})
SAPPHIRE = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def test_native_bf16_from_flags(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    assert not hardware.cpu_has_native_bf16(AVX2_ONLY)
    assert hardware.cpu_has_native_bf16(SAPPHIRE)
    assert hardware.cpu_has_native_bf16(frozenset({"avx512f", "avx512_bf16"}))
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN capped below its bf16 kernels
    assert not hardware.cpu_has_native_bf16(SAPPHIRE)


FAKE_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Fake(R) Xeon(R) Test CPU @ 2.10GHz
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 fma

processor\t: 1
model name\t: Fake(R) Xeon(R) Test CPU @ 2.10GHz
flags\t\t: fpu sse4_2 avx avx2 avx512f avx512_bf16 fma
"""


def test_cpu_described_from_its_cpuinfo(tmp_path):
    """A known cpuinfo file: the model name and exactly the precision-relevant flags it lists."""
    path = tmp_path / "cpuinfo"
    path.write_text(FAKE_CPUINFO)
    assert hardware.cpu_flags(str(path)) == frozenset({"fpu", "sse4_2", "avx", "avx2", "avx512f", "avx512_bf16",
                                                      "fma"})
    text = hardware.cpu_description(str(path))
    assert text.startswith("Fake(R) Xeon(R) Test CPU @ 2.10GHz; torch CPU capability "), text
    assert text.endswith("flags: avx2 avx512_bf16 avx512f"), text  # amx_* and avx512_vnni are not listed
    missing = tmp_path / "nothing"
    assert hardware.cpu_description(str(missing)).startswith("unknown CPU;")
    assert hardware.cpu_description(str(missing)).endswith("flags: none")


def test_this_machine_is_described_from_proc_cpuinfo():
    """This machine: the model name /proc/cpuinfo gives (read here independently), and its bf16 flag."""
    try:
        lines = open("/proc/cpuinfo").read().splitlines()
    except OSError:
        return  # not Linux: nothing to compare with
    model = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), None)
    if model is not None:
        assert hardware.cpu_description().startswith(model + ";")
    flags = next((set(line.split(":", 1)[1].split()) for line in lines if line.startswith("flags")), set())
    assert ("avx512_bf16" in hardware.cpu_description()) == ("avx512_bf16" in flags)


def test_warning_only_for_bf16_on_a_cpu_without_it(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cpu = torch.device("cpu")
    assert hardware.bf16_cpu_warning("bf16", cpu, flags=SAPPHIRE) is None
    assert hardware.bf16_cpu_warning("fp32", cpu, flags=AVX2_ONLY) is None
    assert hardware.bf16_cpu_warning("bf16", torch.device("cuda", 0), flags=AVX2_ONLY) is None
    message = hardware.bf16_cpu_warning("bf16", cpu, flags=AVX2_ONLY)
    assert "--set torch_autocast.enabled=false" in message
    assert re.search(r"measured \d+x slower than fp32", message), message  # measured here, not quoted


def test_matmul_probe_measures_something():
    assert hardware.measure_matmul_tflops(torch.float32, size=64, min_time_s=0.01) > 0


def test_build_warns_once_on_rank_zero(monkeypatch, capsys):
    from engine.config import schema as config
    from engine.train import build

    monkeypatch.setattr(hardware, "cpu_flags", lambda path="/proc/cpuinfo": AVX2_ONLY)
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    cfg = config.load("ds_configs/r50.json")  # bf16 autocast as shipped
    assert cfg.precision == "bf16"
    build.warn_about_precision(cfg, torch.device("cpu"))
    err = capsys.readouterr().err
    assert err.count("warning: bf16 autocast on a CPU without native bf16") == 1
    fp32 = config.load("ds_configs/r50.json", ["torch_autocast.enabled=false"])
    build.warn_about_precision(fp32, torch.device("cpu"))
    assert capsys.readouterr().err == ""
