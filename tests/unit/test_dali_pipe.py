"""The DALI loader's GPU branch, checked structurally on the CPU: which GPU the pipeline is for, that it decodes on
it (``device="mixed"``) and that every image op after the decoder and the images it returns are on the GPU,
while the CPU pipeline the loader tests run is the same graph with a CPU decoder. The graph is defined without
being built (building needs the device): DALI's Python-side graph (Pipeline._build_graph) is walked from the
outputs. Running a GPU pipeline needs CUDA and DALI's GPU wheel, which the lent GPU machines do not have."""
from types import SimpleNamespace

import torch

from dali_pipes import dali_pipe
from dali_pipes.augment import parse_augment
from dali_pipes.source import ShardPlan

AUGMENT = parse_augment(["flip", "resize", "blur", "hsv", "gray"])


def _graph(device_id, resize="none"):
    """(pipeline, {op name: [devices]}, [output devices]) of the pipeline for `device_id`, defined, not built."""
    p = dali_pipe.define_pipeline(4, 1, device_id, AUGMENT, lambda: None, resize=resize)
    p._build_graph()
    ops, seen, stack = {}, set(), [o.source for o in p._graph_out]
    while stack:
        inst = stack.pop()
        if inst is None or id(inst) in seen:
            continue
        seen.add(id(inst))
        name = getattr(inst._op, "schema_name", type(inst._op).__name__)  # ExternalSource has no schema_name
        ops.setdefault(name, []).append(inst._op.device)
        stack.extend(i.source for i in inst.inputs)
    return p, ops, [o.device for o in p._graph_out]


def test_device_id_is_the_torch_devices_gpu(monkeypatch):
    assert dali_pipe.dali_device_id(torch.device("cuda", 2)) == 2
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert dali_pipe.dali_device_id(torch.device("cuda")) == 1  # "cuda": the current GPU, by number
    assert dali_pipe.dali_device_id(torch.device("cpu")) is None
    assert dali_pipe.decoder_device(3) == "mixed" and dali_pipe.decoder_device(None) == "cpu"


def test_gpu_pipeline_decodes_and_augments_on_its_gpu():
    p, ops, outputs = _graph(3)
    assert p.device_id == 3
    assert ops["decoders__Image"] == ["mixed"]
    for name in ("Resize", "GaussianBlur", "Hsv", "CropMirrorNormalize"):  # everything after the decoder
        assert set(ops[name]) == {"gpu"}, (name, ops[name])
    assert set(ops["ExternalSource"]) == {"cpu"}  # the fed bytes and parameters start on the host
    assert outputs == ["gpu", "cpu"]  # the images on the GPU; the decoded shapes (resize "none") on the host
    assert _graph(3, resize="pad")[2] == ["gpu"]


def test_cpu_pipeline_is_the_same_graph_on_the_cpu():
    p, ops, outputs = _graph(None)
    gpu = _graph(0)[1]
    assert p.device_id is None
    assert ops["decoders__Image"] == ["cpu"] and outputs == ["cpu", "cpu"]
    assert all(device == "cpu" for devices in ops.values() for device in devices)
    assert {name: len(devices) for name, devices in ops.items()} == {name: len(d) for name, d in gpu.items()}


def test_stream_builds_its_pipeline_for_the_loaders_gpu(monkeypatch):
    """A loader on cuda (the current GPU is 1): the stream's pipeline is for GPU 1 and its batches go to cuda:1."""
    built = []

    def capture(*args, **kwargs):
        built.append(dali_pipe.define_pipeline(*args, **kwargs))
        return SimpleNamespace()

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    monkeypatch.setattr(dali_pipe, "_build_pipeline", capture)
    monkeypatch.setattr(dali_pipe, "SampleFetcher", lambda *args: SimpleNamespace())
    loader = SimpleNamespace(plan=ShardPlan(16, 4, 0, 1, 0), device=torch.device("cuda"), source=None,
                             num_classes=4, on_corrupt="error", augment=AUGMENT, num_workers=2, resize="none")
    stream = dali_pipe.DaliStream(loader, 0, 0)
    assert stream.device_id == 1 and stream.device == torch.device("cuda", 1)
    assert built[0].device_id == 1
    built[0]._build_graph()
    assert built[0]._graph_out[0].device == "gpu"
    cpu_loader = SimpleNamespace(**{**vars(loader), "device": torch.device("cpu")})
    assert dali_pipe.DaliStream(cpu_loader, 0, 0).device_id is None and built[1].device_id is None
