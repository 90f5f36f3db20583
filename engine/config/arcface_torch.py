"""Convert an arcface_torch recipe (``configs/*.py``) into an ArcScale run config, without executing it.

    python -m engine.convert_config path/to/arcface_torch/configs/ms1mv3_r50.py -o ds_configs/ms1mv3_r50.json

arcface_torch's configs are Python files: ``config = edict()`` followed by ``config.key = value`` lines, merged
over ``configs/base.py`` by its ``get_config``. Running them would run whatever else the file contains, so the
file is parsed (``ast``) instead: literals, arithmetic, ``os.path.join`` and references to keys set earlier in
the same file (``config.warmup_epoch = config.num_epoch // 10``) are evaluated; anything else is reported with
its line number and left out. Keys the file omits take the defaults of ``base.py`` beside it (``--base`` names
another; without one, arcface_torch's base.py defaults built in here).

How the keys map (global batch = ``batch_size * world_size``, arcface_torch's ``total_batch_size``; steps are
*optimizer* steps, i.e. arcface_torch's micro-steps / ``gradient_acc``):

    network                    engine.model.name (vit_*_dp005_mask* -> vit_*, see the printed notes)
    embedding_size             engine.model.embedding_size
    margin_list                engine.head.margin (scale 64, arcface_torch's fixed value)
    sample_rate                engine.head.sample_rate
    interclass_filtering_threshold   engine.head.interclass_filtering_threshold
    num_classes                engine.head.num_classes
    fp16                       torch_autocast bf16 (--precision: bf16 | fp16 | fp32); False: fp32
    batch_size                 train_micro_batch_size_per_gpu
    gradient_acc               gradient_accumulation_steps
    optimizer, lr, weight_decay, momentum   engine.optim.name/lr/weight_decay/momentum (SGD: 0.9, see notes)
    num_epoch, num_image       engine.train.max_steps = num_image // global_batch * num_epoch // gradient_acc
    warmup_epoch               engine.optim.warmup_steps (same formula), schedule poly, poly_power --poly-power
    rec                        engine.data.source recordio (a folder without train.rec: folder;
                               "synthetic": synthetic), engine.data.path
    dali, num_workers          engine.data.dali (True: on, False: auto), engine.data.num_workers
    val_targets                engine.eval.bins: <rec>/<name>.bin (arcface_torch's CallBackVerification paths)
    verbose                    engine.eval.every (// gradient_acc)
    frequent                   engine.train.log_every (// gradient_acc)
    seed                       engine.train.seed
    output                     engine.train.output_dir (None: work_dirs/<config name>, as get_config does)
    save_all_states            engine.checkpoint.every = one epoch of steps
    resume                     engine.checkpoint.resume auto
    using_wandb                engine.train.wandb.enabled, mode online (as train_v2.py logs); with it
      wandb_project, wandb_entity, notes   engine.train.wandb.project / entity / notes
      suffix_run_name          engine.train.wandb.name = <output_dir's name>_<suffix>
      save_artifacts           engine.train.wandb.log_model
      wandb_key                never copied into the config (wandb login or WANDB_API_KEY; see the notes)
    (fixed in train_v2.py)     gradient_clipping 5.0, dropout 0.0

Everything else is printed as "not mapped", and each behaviour of arcface_torch that the converted run does not
reproduce is printed as a note. The result is validated with ``engine.config.load`` before the tool reports
success.
"""
from __future__ import annotations

import argparse
import ast
import json
import operator
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

__all__ = ["ARCFACE_BASE_DEFAULTS", "ParsedConfig", "Conversion", "parse_config_file", "convert", "main"]

# arcface_torch's configs/base.py: what get_config starts from before the recipe's own keys.
ARCFACE_BASE_DEFAULTS: Dict[str, Any] = {
    "margin_list": (1.0, 0.5, 0.0), "network": "r50", "resume": False, "save_all_states": False,
    "output": "ms1mv3_arcface_r50", "embedding_size": 512, "sample_rate": 1, "interclass_filtering_threshold": 0,
    "fp16": False, "batch_size": 128, "optimizer": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4,
    "verbose": 2000, "frequent": 10, "dali": False, "dali_aug": False, "gradient_acc": 1, "seed": 2048,
    "num_workers": 2, "wandb_key": "XXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXXX", "suffix_run_name": None,
    "using_wandb": False, "wandb_entity": "entity", "wandb_project": "project", "wandb_log_all": True,
    "save_artifacts": False, "wandb_resume": False,
}
REQUIRED = ("rec", "num_classes", "num_image", "num_epoch", "warmup_epoch", "val_targets")
WANDB_KEYS = ("wandb_key", "suffix_run_name", "using_wandb", "wandb_entity", "wandb_project", "wandb_log_all",
              "save_artifacts", "wandb_resume", "notes")

# arcface_torch network name -> (ArcScale name, its drop_path_rate/mask_ratio if they differ from ArcScale's
# defaults for that name, activation checkpointing as arcface_torch's model does it).
_NETWORKS: Dict[str, Tuple[str, Optional[Tuple[float, float]], Any]] = {
    "r18": ("r18", None, None), "r34": ("r34", None, None), "r50": ("r50", None, None),
    "r100": ("r100", None, None), "r200": ("r200", None, None),
    "r2060": ("r2060", None, {"layer2": 20, "layer3": 100}),  # iresnet2060's checkpoint_sequential segments
    "mbf": ("mbf", None, None), "mbf_large": ("mbf_large", None, None),
    "vit_t": ("vit_t", None, None), "vit_t_dp005_mask0": ("vit_t", (0.05, 0.0), None),
    "vit_s": ("vit_s", None, None), "vit_s_dp005_mask_0": ("vit_s", (0.05, 0.0), None),
    "vit_b": ("vit_b", None, "all"), "vit_b_dp005_mask_005": ("vit_b", (0.05, 0.05), "all"),
    "vit_l_dp005_mask_005": ("vit_l", None, "all"), "vit_h": ("vit_h", None, "all"),
}
_BINOPS: Dict[type, Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}
_CONSTRUCTORS = ("edict", "EasyDict", "dict")


class _Unsupported(Exception):
    """An expression the converter will not evaluate (it would need to run code)."""


@dataclass
class ParsedConfig:
    """What a config file sets: values, the line of each key, and what could not be evaluated."""

    path: Path
    values: Dict[str, Any] = field(default_factory=dict)
    lines: Dict[str, int] = field(default_factory=dict)
    skipped: List[str] = field(default_factory=list)  # "line N: ..." for each statement left out


@dataclass
class Conversion:
    config: Dict[str, Any]
    unmapped: List[str]
    notes: List[str]
    info: List[str]


# -- parsing -------------------------------------------------------------------------------------------------

def _is_path_join(func: ast.AST) -> bool:
    parts = []
    while isinstance(func, ast.Attribute):
        parts.append(func.attr)
        func = func.value
    if isinstance(func, ast.Name):
        parts.append(func.id)
    return list(reversed(parts)) in (["os", "path", "join"], ["osp", "join"], ["path", "join"])


def _evaluate(node: ast.AST, cfg_name: str, values: Dict[str, Any], names: Dict[str, Any]) -> Any:
    """Value of a literal-like expression; raises _Unsupported for anything that would need execution."""
    def ev(n: ast.AST) -> Any:
        return _evaluate(n, cfg_name, values, names)

    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Tuple):
        return tuple(ev(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [ev(e) for e in node.elts]
    if isinstance(node, ast.Dict) and None not in node.keys:
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd, ast.Not)):
        value = ev(node.operand)
        return -value if isinstance(node.op, ast.USub) else (+value if isinstance(node.op, ast.UAdd) else not value)
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        left, right = ev(node.left), ev(node.right)
        if isinstance(node.op, ast.Pow) and (not isinstance(right, (int, float)) or abs(right) > 64):
            raise _Unsupported(f"power {ast.unparse(node)}")
        try:
            return _BINOPS[type(node.op)](left, right)
        except Exception as exc:  # TypeError, ZeroDivisionError, ...
            raise _Unsupported(f"{ast.unparse(node)} ({type(exc).__name__}: {exc})") from None
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == cfg_name:
        if node.attr not in values:
            raise _Unsupported(f"{ast.unparse(node)} is read before the file sets it")
        return values[node.attr]
    if (isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name) and node.value.id == cfg_name
            and isinstance(node.slice, ast.Constant)):
        if node.slice.value not in values:
            raise _Unsupported(f"{ast.unparse(node)} is read before the file sets it")
        return values[node.slice.value]
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id]
    if isinstance(node, ast.Call) and _is_path_join(node.func) and not node.keywords:
        parts = [ev(a) for a in node.args]
        if not parts or not all(isinstance(p, str) for p in parts):
            raise _Unsupported(ast.unparse(node))
        return os.path.join(*parts)
    raise _Unsupported(ast.unparse(node))


def _target_key(target: ast.AST, cfg_name: Optional[str]) -> Optional[str]:
    if cfg_name is None:
        return None
    if isinstance(target, ast.Attribute) and isinstance(target.value, ast.Name) and target.value.id == cfg_name:
        return target.attr
    if (isinstance(target, ast.Subscript) and isinstance(target.value, ast.Name) and target.value.id == cfg_name
            and isinstance(target.slice, ast.Constant) and isinstance(target.slice.value, str)):
        return target.slice.value
    return None


def _is_constructor(node: ast.AST) -> bool:
    return (isinstance(node, ast.Call) and isinstance(node.func, (ast.Name, ast.Attribute))
            and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) in _CONSTRUCTORS)


def parse_config_file(path: Union[str, Path]) -> ParsedConfig:
    """Read an arcface_torch config file without running it.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not valid Python, or no ``config = edict()`` in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"arcface_torch config {path} not found")
    try:
        tree = ast.parse(path.read_text(), filename=str(path))
    except SyntaxError as exc:
        raise ValueError(f"{path}:{exc.lineno}: not valid Python ({exc.msg})") from None
    parsed = ParsedConfig(path)
    cfg_name: Optional[str] = None
    names: Dict[str, Any] = {}
    for stmt in tree.body:
        where = f"line {stmt.lineno}"
        if isinstance(stmt, (ast.Import, ast.ImportFrom, ast.Pass)):
            continue
        if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
            continue  # a docstring or a commented-out block in a string
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name) \
                and _is_constructor(stmt.value):
            cfg_name = stmt.targets[0].id
            try:
                for kw in stmt.value.keywords:
                    if kw.arg is None:
                        raise _Unsupported(ast.unparse(kw))
                    parsed.values[kw.arg] = _evaluate(kw.value, cfg_name, parsed.values, names)
                    parsed.lines[kw.arg] = stmt.lineno
                if stmt.value.args:
                    raise _Unsupported(ast.unparse(stmt.value))
            except _Unsupported as exc:
                parsed.skipped.append(f"{where}: not evaluated: {exc}")
            continue
        targets = stmt.targets if isinstance(stmt, ast.Assign) else (
            [stmt.target] if isinstance(stmt, (ast.AugAssign, ast.AnnAssign)) else [])
        keys = [_target_key(t, cfg_name) for t in targets]
        if targets and all(k is not None for k in keys) and getattr(stmt, "value", None) is not None:
            try:
                value = _evaluate(stmt.value, cfg_name, parsed.values, names)
                if isinstance(stmt, ast.AugAssign):
                    key = keys[0]
                    if key not in parsed.values:
                        raise _Unsupported(f"{ast.unparse(targets[0])} is updated before the file sets it")
                    value = _BINOPS[type(stmt.op)](parsed.values[key], value)
            except (_Unsupported, KeyError, TypeError) as exc:
                parsed.skipped.append(f"{where}: {', '.join(keys)} not evaluated: {exc}")
                continue
            for key in keys:
                parsed.values[key] = value
                parsed.lines[key] = stmt.lineno
            continue
        if isinstance(stmt, ast.Assign) and all(isinstance(t, ast.Name) for t in stmt.targets):
            try:  # a helper variable (num_epoch = 20; config.num_epoch = num_epoch)
                value = _evaluate(stmt.value, cfg_name or "", parsed.values, names)
                names.update({t.id: value for t in stmt.targets})
                continue
            except _Unsupported:
                pass
        inner = sorted({k for node in ast.walk(stmt) for k in [_target_key(node, cfg_name)] if k is not None
                        and isinstance(getattr(node, "ctx", None), ast.Store)})
        first = ast.unparse(stmt).splitlines()[0]
        parsed.skipped.append(f"{where}: `{first[:80]}` not evaluated (the converter does not run code)"
                              + (f"; keys it sets: {', '.join(inner)}" if inner else ""))
    if cfg_name is None:
        raise ValueError(f"{path}: no `config = edict()` found; expected an arcface_torch config file "
                         "(config = edict() followed by config.key = value lines)")
    return parsed


# -- mapping -------------------------------------------------------------------------------------------------

def _number(values: Dict[str, Any], key: str, kind: type = float, minimum: Optional[float] = None) -> Any:
    value = values[key]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"config.{key}: expected a number, got {value!r}")
    if kind is int and float(value) != int(value):
        raise ValueError(f"config.{key}: expected an integer, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"config.{key}: expected >= {minimum}, got {value!r}")
    return kind(value)


def _r2060_zero() -> Dict[str, Any]:
    """ZeRO-3 settings of ArcScale's r2060 recipe (ds_configs/r2060.json) when the repo has it."""
    recipe = Path(__file__).resolve().parents[2] / "ds_configs" / "r2060.json"
    try:
        return dict(json.loads(recipe.read_text())["zero_optimization"])
    except (OSError, ValueError, KeyError):
        return {"stage": 3}


def convert(path: Union[str, Path], *, world_size: int = 8, base: Optional[Union[str, Path]] = None,
            precision: str = "auto", poly_power: float = 1.0) -> Conversion:
    """Convert an arcface_torch config file to an ArcScale config dict (not yet validated).

    Args:
        path: the arcface_torch ``configs/<name>.py``.
        world_size: number of GPUs the recipe is run on (arcface_torch's steps depend on it).
        base: arcface_torch ``configs/base.py``; None: ``base.py`` beside `path` if present, else the built-in
            defaults (``ARCFACE_BASE_DEFAULTS``).
        precision: ``auto`` (fp16=True -> bf16 autocast, False -> fp32), ``bf16``, ``fp16`` or ``fp32``.
        poly_power: power of the poly decay (arcface_torch's PolynomialLRWarmup: 1.0).

    Raises:
        ValueError: a required key is missing or a value cannot be converted (named).
    """
    if world_size < 1:
        raise ValueError(f"--world-size: expected >= 1, got {world_size}")
    if precision not in ("auto", "bf16", "fp16", "fp32"):
        raise ValueError(f"--precision: expected auto, bf16, fp16 or fp32, got {precision!r}")
    path = Path(path)
    job = parse_config_file(path)
    info: List[str] = []
    base_path = Path(base) if base is not None else path.parent / "base.py"
    if base is not None or base_path.is_file():
        base_cfg = parse_config_file(base_path)
        defaults = base_cfg.values
        info.append(f"defaults of keys {path.name} omits: {base_path}")
    else:
        defaults = dict(ARCFACE_BASE_DEFAULTS)
        info.append(f"defaults of keys {path.name} omits: arcface_torch's configs/base.py (built in; no base.py "
                    f"beside {path.name})")
    v = {**defaults, **job.values}
    missing = [k for k in REQUIRED if k not in v]
    if missing:
        raise ValueError(f"{path}: missing {', '.join('config.' + k for k in missing)} (arcface_torch's train_v2.py "
                         "needs them; base.py does not set them)")
    unmapped = [f"{path.name} {s}" for s in job.skipped]
    notes: List[str] = []
    used = set()

    def take(key: str) -> Any:
        used.add(key)
        return v[key]

    network = take("network")
    if network not in _NETWORKS:
        raise ValueError(f"config.network: {network!r} has no ArcScale backbone; known: {', '.join(_NETWORKS)}")
    name, vit_options, checkpoint = _NETWORKS[network]
    if vit_options:
        notes.append(f"network {network}: built as ArcScale's {name}, whose drop_path_rate/mask_ratio are "
                     f"ArcScale's {name} defaults, not {vit_options[0]}/{vit_options[1]}: engine.model has no "
                     "keys for them yet")
    batch_size = _number(v, "batch_size", int, 1)
    grad_acc = _number(v, "gradient_acc", int, 1)
    num_image = _number(v, "num_image", int, 1)
    num_epoch = _number(v, "num_epoch", float, 0)
    warmup_epoch = _number(v, "warmup_epoch", float, 0)
    used.update({"batch_size", "gradient_acc", "num_image", "num_epoch", "warmup_epoch"})
    global_batch = batch_size * world_size
    micro_per_epoch = num_image // global_batch
    if micro_per_epoch < 1:
        raise ValueError(f"config.num_image {num_image} is smaller than the global batch {global_batch} "
                         f"(batch_size {batch_size} x world size {world_size})")
    max_steps = int(micro_per_epoch * num_epoch) // grad_acc
    warmup_steps = int(micro_per_epoch * warmup_epoch) // grad_acc
    steps_per_epoch = max(1, micro_per_epoch // grad_acc)
    info.append(f"world size {world_size}: global batch {global_batch * grad_acc} (batch_size {batch_size} x "
                f"{world_size} GPUs x gradient_acc {grad_acc}), {steps_per_epoch} optimizer steps per epoch of "
                f"{num_image} images; max_steps {max_steps} ({num_epoch:g} epochs), warmup_steps {warmup_steps} "
                f"({warmup_epoch:g} epochs). Another world size: --world-size N")
    if max_steps < 1:
        raise ValueError(f"config.num_epoch {num_epoch:g}: {max_steps} optimizer steps at world size {world_size}")

    margin = take("margin_list")
    if not isinstance(margin, (list, tuple)) or len(margin) != 3:
        raise ValueError(f"config.margin_list: expected (m1, m2, m3), got {margin!r}")
    optimizer = str(take("optimizer")).lower()
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"config.optimizer: expected 'sgd' or 'adamw', got {v['optimizer']!r}")
    optim: Dict[str, Any] = {"name": optimizer, "lr": _number(v, "lr"), "weight_decay": _number(v, "weight_decay"),
                             "warmup_steps": warmup_steps, "schedule": "poly", "poly_power": float(poly_power)}
    used.update({"lr", "weight_decay", "momentum"})
    if optimizer == "sgd":
        optim["momentum"] = 0.9
        if v.get("momentum", 0.9) != 0.9:
            notes.append(f"momentum: arcface_torch's train_v2.py builds SGD with momentum=0.9 whatever "
                         f"config.momentum says ({v['momentum']}); converted as 0.9, what it trained with")

    fp16 = bool(take("fp16"))
    choice = precision if precision != "auto" else ("bf16" if fp16 else "fp32")
    ds: Dict[str, Any] = {"train_micro_batch_size_per_gpu": batch_size, "gradient_accumulation_steps": grad_acc,
                          "gradient_clipping": 5.0}
    if choice == "bf16":
        ds["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    elif choice == "fp16":  # GradScaler(growth_interval=100): halve on every overflow, double after 100 clean
        ds["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 100,
                      "hysteresis": 1}
    if fp16 and choice == "bf16":
        notes.append("fp16=True: converted to bf16 autocast (torch_autocast), not arcface_torch's fp16 autocast "
                     "with GradScaler: bf16 has fp32's exponent range, so no loss scaling or skipped steps, and it "
                     "is the precision ArcScale's recipes use with BatchNorm under every ZeRO stage. Partial FC "
                     "runs in fp32 (arcface_torch computes its logits under the same fp16 autocast). GPUs "
                     "without bf16 (V100, T4): --precision fp16 (DeepSpeed loss scaling, window 100)")
    elif fp16 != (choice != "fp32"):
        notes.append(f"fp16={fp16}: converted as {choice} (--precision {precision})")
    zero: Dict[str, Any] = {"stage": 0}
    if name == "r2060":
        zero = _r2060_zero()
        notes.append("r2060: ZeRO stage 3 with ArcScale's r2060 recipe settings (ds_configs/r2060.json) and "
                     "activation checkpointing of layer2/layer3 in 20/100 segments, as arcface_torch's "
                     "iresnet2060 does; arcface_torch itself runs plain DDP")
    ds["zero_optimization"] = zero

    rec = str(take("rec"))
    data: Dict[str, Any] = {"num_workers": _number(v, "num_workers", int, 0), "augment": ["flip"]}
    used.add("num_workers")
    if rec == "synthetic":
        data["source"] = "synthetic"
    elif Path(rec).is_dir() and not (Path(rec) / "train.rec").is_file():
        data.update(source="folder", path=rec)
        notes.append(f"rec {rec}: a folder without train.rec, read as one sub-folder per identity "
                     "(arcface_torch's ImageFolder fallback)")
    else:
        data.update(source="recordio", path=rec)
    dali = bool(take("dali"))
    data["dali"] = "on" if dali else "auto"
    if not dali:
        info.append("dali=False -> engine.data.dali auto: DALI when installed, else the torch loader; both apply "
                    "the same random flip arcface_torch's loader applies")
    if v.get("dali_aug"):
        unmapped.append(f"dali_aug={v['dali_aug']!r}: arcface_torch's extra DALI augmentations have no ArcScale "
                        "equivalent; engine.data.augment lists ArcScale's (dali_pipes/augment.py)")
    used.add("dali_aug")

    targets = take("val_targets")
    if not isinstance(targets, (list, tuple)) or not all(isinstance(t, str) for t in targets):
        raise ValueError(f"config.val_targets: expected a list of names, got {targets!r}")
    evaluation: Dict[str, Any] = {"bins": [os.path.join(rec, t + ".bin") for t in targets]}
    verbose = _number(v, "verbose", int, 1)
    used.add("verbose")
    if targets:
        evaluation["every"] = max(1, verbose // grad_acc)
        notes.append("evaluation: ArcScale also evaluates after the last step (arcface_torch only every "
                     f"{verbose} steps)")
    output = take("output")
    output_dir = str(output) if output is not None else os.path.join("work_dirs", path.stem)
    train = {"max_steps": max_steps, "output_dir": output_dir,
             "log_every": max(1, _number(v, "frequent", int, 1) // grad_acc), "seed": _number(v, "seed", int, 0)}
    used.update({"frequent", "seed"})
    ckpt: Dict[str, Any] = {"every": steps_per_epoch if take("save_all_states") else 0}
    if take("resume"):
        ckpt["resume"] = "auto"
        notes.append("resume=True -> engine.checkpoint.resume auto: continues from ArcScale checkpoints under "
                     f"{output_dir}; arcface_torch's checkpoint_gpu_*.pt files are not read")
    model: Dict[str, Any] = {"name": name, "embedding_size": _number(v, "embedding_size", int, 1), "dropout": 0.0}
    used.add("embedding_size")
    if checkpoint:
        model["checkpoint"] = checkpoint
    head = {"num_classes": _number(v, "num_classes", int, 1), "sample_rate": _number(v, "sample_rate"),
            "margin": [float(m) for m in margin], "scale": 64.0,
            "interclass_filtering_threshold": _number(v, "interclass_filtering_threshold")}
    used.update({"num_classes", "sample_rate", "interclass_filtering_threshold"})

    # The behaviours that differ, whatever the recipe says.
    if warmup_steps > 0:
        notes.append("warm-up: arcface_torch's PolynomialLRWarmup runs its first step at the full LR, then "
                     "lr/warmup, 2*lr/warmup, ...; ArcScale's warm-up rises from 0 (step t: lr*t/warmup)")
    notes.append(f"LR decay: poly with power {poly_power:g} after warm-up (arcface_torch's train_v2.py "
                 "PolynomialLRWarmup: 1.0; checkouts that still use PolyScheduler decay with power 2: "
                 "--poly-power 2)")
    if grad_acc > 1:
        notes.append("gradient_acc: arcface_torch advances its LR schedule every micro-batch; ArcScale every "
                     "optimizer step, over steps divided by gradient_acc, which gives the same curve")
    notes.append("loss: arcface_torch logs each sample's loss capped at 69.08 (-log of a probability clamped at "
                 "1e-30); ArcScale's log-sum-exp loss is not capped, so early losses can read higher (gradients "
                 "are the same)")
    notes.append("model.pt: arcface_torch writes it after every epoch; ArcScale at the end of the run "
                 "(engine.checkpoint.every for checkpoints on the way)")
    wandb = _wandb_section(v, output_dir, notes, unmapped)
    if wandb:
        train["wandb"] = wandb
    used.update(WANDB_KEYS)
    for key in sorted(set(v) - used):
        origin = f"line {job.lines[key]}" if key in job.lines else "base.py"
        unmapped.append(f"{key}={v[key]!r} ({origin}): not an arcface_torch key ArcScale knows; left out")

    config = {**ds, "engine": {"model": model, "head": head, "data": data, "optim": optim, "train": train,
                               "eval": evaluation, "checkpoint": ckpt}}
    return Conversion(config=config, unmapped=unmapped, notes=notes, info=info)


def _wandb_section(v: Dict[str, Any], output_dir: str, notes: List[str], unmapped: List[str]) -> Dict[str, Any]:
    """engine.train.wandb from arcface_torch's W&B keys (empty unless using_wandb)."""
    if not v.get("using_wandb"):
        return {}
    section: Dict[str, Any] = {"enabled": True, "mode": "online"}
    for key, ours in (("wandb_project", "project"), ("wandb_entity", "entity"), ("notes", "notes")):
        if v.get(key) is not None:
            section[ours] = str(v[key])
    if v.get("suffix_run_name") is not None:
        section["name"] = f"{Path(output_dir).name}_{v['suffix_run_name']}"
    if v.get("save_artifacts"):
        section["log_model"] = True
    notes.append("W&B: logged online from rank 0 (engine.train.wandb; pip install '.[wandb]'), the run named "
                 "after output_dir instead of <date>_GPU<rank>; the API key is not copied into the config (it is "
                 "written beside every run): wandb login, or WANDB_API_KEY, before launching; "
                 "--set engine.train.wandb.mode=offline logs without network for a later wandb sync")
    if v.get("wandb_entity") == "entity" or v.get("wandb_project") == "project":
        notes.append("W&B: wandb_entity/wandb_project are still base.py's placeholders ('entity', 'project'); set "
                     "engine.train.wandb.entity / project")
    if "wandb_log_all" in v:
        notes.append(f"wandb_log_all={v['wandb_log_all']!r}: ArcScale logs once, from rank 0 (every logged value is "
                     "already global)")
    if v.get("wandb_resume"):
        unmapped.append(f"wandb_resume={v['wandb_resume']!r}: a resumed ArcScale run starts a new W&B run")
    return section


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="arcface_torch config, e.g. arcface_torch/configs/ms1mv3_r50.py")
    parser.add_argument("-o", "--output", required=True, help="ArcScale config to write (.json)")
    parser.add_argument("--world-size", type=int, default=8, help="GPUs the recipe runs on (default 8)")
    parser.add_argument("--base", default=None, help="arcface_torch configs/base.py (default: beside CONFIG)")
    parser.add_argument("--precision", choices=("auto", "bf16", "fp16", "fp32"), default="auto",
                        help="auto: fp16=True -> bf16 autocast, fp16=False -> fp32")
    parser.add_argument("--poly-power", type=float, default=1.0, help="poly LR decay power (default 1.0)")
    parser.add_argument("--force", action="store_true", help="overwrite OUTPUT if it exists")
    args = parser.parse_args(argv)
    from engine.config import schema as run_config

    out = Path(args.output)
    if out.exists() and not args.force:
        print(f"error: {out} exists; pass --force to overwrite it", file=sys.stderr)
        return 2
    try:
        result = convert(args.config, world_size=args.world_size, base=args.base, precision=args.precision,
                         poly_power=args.poly_power)
        run_config.from_dict(result.config, source=str(out))  # nothing is written unless ArcScale accepts it
    except (ValueError, FileNotFoundError) as exc:  # ConfigError is a ValueError
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from engine.runtime.fileio import atomic_write_text

    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(json.dumps(result.config, indent=2) + "\n", out)
    run_config.load(out)  # what run.py will do with it
    print(f"wrote {out} from {args.config} (loads with engine.config.load)")
    for line in result.info:
        print(f"  {line}")
    print(f"not mapped ({len(result.unmapped)}):" if result.unmapped else "not mapped: nothing")
    for line in result.unmapped:
        print(f"  - {line}")
    print("differences from arcface_torch's train_v2.py:")
    for line in result.notes:
        print(f"  - {line}")
    return 0
