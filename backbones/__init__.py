"""Face-recognition backbones: arcface_torch's IResNet, MobileFaceNet and ViT as pure ``nn.Module``s.

Public API::

    build_backbone(name, *, embedding_size=512, **kw) -> nn.Module   # [B, 3, 112, 112] -> [B, embedding_size]
    list_backbones() -> list[str]

Every backbone has arcface_torch's state_dict (keys, order, shapes, dtypes: the tests compare each with a
manifest of arcface_torch's model of the same name), so arcface_torch's published weights load as they are, and
exposes ``init_weights()`` (arcface_torch's initialisation; called
by the constructor unless ``init=False`` or built on the meta device) and ``checkpoint_units()`` (the named
``nn.Sequential`` stages that activation checkpointing may split and wrap). ``get_init_fn(name)`` is the same
initialisation as a per-module rule, for ``deepspeed.zero.Init``.

Importing this package only defines classes and fills the registry; it touches no device and no process group.
"""
from .registry import (BackboneSpec, build_backbone, get_backbone_spec, get_init_fn, list_backbones,
                       register_backbone)
from .iresnet import IRESNET_LAYERS, IResNet
from .mobilefacenet import MBF_CONFIGS, MobileFaceNet
from .vit import VIT_CONFIGS, VisionTransformer

__all__ = [
    "BackboneSpec", "build_backbone", "get_backbone_spec", "get_init_fn", "list_backbones", "register_backbone",
    "IRESNET_LAYERS", "IResNet", "MBF_CONFIGS", "MobileFaceNet", "VIT_CONFIGS", "VisionTransformer",
]
