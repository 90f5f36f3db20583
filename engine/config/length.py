"""How long a run trains, in optimizer steps: `engine.train.max_steps`, or `engine.train.epochs` turned into steps
from the dataset's size and the global batch as arcface_torch does (``num_image // total_batch_size *
num_epoch``), and the warm-up from `engine.optim.warmup_steps` or `warmup_epochs` (``num_image //
total_batch_size * warmup_epoch``). The LR schedule decays over the steps after the warm-up, so decay follows the
epochs too.

Precedence (documented in README.md, "Configuration"):

- `max_steps` set: the run is that many steps, whatever `epochs` says (a shortened trial of an epoch recipe:
  ``--set engine.train.max_steps=1000``). A warm-up given in epochs then keeps its share of the epochs:
  ``warmup_epochs / epochs x max_steps`` steps, so a shortened recipe keeps the shape of its schedule.
- else `epochs` set: ``epochs x steps_per_epoch``, with ``steps_per_epoch = num_images // global batch``.
- neither: `DEFAULT_MAX_STEPS`.

The dataset's size is only known once the data is opened (engine.train.build), so the steps are derived there,
never written back into the config (config.json keeps what the user wrote); synthetic data has no size unless
`engine.data.path` names a public set (dali_pipes.datasets). What can be refused from the config alone is refused
before start-up (`check`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

from engine.config.files import ConfigError

DEFAULT_MAX_STEPS = 100  # neither engine.train.max_steps nor engine.train.epochs


@dataclass(frozen=True)
class RunLength:
    """The run's length and warm-up in optimizer steps, and how they were derived (`describe`)."""

    max_steps: int
    warmup_steps: int
    steps_per_epoch: Optional[int]  # num_images // global batch; None: the data has no size (synthetic)
    epochs: Optional[int]  # engine.train.epochs when it set the length
    num_images: Optional[int] = None
    global_batch_size: int = 0
    max_steps_wins: bool = False  # engine.train.max_steps set beside engine.train.epochs

    def describe(self) -> str:
        """One line for the log: the steps, where they come from, the warm-up."""
        if self.epochs is not None and not self.max_steps_wins:
            how = (f"{self.epochs} epochs x {self.steps_per_epoch} step{'s' if self.steps_per_epoch != 1 else ''} "
                   f"({self.num_images:,} images // global batch {self.global_batch_size})")
        elif self.max_steps_wins:
            would = (f"; {self.epochs} epochs would be {self.epochs * self.steps_per_epoch} steps"
                     if self.steps_per_epoch else "")
            how = f"engine.train.max_steps, which wins over engine.train.epochs{would}"
        else:
            how = "engine.train.max_steps" + (f"; an epoch is {self.steps_per_epoch} steps"
                                               if self.steps_per_epoch else "")
        return f"run: {self.max_steps} optimizer steps ({how}), warm-up {self.warmup_steps} steps"


def dataset_size(cfg: Any) -> Optional[int]:
    """Images per epoch known from the config alone: synthetic data shaped like the public set `engine.data.path`
    names (dali_pipes.datasets); None otherwise (a real dataset's size is read when it is opened)."""
    from dali_pipes import datasets

    d = cfg.engine.data
    found = datasets.known(d.path) if d.source == "synthetic" else None
    return found.num_images if found else None


def run_length(cfg: Any, world_size: int, num_images: Optional[int] = None) -> RunLength:
    """The run's length for `world_size` ranks and a dataset of `num_images` images (None: unknown, or synthetic
    shaped like a public set: `dataset_size`).

    Raises:
        ValueError: one line naming the key: epochs (or a warm-up in epochs) without a dataset size, a dataset
            smaller than one global batch, a warm-up that does not fit the run.
    """
    t, o = cfg.engine.train, cfg.engine.optim
    num_images = num_images if num_images is not None else dataset_size(cfg)
    batch = cfg.global_batch_size(world_size)
    per_epoch = num_images // batch if num_images is not None else None
    if per_epoch == 0:
        raise ValueError(f"engine.train: the dataset's {num_images} images are fewer than one global batch ({batch} "
                         f"= train_micro_batch_size_per_gpu x gradient_accumulation_steps x {world_size} ranks); "
                         "lower the micro-batch or use more data")
    if t.max_steps is not None:
        max_steps = t.max_steps
    elif t.epochs is not None:
        if per_epoch is None:
            raise ValueError(f"engine.train.epochs={t.epochs}: the data has no size to count epochs in "
                             f"(engine.data.source {cfg.engine.data.source!r}); set engine.train.max_steps")
        max_steps = t.epochs * per_epoch
    else:
        max_steps = DEFAULT_MAX_STEPS
    if o.warmup_epochs > 0:
        if t.max_steps is not None and t.epochs:
            warmup = int(o.warmup_epochs / t.epochs * max_steps)  # the recipe's share of a shortened run
        elif per_epoch is None:
            raise ValueError(f"engine.optim.warmup_epochs={o.warmup_epochs}: the data has no size to count epochs "
                             "in; set engine.optim.warmup_steps")
        else:
            warmup = int(o.warmup_epochs * per_epoch)
    else:
        warmup = o.warmup_steps
    if warmup >= max_steps > 0 and warmup > 0:
        source = "warmup_epochs" if o.warmup_epochs > 0 else "warmup_steps"
        raise ValueError(f"engine.optim.{source}: a warm-up of {warmup} steps does not fit a run of {max_steps} "
                         f"steps; set engine.optim.{source} lower")
    return RunLength(max_steps=max_steps, warmup_steps=warmup, steps_per_epoch=per_epoch,
                     epochs=t.epochs, num_images=num_images, global_batch_size=batch,
                     max_steps_wins=t.max_steps is not None and t.epochs is not None)


def config_max_steps(t: Any) -> Optional[int]:
    """The run's steps when the `engine.train` section `t` alone fixes them (max_steps set, or neither key);
    None with epochs."""
    if t.max_steps is not None:
        return t.max_steps
    return None if t.epochs is not None else DEFAULT_MAX_STEPS


def check(cfg: Any) -> None:
    """What the config alone says about the run's length (before start-up; see the module docstring).

    Raises:
        ConfigError: naming the key.
    """
    t, o = cfg.engine.train, cfg.engine.optim
    if t.max_steps is not None and t.max_steps < 1:
        raise ConfigError(f"engine.train.max_steps: expected >= 1 (or null: engine.train.epochs), got {t.max_steps}")
    if t.epochs is not None and t.epochs < 1:
        raise ConfigError(f"engine.train.epochs: expected >= 1 (or null), got {t.epochs}")
    if o.warmup_steps < 0:
        raise ConfigError(f"engine.optim.warmup_steps: expected >= 0, got {o.warmup_steps}")
    if o.warmup_epochs < 0:
        raise ConfigError(f"engine.optim.warmup_epochs: expected >= 0, got {o.warmup_epochs}")
    if o.warmup_epochs > 0 and o.warmup_steps > 0:
        raise ConfigError(f"engine.optim.warmup_epochs: set beside engine.optim.warmup_steps "
                          f"({o.warmup_epochs} epochs, {o.warmup_steps} steps); set one of the two")
    if o.warmup_epochs > 0 and t.epochs is not None and o.warmup_epochs >= t.epochs:
        raise ConfigError(f"engine.optim.warmup_epochs: expected < engine.train.epochs ({t.epochs}), got "
                          f"{o.warmup_epochs}")
    steps = config_max_steps(t)
    if steps is not None and o.warmup_steps >= steps and o.warmup_steps > 0:
        raise ConfigError(f"engine.optim.warmup_steps: expected < engine.train.max_steps ({steps}), "
                          f"got {o.warmup_steps}; set engine.optim.warmup_steps (e.g. --set "
                          f"engine.optim.warmup_steps={steps // 10})")
    sized = cfg.engine.data.source != "synthetic" or dataset_size(cfg) is not None
    if not sized and t.max_steps is None and t.epochs is not None:
        raise ConfigError(f"engine.train.epochs: synthetic data has no size to count epochs in (engine.data.path "
                          f"{cfg.engine.data.path!r} names no public set); set engine.train.max_steps")
    if not sized and o.warmup_epochs > 0 and not (t.max_steps is not None and t.epochs is not None):
        raise ConfigError("engine.optim.warmup_epochs: synthetic data has no size to count epochs in; set "
                          "engine.optim.warmup_steps")


def scale_warmup_epochs(raw: Dict[str, Any], data: Dict[str, Any], overrides: List[str]) -> None:
    """`--set engine.train.epochs=N` without `engine.optim.warmup_epochs`, on a file whose warm-up in epochs is not
    shorter than N: the warm-up keeps its share of the epochs (vit_t's 4 of 40 become 0.2 of 2), with a one-line
    note, as `engine.config.schema._scale_warmup` does for steps. `data` is the file with the overrides applied."""
    keys = {item.split("=", 1)[0].strip() for item in overrides}
    if "engine.train.epochs" not in keys or "engine.optim.warmup_epochs" in keys:
        return
    file_epochs = _section(raw, "engine", "train").get("epochs")
    optim = _section(data, "engine", "optim")
    warmup, epochs = optim.get("warmup_epochs"), _section(data, "engine", "train").get("epochs")
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (warmup, epochs, file_epochs))
    if not numbers or not 0 < epochs <= warmup < file_epochs:
        return
    optim["warmup_epochs"] = warmup * epochs / file_epochs
    from engine.runtime import log  # torch: not at import time

    log.get_logger(__name__).info(
        f"note: engine.optim.warmup_epochs {warmup} does not fit engine.train.epochs={epochs}: scaled with the run "
        f"to {optim['warmup_epochs']:g} (the file's {warmup} of {file_epochs} epochs); set "
        "engine.optim.warmup_epochs to choose")


def _section(d: Any, *keys: str) -> Dict[str, Any]:
    for k in keys:
        d = d.get(k) if isinstance(d, dict) else None
    return d if isinstance(d, dict) else {}  # a malformed file is validate's to report
