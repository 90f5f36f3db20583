"""Backbone registry: model names -> builders, with the size of each named model kept as data.

A backbone class registers itself once per name with the keyword arguments that define that name::

    IRESNET_LAYERS = {"r50": (3, 4, 14, 3), ...}

    @register_backbone("r50", layers=IRESNET_LAYERS["r50"])
    class IResNet(nn.Module):
        def __init__(self, layers, *, embedding_size=512, dropout=0.0, init=True): ...

How a registered keyword is treated depends on the constructor parameter it names:

* a positional-or-keyword parameter (``layers`` above) is *architecture*: it is fixed by the name, because the
  name promises arcface_torch's state_dict layout, so a user passing it gets a ``ValueError``;
* a keyword-only parameter (after ``*``) is a *per-name default* the user may override (ViT's ``mask_ratio``).

Facts about a builder that the run configuration is checked against before any model exists are class attributes
of the builder, read once at registration into its ``BackboneSpec`` (so no weights are built to learn them):

* ``CHECKPOINT_STAGES``: the keys of ``checkpoint_units()``, the stage names ``engine.model.checkpoint`` may use;
* ``FEATURE_BATCHNORM1D``: True when the feature layer ends in a ``BatchNorm1d`` over [B, E], which cannot
  train on one sample (PyTorch raises "Expected more than 1 value per channel when training").

``build_backbone`` accepts exactly the builder's keyword-only parameters (plus ``device``) and rejects anything
else with a ``ValueError`` naming the offending keys, so no option is ever ignored silently.
"""
from __future__ import annotations

import contextlib
import difflib
import inspect
import re
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Callable, Iterable, Mapping, TypeVar

import torch
from torch import nn

__all__ = ["BackboneSpec", "register_backbone", "build_backbone", "list_backbones", "get_backbone_spec",
           "check_checkpoint_stages", "get_init_fn", "is_materialised", "reset_all_parameters", "check_dropout"]

B = TypeVar("B", bound=Callable[..., nn.Module])

# The one piece of module state: filled by the decorators when backbones/*.py are imported, read-only afterwards.
_REGISTRY: dict[str, "BackboneSpec"] = {}

_HINTS = {
    "fp16": "precision is the engine's job (DeepSpeed bf16/fp16/torch_autocast config); backbones are pure modules",
    "num_features": "use embedding_size",
    "using_checkpoint": "activation checkpointing is configured in engine.model.checkpoint",
}


@dataclass(frozen=True)
class BackboneSpec:
    """One registered name.

    Attributes:
        name: registry name, e.g. ``"r50"``.
        builder: class (or function) returning the module.
        arch: keyword arguments fixed by the name (positional-or-keyword parameters of ``builder``).
        defaults: per-name defaults of user-tunable (keyword-only) parameters.
        options: every keyword a user may pass to ``build_backbone`` for this name (sorted).
        checkpoint_stages: the keys of the model's ``checkpoint_units()`` (builder's ``CHECKPOINT_STAGES``).
        feature_batchnorm1d: the feature layer ends in a BatchNorm1d, so training needs >= 2 samples per rank
            (builder's ``FEATURE_BATCHNORM1D``).
        dropout: the model has a dropout layer, so ``dropout`` may be > 0 (builder's ``DROPOUT``, default True;
            False for a model that only accepts 0, such as arcface_torch's MobileFaceNet).
    """

    name: str
    builder: Callable[..., nn.Module]
    arch: Mapping[str, Any]
    defaults: Mapping[str, Any]
    options: tuple[str, ...]
    checkpoint_stages: tuple[str, ...]
    feature_batchnorm1d: bool
    dropout: bool = True


def _keyword_only(builder: Callable[..., nn.Module]) -> set[str]:
    params = inspect.signature(builder).parameters.values()
    return {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}


def register_backbone(name: str, **config: Any) -> Callable[[B], B]:
    """Class/function decorator registering ``builder`` under ``name`` with ``config`` bound.

    Args:
        name: registry name; must be new.
        **config: architecture (positional-or-keyword parameters of the builder, fixed by the name) and per-name
            defaults of keyword-only parameters (overridable by the user).

    Raises:
        ValueError: the name is taken, ``config`` names a parameter the builder does not have, or the builder
            lacks ``CHECKPOINT_STAGES`` (a non-empty tuple of str) or ``FEATURE_BATCHNORM1D`` (a bool).
    """

    def decorator(builder: B) -> B:
        if name in _REGISTRY:
            raise ValueError(f"backbone name {name!r} is already registered by {_REGISTRY[name].builder!r}")
        params = inspect.signature(builder).parameters
        unknown = sorted(set(config) - set(params))
        if unknown:
            raise ValueError(f"register_backbone({name!r}): {builder!r} has no parameter(s) {unknown}")
        kw_only = _keyword_only(builder)
        if "embedding_size" not in kw_only:
            raise ValueError(f"register_backbone({name!r}): builder must take a keyword-only embedding_size")
        arch = {k: v for k, v in config.items() if k not in kw_only}
        defaults = {k: v for k, v in config.items() if k in kw_only}
        options = tuple(sorted((kw_only - {"embedding_size"}) | {"device"}))
        stages = getattr(builder, "CHECKPOINT_STAGES", None)
        if not (isinstance(stages, tuple) and stages and all(isinstance(s, str) for s in stages)):
            raise ValueError(f"register_backbone({name!r}): {builder!r} needs CHECKPOINT_STAGES, the keys of its "
                             f"checkpoint_units() as a non-empty tuple of str; got {stages!r}")
        bn1d = getattr(builder, "FEATURE_BATCHNORM1D", None)
        if not isinstance(bn1d, bool):
            raise ValueError(f"register_backbone({name!r}): {builder!r} needs FEATURE_BATCHNORM1D (bool: does the "
                             f"feature layer end in a BatchNorm1d?); got {bn1d!r}")
        _REGISTRY[name] = BackboneSpec(name, builder, MappingProxyType(arch), MappingProxyType(defaults), options,
                                       stages, bn1d, bool(getattr(builder, "DROPOUT", True)))
        return builder

    return decorator


def _natural_key(name: str) -> list[Any]:
    # "r18" < "r50" < "r100": digit runs compare as numbers (re.split alternates str, int, str, ...).
    return [int(part) if i % 2 else part for i, part in enumerate(re.split(r"(\d+)", name))]


def list_backbones() -> list[str]:
    """Registered names in natural order (mbf, mbf_large, r18, r34, ..., r2060, vit_b, ...)."""
    return sorted(_REGISTRY, key=_natural_key)


def get_backbone_spec(name: str) -> BackboneSpec:
    """The registry entry for ``name``.

    Raises:
        ValueError: unknown name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown backbone {name!r}{hint}; known backbones: {', '.join(list_backbones())}") from None


def check_checkpoint_stages(name: str, stages: Iterable[str]) -> None:
    """Check activation-checkpoint stage names against backbone ``name``'s ``checkpoint_units()`` keys.

    Uses the registered ``CHECKPOINT_STAGES``, so nothing is built: the run configuration is checked with it
    before any process group or model exists.

    Raises:
        ValueError: unknown backbone, or a stage it does not have; the message names the closest stage and all.
    """
    valid = get_backbone_spec(name).checkpoint_stages
    for stage in stages:
        if stage not in valid:
            close = difflib.get_close_matches(str(stage), valid, n=1, cutoff=0.0)
            raise ValueError(f"unknown stage {stage!r} of backbone {name!r}; did you mean {close[0]!r}? "
                             f"(stages: {', '.join(valid)})")


def build_backbone(name: str, *, embedding_size: int = 512, **kw: Any) -> nn.Module:
    """Build the registered backbone ``name``: input [B, 3, 112, 112] -> embeddings [B, embedding_size].

    Args:
        name: one of ``list_backbones()``.
        embedding_size: output width (arcface_torch's ``num_features``).
        **kw: the builder's keyword-only options (e.g. ``dropout``, ``init``, ViT's ``mask_ratio``), and
            ``device``: build under ``with torch.device(device)``; ``device="meta"`` allocates nothing and skips
            initialisation (call ``to_empty(device=...)`` then ``init_weights()`` later).

    Raises:
        ValueError: unknown name, an unknown or architecture-fixed keyword, or an invalid value.
    """
    spec = get_backbone_spec(name)
    if isinstance(embedding_size, bool) or not isinstance(embedding_size, int) or embedding_size <= 0:
        raise ValueError(f"embedding_size must be a positive int, got {embedding_size!r}")
    fixed = sorted(k for k in kw if k in spec.arch)
    if fixed:
        raise ValueError(f"backbone {name!r}: {fixed} fixed by the architecture "
                         f"({', '.join(f'{k}={spec.arch[k]!r}' for k in fixed)}); register a new name instead")
    unknown = sorted(k for k in kw if k not in spec.options)
    if unknown:
        hints = "".join(f"; {k}: {_HINTS[k]}" for k in unknown if k in _HINTS)
        raise ValueError(f"backbone {name!r}: unknown keyword argument(s) {unknown}; "
                         f"accepted: {['embedding_size', *spec.options]}{hints}")
    device = kw.pop("device", None)
    args = {**spec.arch, **spec.defaults, **kw, "embedding_size": embedding_size}
    ctx = torch.device(device) if device is not None else contextlib.nullcontext()
    with ctx:
        return spec.builder(**args)


def get_init_fn(name: str) -> Callable[[nn.Module], None]:
    """The per-module initialisation rule of backbone ``name``: ``fn(module)`` sets that module's own tensors.

    ``model.init_weights()`` is PyTorch's defaults plus this rule on every module. The rule alone is what
    ``deepspeed.zero.Init`` needs: called on each module right after its ``__init__`` (defaults already applied,
    parameters still whole) and before it is partitioned, e.g. from a ``zero.Init`` subclass's
    ``_post_init_method``; build with ``init=False`` then.

    Raises:
        ValueError: unknown name, or a builder without an ``init_module`` rule.
    """
    spec = get_backbone_spec(name)
    fn = getattr(spec.builder, "init_module", None)
    if not callable(fn):
        raise ValueError(f"backbone {name!r} ({spec.builder!r}) has no init_module rule")
    return fn


# ---- helpers shared by the backbone modules -------------------------------------------------------------------

def is_materialised(module: nn.Module) -> bool:
    """False while the parameters hold no full values to initialise yet.

    That is: any parameter or buffer on the meta device, or any parameter already partitioned by DeepSpeed
    ZeRO-3's ``zero.Init`` (duck-typed by its ``ds_id`` attribute; deepspeed is not imported). Such a model is
    initialised later by calling ``init_weights()`` after ``to_empty()``, or inside
    ``deepspeed.zero.GatheredParameters(model.parameters(), modifier_rank=0)``.
    """
    if any(t.is_meta for t in module.buffers()):
        return False
    return not any(t.is_meta or hasattr(t, "ds_id") for t in module.parameters())


def reset_all_parameters(module: nn.Module, skip: tuple[type[nn.Module], ...] = ()) -> None:
    """Call ``reset_parameters()`` on every submodule that has one (PyTorch default init, BN running stats).

    ``init_weights`` starts from here so that it fully defines every tensor: a model built on the meta device
    and materialised with ``to_empty`` holds garbage until then. ``skip``: module types whose every tensor the
    caller overwrites next anyway (saves seconds on large models).
    """
    for m in module.modules():
        if m is not module and not isinstance(m, skip) and callable(getattr(m, "reset_parameters", None)):
            m.reset_parameters()


def check_dropout(p: float, what: str = "dropout") -> float:
    """Validate a dropout probability (0 <= p < 1)."""
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"{what} must be a float in [0, 1), got {p!r}")
    return float(p)
