"""MobileFaceNet (mbf, mbf_large): arcface_torch's ``mobilefacenet.py`` as a pure module.

Structure, parameter names and initialisation follow arcface_torch (itself adapted from cavaface), so its
published weights load with ``load_state_dict(strict=True)``. Left out: ``fp16`` (autocast around the body;
precision is the engine's job). arcface_torch keeps the body in an ``nn.ModuleList`` called in a loop; here it is
an ``nn.Sequential`` (same state_dict keys) so it can be handed to activation checkpointing as one chain.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import torch
from torch import nn

from .registry import check_dropout, is_materialised, register_backbone, reset_all_parameters

__all__ = ["MBF_CONFIGS", "MobileFaceNet"]

# blocks: residual DepthWise blocks in the four Residual groups (the first group is a plain grouped ConvBlock
# when its count is 1); scale: width multiplier of the 64/128-channel body.
MBF_CONFIGS: dict[str, dict[str, object]] = {
    "mbf": {"blocks": (1, 4, 6, 2), "scale": 2},
    "mbf_large": {"blocks": (2, 8, 12, 4), "scale": 4},
}
GDC_CHANNELS = 512


class ConvBlock(nn.Module):
    """Conv (no bias) - BN - PReLU."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
            nn.PReLU(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class LinearBlock(nn.Module):
    """Conv (no bias) - BN, no activation."""

    def __init__(self, in_c: int, out_c: int, kernel=(1, 1), stride=(1, 1), padding=(0, 0), groups: int = 1):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Conv2d(in_c, out_c, kernel, stride=stride, padding=padding, groups=groups, bias=False),
            nn.BatchNorm2d(out_c),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class DepthWise(nn.Module):
    """Inverted bottleneck: 1x1 expand to ``groups`` channels, depthwise kxk, 1x1 linear project (+ shortcut)."""

    def __init__(self, in_c: int, out_c: int, residual: bool = False, kernel=(3, 3), stride=(2, 2),
                 padding=(1, 1), groups: int = 1):
        super().__init__()
        self.residual = residual
        self.layers = nn.Sequential(
            ConvBlock(in_c, groups, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
            ConvBlock(groups, groups, groups=groups, kernel=kernel, padding=padding, stride=stride),
            LinearBlock(groups, out_c, kernel=(1, 1), padding=(0, 0), stride=(1, 1)),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layers(x)
        return x + out if self.residual else out


class Residual(nn.Module):
    """``num_block`` residual DepthWise blocks at constant width."""

    def __init__(self, c: int, num_block: int, groups: int, kernel=(3, 3), stride=(1, 1), padding=(1, 1)):
        super().__init__()
        self.layers = nn.Sequential(*[DepthWise(c, c, True, kernel, stride, padding, groups) for _ in range(num_block)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class GDC(nn.Module):
    """Global depthwise conv head: 7x7 depthwise LinearBlock - flatten - linear (no bias) - BatchNorm1d."""

    def __init__(self, embedding_size: int):
        super().__init__()
        self.layers = nn.Sequential(
            LinearBlock(GDC_CHANNELS, GDC_CHANNELS, groups=GDC_CHANNELS, kernel=(7, 7), stride=(1, 1), padding=(0, 0)),
            nn.Flatten(1),  # arcface_torch uses x.view(B, -1); flatten also accepts channels_last
            nn.Linear(GDC_CHANNELS, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


@register_backbone("mbf", **MBF_CONFIGS["mbf"])
@register_backbone("mbf_large", **MBF_CONFIGS["mbf_large"])
class MobileFaceNet(nn.Module):
    """arcface_torch MobileFaceNet for 112x112 RGB input.

    Args:
        blocks: residual blocks per group (architecture; see ``MBF_CONFIGS``).
        scale: width multiplier (architecture).
        embedding_size: output width.
        dropout: must be 0.0. arcface_torch's MobileFaceNet has no dropout layer; the argument exists so that a
            shared ``engine.model.dropout`` of 0 works for every backbone, and a nonzero value is an error rather
            than silently ignored.
        init: run ``init_weights()`` now; skipped while parameters are not materialised (meta device, ZeRO-3
            ``zero.Init``), see ``registry.is_materialised``.
    """

    # Registry facts (see backbones.registry): checkpoint_units() keys; GDC ends in a BatchNorm1d over [B, E].
    CHECKPOINT_STAGES = ("layers",)
    FEATURE_BATCHNORM1D = True
    DROPOUT = False  # no dropout layer: only dropout=0 (engine.config refuses another value before start-up)

    def __init__(self, blocks: Sequence[int], scale: int, *, embedding_size: int = 512, dropout: float = 0.0,
                 init: bool = True) -> None:
        super().__init__()
        if check_dropout(dropout) != 0.0:
            raise ValueError(f"MobileFaceNet has no dropout layer (as in arcface_torch); got dropout={dropout!r}, "
                             "expected 0.0")
        blocks = tuple(int(b) for b in blocks)
        if len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"blocks must be 4 positive counts, got {blocks!r}")
        self.embedding_size = embedding_size
        c1, c2 = 64 * scale, 128 * scale
        if blocks[0] == 1:
            first = ConvBlock(c1, c1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), groups=64)
        else:
            first = Residual(c1, num_block=blocks[0], groups=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1))
        self.layers = nn.Sequential(
            ConvBlock(3, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1)),
            first,
            DepthWise(c1, c1, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=128),
            Residual(c1, num_block=blocks[1], groups=128, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            DepthWise(c1, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=256),
            Residual(c2, num_block=blocks[2], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
            DepthWise(c2, c2, kernel=(3, 3), stride=(2, 2), padding=(1, 1), groups=512),
            Residual(c2, num_block=blocks[3], groups=256, kernel=(3, 3), stride=(1, 1), padding=(1, 1)),
        )
        self.conv_sep = ConvBlock(c2, GDC_CHANNELS, kernel=(1, 1), stride=(1, 1), padding=(0, 0))
        self.features = GDC(embedding_size)
        if init and is_materialised(self):
            self.init_weights()

    @staticmethod
    @torch.no_grad()
    def init_module(m: nn.Module) -> None:
        """arcface_torch's rule for one module's own tensors, on top of PyTorch's default init.

        Conv2d and Linear weights kaiming-normal (fan_out, relu), biases 0; BatchNorm2d weight 1, bias 0;
        everything else keeps PyTorch's default (PReLU 0.25, BatchNorm1d 1/0). Applied module by module, it also
        serves ``deepspeed.zero.Init`` (see ``registry.get_init_fn``).
        """
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    @torch.no_grad()
    def init_weights(self) -> None:
        """arcface_torch's initialisation, defining every parameter and buffer (also after ``to_empty``).

        PyTorch defaults (``reset_parameters``, including BN running statistics), then ``init_module`` on every
        module.
        """
        reset_all_parameters(self, skip=(nn.Conv2d, nn.Linear))  # redrawn entirely by init_module
        for m in self.modules():
            self.init_module(m)

    def checkpoint_units(self) -> "OrderedDict[str, nn.Sequential]":
        """The body, ``layers``: stem, first group, and the three DepthWise+Residual pairs, as one chain."""
        return OrderedDict(layers=self.layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layers(x)
        x = self.conv_sep(x)
        return self.features(x)
