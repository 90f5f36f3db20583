"""IResNet (r18 ... r200, r2060): arcface_torch's ``iresnet.py`` / ``iresnet2060.py`` as pure modules.

Structure, parameter names and initialisation follow arcface_torch exactly, so its published weights load with
``load_state_dict(strict=True)``. What is deliberately left out, and where it went:

* ``fp16`` (``torch.cuda.amp.autocast`` around the body): precision is the engine's DeepSpeed config.
* ``using_ckpt`` (a module global) and iresnet2060's built-in ``checkpoint_sequential(layer2, 20)`` /
  ``(layer3, 100)``: activation checkpointing is done by ``engine.parallel`` on ``checkpoint_units()``.
* ``groups`` / ``width_per_group`` / ``replace_stride_with_dilation`` / ``zero_init_residual``: every
  arcface_torch model uses the defaults (1, 64, no dilation, False), so they are fixed here.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .registry import check_dropout, is_materialised, register_backbone, reset_all_parameters

__all__ = ["IRESNET_LAYERS", "IBasicBlock", "IResNet"]

# Blocks per stage (layer1..layer4). r2060 is arcface_torch's iresnet2060: [3, 128, 1024 - 128, 3].
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "r18": (2, 2, 2, 2),
    "r34": (3, 4, 6, 3),
    "r50": (3, 4, 14, 3),
    "r100": (3, 13, 30, 3),
    "r200": (6, 26, 60, 6),
    "r2060": (3, 128, 896, 3),
}
STAGE_WIDTHS = (64, 128, 256, 512)
BN_EPS = 1e-5
FC_SPATIAL = 7 * 7  # 112 input halved by each of the four stride-2 stages


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """Pre-activation "improved" basic block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN, plus identity/downsample."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        # Attribute order is the state_dict order of arcface_torch's block.
        self.bn1 = nn.BatchNorm2d(inplanes, eps=BN_EPS)
        self.conv1 = conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=BN_EPS)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn3(self.conv2(self.prelu(self.bn2(self.conv1(self.bn1(x))))))
        identity = x if self.downsample is None else self.downsample(x)
        # Out of place (arcface_torch uses +=): same values, and safe under recomputation by checkpointing.
        return out + identity


@register_backbone("r18", layers=IRESNET_LAYERS["r18"])
@register_backbone("r34", layers=IRESNET_LAYERS["r34"])
@register_backbone("r50", layers=IRESNET_LAYERS["r50"])
@register_backbone("r100", layers=IRESNET_LAYERS["r100"])
@register_backbone("r200", layers=IRESNET_LAYERS["r200"])
@register_backbone("r2060", layers=IRESNET_LAYERS["r2060"])
class IResNet(nn.Module):
    """arcface_torch IResNet for 112x112 RGB input.

    stem conv3x3(3, 64)-BN-PReLU (stride 1) -> four stages of IBasicBlocks (64, 128, 256, 512 channels), the
    first block of each with stride 2 and a conv1x1+BN downsample -> bn2 -> flatten -> dropout ->
    fc(512*7*7 -> embedding_size) -> ``features`` BatchNorm1d whose weight is frozen at 1.0 (so the number of
    trainable parameters is the total minus ``embedding_size``).

    Args:
        layers: IBasicBlocks per stage (architecture; see ``IRESNET_LAYERS``).
        embedding_size: output width.
        dropout: probability of the dropout before ``fc`` (arcface_torch trains with 0).
        init: run ``init_weights()`` now; skipped while parameters are not materialised (meta device, ZeRO-3
            ``zero.Init``), see ``registry.is_materialised``.
    """

    # Registry facts (see backbones.registry): checkpoint_units() keys; ``features`` is a BatchNorm1d over [B, E].
    CHECKPOINT_STAGES = ("layer1", "layer2", "layer3", "layer4")
    FEATURE_BATCHNORM1D = True

    def __init__(self, layers: Sequence[int], *, embedding_size: int = 512, dropout: float = 0.0,
                 init: bool = True) -> None:
        super().__init__()
        layers = tuple(int(n) for n in layers)
        if len(layers) != 4 or min(layers) < 1:
            raise ValueError(f"layers must be 4 positive block counts, got {layers!r}")
        self.layers_per_stage = layers
        self.embedding_size = embedding_size
        self.conv1 = nn.Conv2d(3, STAGE_WIDTHS[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(STAGE_WIDTHS[0], eps=BN_EPS)
        self.prelu = nn.PReLU(STAGE_WIDTHS[0])
        inplanes = STAGE_WIDTHS[0]
        for i, (planes, num_blocks) in enumerate(zip(STAGE_WIDTHS, layers), start=1):
            setattr(self, f"layer{i}", self._make_stage(inplanes, planes, num_blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(STAGE_WIDTHS[-1], eps=BN_EPS)
        self.dropout = nn.Dropout(p=check_dropout(dropout))
        self.fc = nn.Linear(STAGE_WIDTHS[-1] * FC_SPATIAL, embedding_size)
        self.features = nn.BatchNorm1d(embedding_size, eps=BN_EPS)
        self.features.weight.requires_grad_(False)
        if init and is_materialised(self):
            self.init_weights()

    @staticmethod
    def _make_stage(inplanes: int, planes: int, num_blocks: int) -> nn.Sequential:
        # Every stage halves the resolution, so its first block always has a downsample branch.
        downsample = nn.Sequential(conv1x1(inplanes, planes, stride=2), nn.BatchNorm2d(planes, eps=BN_EPS))
        blocks = [IBasicBlock(inplanes, planes, stride=2, downsample=downsample)]
        blocks += [IBasicBlock(planes, planes) for _ in range(1, num_blocks)]
        return nn.Sequential(*blocks)

    @staticmethod
    @torch.no_grad()
    def init_module(m: nn.Module) -> None:
        """arcface_torch's rule for one module's own tensors, on top of PyTorch's default init.

        Conv2d weight ~ N(0, 0.1); BatchNorm2d weight 1, bias 0; everything else keeps PyTorch's default (``fc``
        kaiming-uniform, PReLU 0.25, ``features`` BatchNorm1d weight 1). No zero-init of residual BNs
        (arcface_torch's ``zero_init_residual`` defaults to False). Applied module by module, it also serves
        ``deepspeed.zero.Init`` (see ``registry.get_init_fn``).
        """
        if isinstance(m, nn.Conv2d):
            nn.init.normal_(m.weight, 0.0, 0.1)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_weights(self) -> None:
        """arcface_torch's initialisation, defining every parameter and buffer (also after ``to_empty``).

        PyTorch defaults (``reset_parameters``, including BN running statistics), then ``init_module`` on every
        module; ``features.weight`` stays frozen at 1.0.
        """
        reset_all_parameters(self, skip=(nn.Conv2d,))  # conv weights are all redrawn; they have no bias
        for m in self.modules():
            self.init_module(m)
        self.features.weight.requires_grad_(False)

    def checkpoint_units(self) -> "OrderedDict[str, nn.Sequential]":
        """The four stages, layer1..layer4: plain chains of IBasicBlocks for activation checkpointing."""
        return OrderedDict((f"layer{i}", getattr(self, f"layer{i}")) for i in range(1, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        x = torch.flatten(x, 1)  # logical (C, H, W) order, also for channels_last input
        x = self.dropout(x)
        x = self.fc(x)
        return self.features(x)
