"""ONNX export of a trained backbone, checked against PyTorch with onnxruntime.

    python -m engine.export --model outputs/r50/model.pt --backbone r50 --embedding-size 512 --onnx r50.onnx
    python -m engine.export --model outputs/r50/model.pt --onnx r50.onnx   # the two from its config.json

The weights (ArcScale's ``model.pt`` or an arcface_torch ``.pth``: the same state_dict) are loaded with
``torch.load(weights_only=True)`` (nothing in the file can run code) into ``backbones.build_backbone`` strictly,
in eval mode, and exported with a dynamic batch dimension:

    input  "input"      float32 [N, 3, 112, 112]
    output "embedding"  float32 [N, embedding_size]   (not L2-normalised, as the PyTorch model returns it)

**Preprocessing** (the model expects exactly what training fed it; ``dali_pipes`` and arcface_torch both do
this): a face aligned to arcface's 112x112 five-point template, **RGB** channel order (not OpenCV's BGR), NCHW,
``(pixel / 255 - 0.5) / 0.5`` i.e. ``(pixel - 127.5) / 127.5`` in [-1, 1]. The same text is stored in the ONNX
file's metadata (``preprocessing``), with ``backbone`` and ``embedding_size``.

**BatchNorm folding.** Nothing is folded by hand; the exporter folds every BatchNorm that follows a Conv or a
Linear (its scale and shift become the layer's weights and bias, exactly): of r18's 31 BatchNorm layers 9 remain
as nodes, of mbf's 50 and vit_t's 2 none (counted in the exported graphs; ``tests/unit/test_export.py`` checks r18's).
What remains are BatchNorms *before* a layer, which cannot all be folded exactly:

* IResNet's ``bn1`` at the start of each block feeds a 3x3 convolution with zero padding. Folding it into that
  conv would pad with ``-shift/scale`` instead of 0, changing every border pixel, so it stays.
* IResNet's ``bn2`` before the flatten and ``fc`` could be folded into ``fc`` exactly. Measured on r50 with
  onnxruntime (CPU, batch 8, one thread, same process, interleaved runs): 1149 ms folded vs 1151 ms not, within
  noise, so the graph keeps the layer arcface_torch's weights name.

onnxruntime's own graph optimisation (on by default) fuses further at load time.

**Size.** The ONNX protobuf holds at most 2 GiB. Backbones with more weights than ``EXTERNAL_DATA_BYTES``
(r2060: 1.12 B parameters, 4.5 GB in fp32 -- the only one) are written with ONNX external data: the graph in
``r2060.onnx`` and every weight in ``r2060.onnx.data`` beside it; keep both files together (onnxruntime finds
the data file by the name stored in the graph). ``--external-data`` forces this layout for any model. The r2060
export is not run by the tests (it needs ~15 GB of host memory: model, exported copy, onnxruntime session).

**Check.** After export, a random batch of 2 (uniform in [-1, 1], as normalised images are) runs through
PyTorch and onnxruntime (CPU). The export is judged relative to the outputs' scale, which varies by orders of
magnitude between backbones and training states (an untrained IResNet's embeddings reach 1e7, a trained one's
about 10, an untrained MobileFaceNet's 1e-6): it fails (exit 1) unless max |onnxruntime - PyTorch| <= ``rtol``
(1e-4) x max |PyTorch output|, and every L2-normalised embedding pair has cosine >= 1 - 1e-5. float32 rounding
gives about 2e-6 of the scale and 1 - 1e-12 in cosine (r18, mbf, vit_t); a wrong weight or a wrong fold gives
far more. The graph's input/output names and its dynamic batch dimension are checked as well.

**Nothing half-checked is left.** The files are written into a temporary folder beside the target and moved into
place only once the check passes (``--no-verify``: at once), graph and external data together; a failed export
or check leaves the target as it was (an earlier ``r50.onnx`` there is kept).

Exporters: ``--exporter dynamo`` (default; ``torch.export`` based, needs ``onnxscript``) or ``torchscript``
(the older tracer, deprecated in torch; faster, single-file only). Both are installed by ``pip install .[export]``.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Union

import numpy as np
import torch
from torch import nn

from engine.runtime.progress import progress
from engine.state.weights import load_backbone, model_settings, read_state_dict

__all__ = ["INPUT_NAME", "OUTPUT_NAME", "PREPROCESSING", "read_state_dict", "load_backbone", "export_onnx",
           "verify_onnx", "graph_summary", "main"]

INPUT_NAME = "input"
OUTPUT_NAME = "embedding"
IMAGE_SIZE = 112
DEFAULT_OPSET = 18  # the dynamo exporter's native opset
MIN_OPSET = 17  # the oldest opset the export supports
# Weights above this go to an external data file: protobuf's hard limit is 2 GiB for the whole message.
EXTERNAL_DATA_BYTES = int(1.8 * 2 ** 30)
DEFAULT_RTOL = 1e-4  # max |onnxruntime - PyTorch| / max |PyTorch output|
DEFAULT_COS_TOL = 1e-5  # 1 - min cosine of the L2-normalised embeddings
PREPROCESSING = ("RGB, NCHW float32 [N, 3, 112, 112], (pixel / 255 - 0.5) / 0.5, face aligned to arcface's "
                 "112x112 five-point template")


# The dynamo exporter logs a warning per torchvision operator it cannot register when torchvision is absent;
# backbones use none of them.
_REGISTRATION_LOGGER = "torch.onnx._internal.exporter._registration"


@contextlib.contextmanager
def _quiet_logger(name: str) -> Iterator[None]:
    """`name`'s records below ERROR dropped for the duration."""
    logger = logging.getLogger(name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _num_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def export_onnx(model: nn.Module, path: Union[str, Path], *, opset: int = DEFAULT_OPSET, exporter: str = "dynamo",
                external_data: Optional[bool] = None, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Export `model` (eval mode, fp32, CPU) to ONNX with a dynamic batch dimension.

    Args:
        model: an image backbone [N, 3, 112, 112] -> [N, E].
        path: the .onnx file to write (parent directories are created).
        opset: ONNX opset (>= 17).
        exporter: ``"dynamo"`` (torch.export + onnxscript) or ``"torchscript"`` (the deprecated tracer).
        external_data: weights in ``<path>.data`` beside the graph; None: only when they exceed
            ``EXTERNAL_DATA_BYTES`` (the protobuf limit).
        metadata: extra ``metadata_props`` key/values stored in the file (``preprocessing`` is always added).

    Returns:
        `path`.
    """
    if opset < MIN_OPSET:
        raise ValueError(f"--opset: expected >= {MIN_OPSET}, got {opset}")
    if exporter not in ("dynamo", "torchscript"):
        raise ValueError(f"--exporter: expected 'dynamo' or 'torchscript', got {exporter!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    big = _num_bytes(model) > EXTERNAL_DATA_BYTES
    if external_data is None:
        external_data = big
    model = model.float().eval()
    example = torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad(), warnings.catch_warnings(), _quiet_logger(_REGISTRATION_LOGGER):
        warnings.simplefilter("ignore")  # the exporters' deprecation and tracer chatter
        if exporter == "dynamo":
            batch = torch.export.Dim("batch")
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=True, external_data=external_data,
                              dynamic_shapes=({0: batch},), verbose=False)
        else:
            if big or external_data:
                raise ValueError("--exporter torchscript writes single-file models under 2 GiB only; use "
                                 "--exporter dynamo for external data (r2060)")
            torch.onnx.export(model, (example,), str(path), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamo=False, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}})
    _set_metadata(path, {"preprocessing": PREPROCESSING, **(metadata or {})})
    return path


def _set_metadata(path: Path, props: Dict[str, str]) -> None:
    """Add metadata_props to the graph file; external weights (if any) are left where they are."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    existing = {p.key: p for p in proto.metadata_props}
    for key, value in props.items():
        entry = existing.get(key) or proto.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.save(proto, str(path))


def graph_summary(path: Union[str, Path]) -> Dict[str, Any]:
    """Names, shapes, opset, node counts and files of an exported model (weights are not loaded)."""
    import onnx

    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)

    def dims(value_info) -> list:
        return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

    ops: Dict[str, int] = {}
    for node in proto.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    data_files = sorted({entry.value for init in proto.graph.initializer for entry in init.external_data
                         if entry.key == "location"})
    size = path.stat().st_size + sum((path.parent / f).stat().st_size for f in data_files)
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    return dict(inputs={i.name: dims(i) for i in proto.graph.input},
                outputs={o.name: dims(o) for o in proto.graph.output}, opset=opset, ops=ops,
                external_data=data_files, num_bytes=size,
                metadata={p.key: p.value for p in proto.metadata_props})


def verify_onnx(model: nn.Module, path: Union[str, Path], *, batch_size: int = 2, seed: int = 0,
                rtol: float = DEFAULT_RTOL, cos_tol: float = DEFAULT_COS_TOL) -> Dict[str, Any]:
    """Run the same random batch through `model` (PyTorch, CPU) and the ONNX file (onnxruntime, CPU).

    The batch is uniform in [-1, 1], the range of normalised training images. The outputs must agree within
    `rtol` times the largest |PyTorch output| (the outputs' own scale: an absolute limit would fail an untrained
    IResNet whose outputs reach 1e7 and pass anything on an untrained MobileFaceNet whose outputs are 1e-6), and
    every pair of L2-normalised embeddings within `cos_tol` of cosine 1. Besides the outputs, checks that the graph
    has the input/output names above and a symbolic (dynamic) batch dimension.

    Returns:
        dict with ``max_abs_diff``, ``max_abs_output``, ``rel_diff`` (their ratio), ``min_cosine`` (of
        L2-normalised embeddings, float64), ``problems`` (list of strings; empty when everything matches) and ``ok``.
    """
    import onnxruntime as ort

    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, IMAGE_SIZE, IMAGE_SIZE, generator=gen) * 2 - 1
    with torch.no_grad():
        ref = model.float().eval()(x).numpy().astype(np.float64)
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about the host's CPU features are not ours to show
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # a one-off run: no busy-waiting
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0].astype(np.float64)
    problems = []
    summary = graph_summary(path)
    if list(summary["inputs"]) != [INPUT_NAME] or list(summary["outputs"]) != [OUTPUT_NAME]:
        problems.append(f"graph inputs/outputs are {list(summary['inputs'])}/{list(summary['outputs'])}, "
                        f"expected ['{INPUT_NAME}']/['{OUTPUT_NAME}']")
    else:
        in_dims, out_dims = summary["inputs"][INPUT_NAME], summary["outputs"][OUTPUT_NAME]
        if not isinstance(in_dims[0], str) or not isinstance(out_dims[0], str):
            problems.append(f"batch dimension is fixed ({in_dims} -> {out_dims}), expected a symbolic one")
        if in_dims[1:] != [3, IMAGE_SIZE, IMAGE_SIZE]:
            problems.append(f"input shape {in_dims}, expected [N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}]")
    scale = float(np.abs(ref).max())
    if out.shape != ref.shape:
        problems.append(f"onnxruntime output shape {out.shape}, PyTorch {ref.shape}")
        return dict(max_abs_diff=float("inf"), max_abs_output=scale, rel_diff=float("inf"), min_cosine=-1.0,
                    problems=problems, ok=False)
    max_abs = float(np.abs(out - ref).max())
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else float("inf"))
    a = ref / np.maximum(np.linalg.norm(ref, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    b = out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.finfo(np.float64).tiny)
    min_cos = float(np.min(np.sum(a * b, axis=1)))
    if not rel <= rtol:  # also catches NaN
        problems.append(f"max |onnxruntime - PyTorch| = {max_abs:.3g} is {rel:.3g} of the largest |output| "
                        f"{scale:.3g}, more than {rtol:g}")
    if not min_cos >= 1 - cos_tol:
        problems.append(f"min cosine of L2-normalised embeddings = {min_cos:.9f} < 1 - {cos_tol:g}")
    return dict(max_abs_diff=max_abs, max_abs_output=scale, rel_diff=rel, min_cosine=min_cos, problems=problems,
                ok=not problems)


def _written_files(path: Path) -> list:
    """The graph file and the external data files it names (all in its folder)."""
    return [path.name, *graph_summary(path)["external_data"]]


def _count_batchnorms(model: nn.Module) -> int:
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="ArcScale model.pt or arcface_torch backbone .pth")
    parser.add_argument("--backbone", default=None, help="backbone name, e.g. r50, mbf, vit_t (default: from the "
                                                         "run's config.json beside --model)")
    parser.add_argument("--embedding-size", type=int, default=None,
                        help="output width (default: from config.json beside --model, else 512)")
    parser.add_argument("--onnx", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo")
    parser.add_argument("--external-data", action="store_true",
                        help="weights in <onnx>.data even below 2 GiB (automatic above)")
    parser.add_argument("--rtol", type=float, default=DEFAULT_RTOL,
                        help=f"max |onnxruntime - PyTorch| allowed, as a fraction of the largest |output| "
                             f"(default {DEFAULT_RTOL:g})")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)
    try:
        import onnx  # noqa: F401  (fail here, with the fix, rather than deep inside torch.onnx)
        import onnxruntime  # noqa: F401
    except ImportError as exc:
        print(f"error: {exc.name} is not installed; install the export extra: pip install -e '.[export]'",
              file=sys.stderr)
        return 2
    target = Path(args.onnx)
    try:
        args.backbone, args.embedding_size, origin = model_settings(args.model, args.backbone, args.embedding_size)
        if origin != "given":
            print(f"backbone {args.backbone}, embedding size {args.embedding_size}: from {origin}")
        model = load_backbone(args.model, args.backbone, embedding_size=args.embedding_size)
        num_bytes = _num_bytes(model)
        if num_bytes > EXTERNAL_DATA_BYTES:
            print(f"note: {args.backbone} has {num_bytes / 1e9:.2f} GB of weights, over protobuf's 2 GiB limit: "
                  f"they go to {target.name}.data beside {target} (ONNX external data); keep both files together",
                  flush=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    except (ValueError, FileNotFoundError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stages = progress(total=2 if args.no_verify else 3, desc="export", unit="stage")  # export, check, move
    try:  # everything is written under `staging`; only a checked export is moved to `target`
        t0 = time.perf_counter()
        try:
            staged = export_onnx(model, staging / target.name, opset=args.opset, exporter=args.exporter,
                                 external_data=True if args.external_data else None,
                                 metadata={"backbone": args.backbone, "embedding_size": str(args.embedding_size)})
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        stages.update()
        s = graph_summary(staged)
        files = _written_files(staged)
        print(f"exported {args.backbone} ({' + '.join(files)}, {s['num_bytes'] / 1e6:.1f} MB, opset {s['opset']}, "
              f"{args.exporter} exporter, {time.perf_counter() - t0:.1f} s)")
        print(f"  input  '{INPUT_NAME}' {s['inputs'].get(INPUT_NAME)} float32: {PREPROCESSING}")
        print(f"  output '{OUTPUT_NAME}' {s['outputs'].get(OUTPUT_NAME)} float32, not L2-normalised")
        print(f"  BatchNormalization nodes: {s['ops'].get('BatchNormalization', 0)} of the model's "
              f"{_count_batchnorms(model)} BatchNorm layers (the rest folded into the Conv/Gemm before them)")
        if not args.no_verify:
            result = verify_onnx(model, staged, rtol=args.rtol)
            stages.update()
            verdict = "OK" if result["ok"] else "MISMATCH"
            print(f"onnxruntime vs PyTorch (batch 2): max |diff| {result['max_abs_diff']:.3g} = "
                  f"{result['rel_diff']:.3g} of the largest |output| {result['max_abs_output']:.3g} (limit "
                  f"{args.rtol:g}), min cosine 1 - {1 - result['min_cosine']:.3g} (limit 1 - {DEFAULT_COS_TOL:g}): "
                  f"{verdict}", flush=True)
            if not result["ok"]:
                for problem in result["problems"]:
                    print(f"  {problem}", file=sys.stderr)
                print(f"error: the export does not match the PyTorch model; nothing written to {target}",
                      file=sys.stderr)
                return 1
        for name in files[1:] + files[:1]:  # the data files first: the graph never appears without its weights
            (staging / name).replace(target.parent / name)
        stages.update()
        print(f"wrote {target}" + (f" + {', '.join(files[1:])}" if len(files) > 1 else ""))
        return 0
    finally:
        stages.close()
        shutil.rmtree(staging, ignore_errors=True)
