"""Vision Transformer (vit_t, vit_s, vit_b, vit_l, vit_h): arcface_torch's ``vit.py`` as a pure module.

Structure, parameter names and initialisation follow arcface_torch (9x9 patches on 112x112 -> 144 tokens, no
class token, LayerNorm, ReLU6 MLP, qkv without bias, random token masking in training, a flatten-linear-BN-
linear-BN ``feature`` head), so its published weights load with ``load_state_dict(strict=True)``.

Differences from arcface_torch, all without effect on the state_dict:

* no autocast regions (arcface forces the attention core to fp32 and the rest to fp16); precision is the engine's
  job. Attention uses ``F.scaled_dot_product_attention`` (same maths, scale head_dim**-0.5), whose fused kernels
  keep the softmax in fp32 under reduced precision.
* ``using_checkpoint`` is gone: activation checkpointing is done by ``engine.parallel`` on ``checkpoint_units()``.
* ``random_masking`` honours ``mask_ratio`` (arcface_torch only tests ``mask_ratio > 0`` and then always masks
  10%: its call passes no ratio). Identical for vit_t/s/b (0.1); vit_l masks 5% as its config says.
* ``blocks`` is an ``nn.Sequential`` (arcface: ``nn.ModuleList``; same keys); the ``norm_layer="bn"`` variant,
  used by no arcface_torch model, is not implemented; timm is not needed (DropPath is reimplemented).
* ``dropout`` maps to arcface's ``drop_rate`` (position, attention-output and MLP dropout; 0 in every config).
"""
from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from .registry import check_dropout, is_materialised, register_backbone, reset_all_parameters

__all__ = ["VIT_CONFIGS", "VisionTransformer"]

# From arcface_torch's get_model: vit_t/s/b as named there; vit_l is its "vit_l_dp005_mask_005", vit_h its
# "vit_h". All use img_size 112, patch 9, 8 heads, LayerNorm. drop_path_rate and mask_ratio are overridable.
VIT_CONFIGS: dict[str, dict[str, object]] = {
    "vit_t": {"embed_dim": 256, "depth": 12, "num_heads": 8, "drop_path_rate": 0.1, "mask_ratio": 0.1},
    "vit_s": {"embed_dim": 512, "depth": 12, "num_heads": 8, "drop_path_rate": 0.1, "mask_ratio": 0.1},
    "vit_b": {"embed_dim": 512, "depth": 24, "num_heads": 8, "drop_path_rate": 0.1, "mask_ratio": 0.1},
    "vit_l": {"embed_dim": 768, "depth": 24, "num_heads": 8, "drop_path_rate": 0.05, "mask_ratio": 0.05},
    "vit_h": {"embed_dim": 1024, "depth": 48, "num_heads": 8, "drop_path_rate": 0.1, "mask_ratio": 0.0},
}
FEATURE_BN_EPS = 2e-5
INIT_STD = 0.02


def _trunc_normal_(t: torch.Tensor, std: float, a: float = -2.0, b: float = 2.0) -> torch.Tensor:
    """timm's ``trunc_normal_(t, std=std)``: N(0, std) truncated to the absolute interval [a, b].

    With std 0.02 the bounds sit 100 standard deviations out, where the normal has no mass a float can show, so
    normal_ + clamp_ draws from the same distribution several times faster than the inverse-CDF method.
    """
    if min(-a, b) / std > 10.0:
        return t.normal_(0.0, std).clamp_(a, b)
    return nn.init.trunc_normal_(t, std=std, a=a, b=b)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm's DropPath, scale_by_keep=True)."""

    def __init__(self, drop_prob: float) -> None:
        super().__init__()
        self.drop_prob = drop_prob

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.drop_prob == 0.0 or not self.training:
            return x
        keep_prob = 1.0 - self.drop_prob
        keep = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep_prob)
        return x * keep.div_(keep_prob)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, drop: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.ReLU6()
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int, proj_drop: float) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)  # softmax(q k^T / sqrt(head_dim)) v
        return self.proj_drop(self.proj(x.transpose(1, 2).reshape(b, n, c)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, drop: float, drop_path: float) -> None:
        super().__init__()
        # Attribute order is the state_dict order of arcface_torch's block (norm1, norm2, attn, mlp).
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchEmbed(nn.Module):
    def __init__(self, img_size: int, patch_size: int, embed_dim: int, in_channels: int = 3) -> None:
        super().__init__()
        self.img_size = img_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != (self.img_size, self.img_size):
            raise ValueError(f"input is {tuple(x.shape[-2:])}, expected ({self.img_size}, {self.img_size})")
        return self.proj(x).flatten(2).transpose(1, 2)


@register_backbone("vit_t", **VIT_CONFIGS["vit_t"])
@register_backbone("vit_s", **VIT_CONFIGS["vit_s"])
@register_backbone("vit_b", **VIT_CONFIGS["vit_b"])
@register_backbone("vit_l", **VIT_CONFIGS["vit_l"])
@register_backbone("vit_h", **VIT_CONFIGS["vit_h"])
class VisionTransformer(nn.Module):
    """arcface_torch ViT for 112x112 RGB input.

    Args:
        embed_dim, depth, num_heads, img_size, patch_size, mlp_ratio: architecture (see ``VIT_CONFIGS``).
        embedding_size: output width.
        dropout: arcface's ``drop_rate``: dropout after the position embedding, attention projection and MLP.
        drop_path_rate: stochastic depth, rising linearly from 0 (first block) to this value (last block).
        mask_ratio: in training, this fraction of tokens is dropped before the blocks and replaced by
            ``mask_token`` after the final norm (arcface's random masking); 0 disables it. Never in eval.
        init: run ``init_weights()`` now; skipped while parameters are not materialised (meta device, ZeRO-3
            ``zero.Init``), see ``registry.is_materialised``.
    """

    # Registry facts (see backbones.registry): checkpoint_units() keys; ``feature`` has BatchNorm1d over [B, C].
    CHECKPOINT_STAGES = ("blocks",)
    FEATURE_BATCHNORM1D = True

    def __init__(self, embed_dim: int, depth: int, num_heads: int, img_size: int = 112, patch_size: int = 9,
                 mlp_ratio: float = 4.0, *, embedding_size: int = 512, dropout: float = 0.0,
                 drop_path_rate: float = 0.0, mask_ratio: float = 0.1, init: bool = True) -> None:
        super().__init__()
        dropout = check_dropout(dropout)
        drop_path_rate = check_dropout(drop_path_rate, "drop_path_rate")
        self.mask_ratio = check_dropout(mask_ratio, "mask_ratio")
        self.embed_dim = embed_dim
        self.embedding_size = embedding_size
        self.patch_embed = PatchEmbed(img_size, patch_size, embed_dim)
        self.num_patches = num_patches = self.patch_embed.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, embed_dim))
        self.pos_drop = nn.Dropout(p=dropout)
        # linspace(0, rate, depth) in Python: torch.linspace(...).item() would fail on the meta device.
        dpr = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[Block(embed_dim, num_heads, mlp_ratio, dropout, dpr[i]) for i in range(depth)])
        self.norm = nn.LayerNorm(embed_dim)
        self.feature = nn.Sequential(
            nn.Linear(embed_dim * num_patches, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=FEATURE_BN_EPS),
            nn.Linear(embed_dim, embedding_size, bias=False),
            nn.BatchNorm1d(embedding_size, eps=FEATURE_BN_EPS),
        )
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if init and is_materialised(self):
            self.init_weights()

    @staticmethod
    @torch.no_grad()
    def init_module(m: nn.Module) -> None:
        """arcface_torch's rule for one module's own tensors, on top of PyTorch's default init.

        Linear weight ~ truncated N(0, 0.02) cut at +-2 (absolute, as timm's trunc_normal_), bias 0; LayerNorm
        weight 1, bias 0; the model's own ``pos_embed`` ~ truncated N(0, 0.02) and ``mask_token`` ~ N(0, 0.02);
        everything else keeps PyTorch's default (``patch_embed`` conv kaiming-uniform, BatchNorm1d 1/0). Applied
        module by module, it also serves ``deepspeed.zero.Init`` (see ``registry.get_init_fn``).
        """
        if isinstance(m, nn.Linear):
            _trunc_normal_(m.weight, std=INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, VisionTransformer):
            nn.init.normal_(m.mask_token, std=INIT_STD)
            _trunc_normal_(m.pos_embed, std=INIT_STD)

    @torch.no_grad()
    def init_weights(self) -> None:
        """arcface_torch's initialisation, defining every parameter and buffer (also after ``to_empty``).

        PyTorch defaults (``reset_parameters``, including BN running statistics), then ``init_module`` on every
        module.
        """
        reset_all_parameters(self, skip=(nn.Linear,))  # redrawn entirely by init_module
        for m in self.modules():
            self.init_module(m)

    def checkpoint_units(self) -> "OrderedDict[str, nn.Sequential]":
        """The transformer blocks, ``blocks``: a plain chain (masking happens before and after it)."""
        return OrderedDict(blocks=self.blocks)

    def _random_masking(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep a random ``1 - mask_ratio`` of each sample's tokens; return them and the un-shuffle index."""
        n, length, d = x.shape
        len_keep = int(length * (1 - self.mask_ratio))
        noise = torch.rand(n, length, device=x.device)
        ids_shuffle = torch.argsort(noise, dim=1)  # small noise is kept
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        ids_keep = ids_shuffle[:, :len_keep]
        return torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, d)), ids_restore

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] -> flattened token features [B, num_patches * embed_dim]."""
        b = x.shape[0]
        x = self.pos_drop(self.patch_embed(x) + self.pos_embed)
        masking = self.training and self.mask_ratio > 0
        if masking:
            x, ids_restore = self._random_masking(x)
        x = self.blocks(x)
        x = self.norm(x)
        if masking:
            num_masked = ids_restore.shape[1] - x.shape[1]
            mask_tokens = self.mask_token.to(x.dtype).expand(b, num_masked, -1)
            x = torch.cat([x, mask_tokens], dim=1)
            x = torch.gather(x, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # un-shuffle
        return x.reshape(b, self.num_patches * self.embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.feature(self.forward_features(x))
