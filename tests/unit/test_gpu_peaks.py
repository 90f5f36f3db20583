"""engine.perf.hardware's GPU peaks for MFU: the exact model from the device name (H100 SXM vs PCIe vs NVL, H200,
GH200, A100, ...) and the precision's own datasheet figure (bf16/fp16 dense, TF32, plain fp32)."""
import pytest
import torch

from engine.perf import hardware, report


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "H100 SXM"),
    ("NVIDIA H100 PCIe", "H100 PCIe"),
    ("NVIDIA H100 NVL", "H100 NVL"),
    ("NVIDIA H200", "H200 SXM"),
    ("NVIDIA H200 NVL", "H200 NVL"),
    ("NVIDIA GH200 480GB", "GH200"),
    ("NVIDIA A100-SXM4-80GB", "A100"),
    ("NVIDIA A100 80GB PCIe", "A100"),
    ("NVIDIA A10", "A10"),
    ("NVIDIA L40S", "L40S"),
    ("NVIDIA L4", "L4"),
    ("Tesla V100-SXM2-32GB", "V100 SXM2"),
    ("Tesla V100-PCIE-16GB", "V100 PCIe"),
])
def test_model_from_device_name(name, model):
    assert hardware.gpu_model(name).model == model


def test_unknown_gpus_are_not_guessed():
    for name in ("NVIDIA GeForce RTX 4090", "NVIDIA A10G", "AMD Instinct MI300X"):
        assert hardware.gpu_model(name) is None
        assert hardware.gpu_peak_tflops(name, "bf16") is None


def test_peak_per_precision():
    h100 = "NVIDIA H100 80GB HBM3"
    assert hardware.gpu_peak_tflops(h100, "bf16") == (989.5, "table: H100 SXM bf16 dense")
    assert hardware.gpu_peak_tflops(h100, "fp16") == (989.5, "table: H100 SXM fp16 dense")
    assert hardware.gpu_peak_tflops(h100, "fp32", tf32=True) == (494.5, "table: H100 SXM tf32 dense")
    assert hardware.gpu_peak_tflops(h100, "fp32", tf32=False) == (67.0, "table: H100 SXM fp32 dense")
    # NVL is not SXM: lower clocks and power
    assert hardware.gpu_peak_tflops("NVIDIA H100 NVL", "bf16")[0] == 835.5
    assert hardware.gpu_peak_tflops("NVIDIA H100 PCIe", "bf16")[0] == 756.0
    # V100: fp16 tensor cores only
    assert hardware.gpu_peak_tflops("Tesla V100-SXM2-32GB", "bf16") is None
    assert hardware.gpu_peak_tflops("Tesla V100-SXM2-32GB", "fp32", tf32=True) == (15.7, "table: V100 SXM2 fp32 dense")
    with pytest.raises(ValueError, match="'int8'"):
        hardware.gpu_peak_tflops(h100, "int8")


def test_fp32_follows_cudnn_tf32(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert hardware.gpu_peak_tflops("NVIDIA H200", "fp32")[0] == 67.0
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert hardware.gpu_peak_tflops("NVIDIA H200", "fp32")[0] == 494.5


def test_profile_uses_the_exact_model(monkeypatch):
    """engine.profile's peak on a GPU: the device's own row (an H100 NVL was taken for an SXM before)."""
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 NVL")
    peak, source = report.device_peak_tflops("bf16", torch.device("cuda", 0), None)
    assert (peak, source) == (835.5, "table: H100 NVL bf16 dense")
    assert report.device_peak_tflops("bf16", torch.device("cuda", 0), 100.0) == (100.0, "given")


def test_plan_card_table_is_derived_from_the_model_table():
    """engine.plan --card: "H100 NVL" is its own row and comes before "H100"; values are the model table's."""
    keys = list(report.GPU_PEAK_TFLOPS)
    assert keys.index("H100 NVL") < keys.index("H100") and keys.index("H100 PCIe") < keys.index("H100")
    assert report.GPU_PEAK_TFLOPS["H100"]["bf16"] == hardware.gpu_model("NVIDIA H100 80GB HBM3").bf16
    assert report.GPU_PEAK_TFLOPS["V100"]["bf16"] is None
