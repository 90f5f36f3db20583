"""Memory layout: a backbone's training forward + backward with NCHW (contiguous) vs NHWC (channels_last) images
and weights, and NHWC images with NCHW weights ("mixed"), on this machine's device, in one run.

    python bench/channels_last.py [--backbones r18,r50,mbf] [--precision fp32|bf16|fp16] [--micro-batch 8]
                                  [--threads N] [--rounds 6] [--device cpu|cuda] [--json PATH]

What `engine.model.channels_last` changes (the CNN recipes set it): the same model and mathematics, the
convolutions, BatchNorm and PReLU run on NHWC tensors (oneDNN's native layout on a CPU, cuDNN's for tensor-core
convolutions on a GPU). For each backbone: one model, built once and converted in place between the layouts
(`Module.to(memory_format=...)`), a fixed random batch, `torch.autocast` for bf16/fp16 as the engine runs them;
one untimed step per layout, then `--rounds` rounds of one timed step per layout, the order rotated and reversed
from round to round. Prints each layout's median seconds per step and the ratios NCHW / NHWC and NCHW / mixed
per round (> 1: faster than NCHW): median and range. "mixed" is what `channels_last` gives where the engine cannot
convert the weights (ZeRO 1-3 and FSDP2 keep parameters as views of flat buffers or shards, DeepSpeed's bf16/fp16
block as its own copies): NHWC images and activations, NCHW weights, so every convolution converts its weight in
the forward and its weight's gradient back in the backward. A GPU is synchronised around each timed step. The
result is this device's; a CPU without the instructions oneDNN's NHWC kernels use, or another GPU generation, may
differ: measure before relying on it.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DTYPES = {"bf16": "bfloat16", "fp16": "float16"}


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def measure(name: str, args: argparse.Namespace) -> dict:
    import torch

    import backbones

    device = torch.device(args.device)
    torch.manual_seed(0)
    model = backbones.build_backbone(name).to(device).train()
    images = torch.randn(args.micro_batch, 3, 112, 112, device=device)
    autocast = args.precision != "fp32"
    dtype = getattr(torch, DTYPES.get(args.precision, "float32"))

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def step(layout: str) -> float:
        model.to(memory_format=torch.channels_last if layout == "nhwc" else torch.contiguous_format)
        x = images.contiguous(memory_format=torch.contiguous_format if layout == "nchw" else torch.channels_last)
        model.zero_grad(set_to_none=True)
        sync()
        t = time.perf_counter()
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=autocast):
            out = model(x)
        out.float().square().mean().backward()
        sync()
        return time.perf_counter() - t

    layouts = ["nchw", "nhwc", "mixed"]
    for layout in layouts:  # warm-up: kernels chosen, buffers allocated
        step(layout)
    times = {layout: [] for layout in layouts}
    for r in range(args.rounds):
        order = layouts[r % 3:] + layouts[:r % 3]
        for layout in (order if r % 2 == 0 else order[::-1]):
            times[layout].append(step(layout))
    row = {"backbone": name, **{f"{layout}_s": round(statistics.median(times[layout]), 4) for layout in layouts}}
    for layout, key in (("nhwc", "ratio"), ("mixed", "mixed_ratio")):
        ratios = [a / b for a, b in zip(times["nchw"], times[layout])]
        row.update({f"{key}_median": round(statistics.median(ratios), 3), f"{key}_min": round(min(ratios), 3),
                    f"{key}_max": round(max(ratios), 3)})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", default="r18,r50,mbf")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=1, help="CPU threads (torch.set_num_threads)")
    p.add_argument("--rounds", type=int, default=6, help="ABBA pairs of timed steps per backbone")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    import torch

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    torch.set_num_threads(args.threads)
    capability = torch.backends.cpu.get_cpu_capability()
    where = (torch.cuda.get_device_name(0) if args.device == "cuda"
             else f"{cpu_name()}, {args.threads} thread(s), torch CPU capability {capability}")
    print(f"== channels_last: forward + backward, {args.precision}, micro-batch {args.micro_batch}, {where}")
    rows = []
    for name in [b for b in args.backbones.split(",") if b]:
        row = measure(name, args)
        rows.append(row)
        print(f"   {name:6s} NCHW {row['nchw_s']:.4f} s  NHWC {row['nhwc_s']:.4f} s  mixed {row['mixed_s']:.4f} s  "
              f"NCHW/NHWC median {row['ratio_median']:.3f} ({row['ratio_min']:.3f}..{row['ratio_max']:.3f})  "
              f"NCHW/mixed median {row['mixed_ratio_median']:.3f} ({row['mixed_ratio_min']:.3f}.."
              f"{row['mixed_ratio_max']:.3f})", flush=True)
    result = {"bench": "channels_last", "precision": args.precision, "micro_batch": args.micro_batch,
              "device": where, "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
