"""Fine-tuning settings: which backbone parameters are frozen (`engine.model.freeze`) and which train with their
own learning-rate factor and weight decay (`engine.optim.param_groups`), resolved against the backbone's
parameter names.

    engine.model.freeze: ["conv1.*", "bn1.*", "prelu.*", "layer1.*"]     # fnmatch patterns over parameter names
    engine.optim.param_groups: [{"match": ["fc.*", "features.*"], "lr_scale": 10, "weight_decay": 0}]

A pattern is matched with `fnmatch.fnmatchcase` against the whole name as `named_parameters()` gives it
(arcface_torch's names: "layer1.0.conv1.weight"); `*` also crosses dots, so "bn1.*" is the stem's BatchNorm
only and "*.bn1.*" every block's. The names are the same under every backend (ZeRO-3 and FSDP2 keep the module
tree), and a config is checked against them before launch: the backbone is built on the meta device (no
memory; r2060 takes a few seconds, only when one of these keys is set), so a pattern that matches nothing
(a typo, another backbone's names) stops the run naming the pattern.

A parameter belongs to the first group whose patterns match it; the others train in the base group
(`engine.optim.lr`, `engine.optim.weight_decay`). A group's LR is the schedule's LR x its `lr_scale` at every
step. Frozen parameters are in no group: they get no gradient and no update (no weight decay either).
"""
from __future__ import annotations

import fnmatch
import functools
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

from engine.config.files import ConfigError, closest

GROUP_KEYS = ("match", "lr_scale", "weight_decay")

__all__ = ["GROUP_KEYS", "ParamGroup", "Assignment", "parameter_names", "has_batchnorm", "check_patterns",
           "check_param_groups", "assign"]


@dataclass
class ParamGroup:
    """One entry of `engine.optim.param_groups`, checked: its patterns, LR factor and weight decay (None: the
    base optimizer's)."""

    match: List[str]
    lr_scale: float = 1.0
    weight_decay: Optional[float] = None


@dataclass
class Assignment:
    """Where each parameter name goes: frozen, one of the groups (by index), or the base group."""

    frozen: List[str] = field(default_factory=list)
    groups: List[List[str]] = field(default_factory=list)  # names per engine.optim.param_groups entry
    base: List[str] = field(default_factory=list)


@functools.lru_cache(maxsize=16)
def _meta_facts(name: str, embedding_size: int) -> Tuple[Tuple[str, ...], Tuple[str, ...], bool]:
    import torch

    import backbones

    model = backbones.build_backbone(name, embedding_size=embedding_size, device="meta")
    named = list(model.named_parameters())
    has_bn = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
    return tuple(n for n, _ in named), tuple(n for n, p in named if p.requires_grad), has_bn


def parameter_names(name: str, embedding_size: int) -> Tuple[Tuple[str, ...], Tuple[str, ...]]:
    """Backbone `name`'s parameter names in `named_parameters()` order, and those of them that train (a
    backbone may fix some itself: IResNet's features.weight, as arcface_torch). Built once on the meta device."""
    names, trainable, _ = _meta_facts(name, embedding_size)
    return names, trainable


def has_batchnorm(name: str, embedding_size: int) -> bool:
    """Whether backbone `name` has a BatchNorm layer (whose running statistics `freeze_bn_stats` keeps)."""
    return _meta_facts(name, embedding_size)[2]


def check_patterns(patterns: Any, where: str) -> List[str]:
    """A list of non-empty pattern strings, or a ConfigError naming `where`."""
    if not isinstance(patterns, (list, tuple)) or not patterns:
        raise ConfigError(f"{where}: expected a non-empty list of parameter-name patterns (e.g. [\"layer1.*\"]), "
                          f"got {patterns!r}")
    for i, p in enumerate(patterns):
        if not isinstance(p, str) or not p.strip():
            raise ConfigError(f"{where}[{i}]: expected a parameter-name pattern (fnmatch, e.g. \"layer1.*\"), "
                              f"got {p!r}")
    return list(patterns)


def check_param_groups(groups: Sequence[Any], where: str = "engine.optim.param_groups") -> List[ParamGroup]:
    """`engine.optim.param_groups` checked entry by entry: keys, pattern lists, lr_scale > 0, weight_decay >= 0."""
    out = []
    for i, entry in enumerate(groups):
        at = f"{where}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping {{\"match\": [patterns], \"lr_scale\": x, "
                              f"\"weight_decay\": y}}, got {entry!r}")
        unknown = [k for k in entry if k not in GROUP_KEYS]
        if unknown:
            raise ConfigError(f"{at}: unknown key '{unknown[0]}'{closest(unknown[0], GROUP_KEYS)} (a group has "
                              f"{', '.join(GROUP_KEYS)})")
        if "match" not in entry:
            raise ConfigError(f"{at}: 'match' (a list of parameter-name patterns) is required")
        group = ParamGroup(check_patterns(entry["match"], f"{at}.match"))
        for key in ("lr_scale", "weight_decay"):
            if key not in entry:
                continue
            value = entry[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{at}.{key}: expected a number, got {value!r}")
            if key == "lr_scale" and not value > 0:
                raise ConfigError(f"{at}.lr_scale: expected > 0 (freeze parameters with engine.model.freeze), "
                                  f"got {value!r}")
            if key == "weight_decay" and value < 0:
                raise ConfigError(f"{at}.weight_decay: expected >= 0, got {value!r}")
            setattr(group, key, float(value))
        out.append(group)
    return out


def _matching(names: Sequence[str], pattern: str) -> List[str]:
    return [n for n in names if fnmatch.fnmatchcase(n, pattern)]


def _hint(pattern: str, names: Sequence[str]) -> str:
    """"; did you mean 'layer1.*'?": the closest of the backbone's top-level modules as a pattern."""
    return closest(pattern, sorted({n.split(".")[0] + ".*" for n in names}))


def assign(names: Sequence[str], freeze: Sequence[str], groups: Sequence[ParamGroup], *, backbone: str = "",
           trainable: Optional[Sequence[str]] = None) -> Assignment:
    """Resolve the patterns against `names` (a backbone's parameter names, in order).

    Args:
        names: every parameter name.
        freeze: `engine.model.freeze`.
        groups: `check_param_groups(engine.optim.param_groups)`.
        backbone: the backbone's name, for messages.
        trainable: the names that train without any freeze (a backbone may hold fixed parameters of its own,
            e.g. IResNet's features.weight); None: all of `names`.

    Raises:
        ConfigError: a pattern that matches no parameter (named, with the closest parameter name), or a group
            all of whose parameters are frozen.
    """
    where = f" of backbone {backbone!r}" if backbone else ""
    frozen = set()
    for i, pattern in enumerate(freeze):
        found = _matching(names, pattern)
        if not found:
            raise ConfigError(f"engine.model.freeze[{i}]: pattern {pattern!r} matches no parameter{where}"
                              f"{_hint(pattern, names)} (fnmatch over names such as {names[0]!r})")
        frozen.update(found)
    fixed = set(names) - set(trainable if trainable is not None else names)
    out = Assignment(frozen=[n for n in names if n in frozen], groups=[[] for _ in groups])
    owner: Dict[str, int] = {}
    for g, group in enumerate(groups):
        for j, pattern in enumerate(group.match):
            found = _matching(names, pattern)
            if not found:
                raise ConfigError(f"engine.optim.param_groups[{g}].match[{j}]: pattern {pattern!r} matches no "
                                  f"parameter{where}{_hint(pattern, names)} (fnmatch over names such as "
                                  f"{names[0]!r})")
            for n in found:
                owner.setdefault(n, g)  # the first group that matches a parameter takes it
    for n in names:
        if n in frozen or n in fixed:
            continue
        if n in owner:
            out.groups[owner[n]].append(n)
        else:
            out.base.append(n)
    for g, members in enumerate(out.groups):
        if not members:
            raise ConfigError(f"engine.optim.param_groups[{g}]: every parameter it matches is frozen (by "
                              "engine.model.freeze, or by the backbone itself) or taken by an earlier group; "
                              "nothing would train in it")
    return out
