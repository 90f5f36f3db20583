"""The typed sections under the config's `engine` key, each field declared with its one-line doc and, for an
enumeration, its choices (engine.config.files.setting).

The declarations are the documentation and the checks at once: `engine.config.schema` checks every enumerated
key against its `choices` (one generic check, no second list), `schema.documented_settings()` lists every key
with its doc, and a configuration matrix (tests/support/config_matrix.py) draws each key's choices, or for a
key that is not enumerated but changes the code path its representative `values`. A new key or value documented
here joins that matrix with no test to edit. Choices that live in heads/, dali_pipes/ or backbones/ are zero-arg
functions, imported when a check runs: importing engine.config stays cheap.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple, Union

from engine.config.files import setting
from engine.config.fsdp import FSDPConfig
from engine.config.tracking import MLflowConfig, WandbConfig

ARCFACE = [1.0, 0.5, 0.0]  # [m1, m2, m3]: ArcFace's additive angular margin (arcface_torch's default)
COSFACE = [1.0, 0.0, 0.35]  # CosFace's additive cosine margin


def _backbone_names() -> List[str]:
    import backbones

    return backbones.list_backbones()


@functools.lru_cache(maxsize=None)
def smallest_per_family() -> Tuple[str, ...]:
    """The registered backbone with the fewest parameters of each family (builder class: IResNet,
    MobileFaceNet, ViT, ...), counted on the meta device: what a configuration matrix trains."""
    import backbones

    best: Dict[str, Tuple[int, str]] = {}
    for name in backbones.list_backbones():
        family = backbones.get_backbone_spec(name).builder.__name__
        model = backbones.build_backbone(name, device="meta")
        count = sum(p.numel() for p in model.parameters())
        if family not in best or count < best[family][0]:
            best[family] = (count, name)
    return tuple(name for _, name in sorted(best.values(), key=lambda cn: cn[1]))


def _offloads():
    from heads.class_store import OFFLOADS

    return OFFLOADS


def _storage_dtypes():
    from heads.class_store import STORAGE_DTYPES

    return tuple(STORAGE_DTYPES)


def _margin_grads():
    from heads.margin import MARGIN_GRADS

    return MARGIN_GRADS


def _head_optimizers():
    from heads.sparse_optim import HEAD_OPTIMIZERS

    return HEAD_OPTIMIZERS


def _sources():
    from dali_pipes.options import SOURCES

    return SOURCES


def _dali_modes():
    from dali_pipes.options import DALI_MODES

    return DALI_MODES


def _on_corrupt():
    from dali_pipes.options import ON_CORRUPT

    return ON_CORRUPT


def _synthetic_modes():
    from dali_pipes.synthetic import SYNTHETIC_MODES

    return SYNTHETIC_MODES


def _resize_modes():
    from dali_pipes.augment import RESIZE_MODES

    return RESIZE_MODES


# engine.train.build.build_backbone builds each; engine.config.schema.BACKEND_CHECKS checks each one's keys
BACKENDS = ("deepspeed", "fsdp")
SCHEDULES = ("poly", "cosine", "step", "constant")  # engine.train.trainer.lr_factor implements each


@dataclass
class ModelConfig:
    name: str = setting("r50", doc="backbone registry name (backbones.list_backbones())", choices=_backbone_names,
                        values=smallest_per_family)
    embedding_size: int = setting(512, doc="embedding dimension (the fc/features layer's width)")
    dropout: float = setting(0.0, doc="dropout before the embedding layer, in [0, 1)", values=(0.0, 0.1))
    channels_last: bool = setting(False, doc="NHWC images and activations (weights too at ZeRO-0 without DeepSpeed's "
                                             "bf16/fp16 block); the CNN recipes set it (bench/channels_last.py)",
                                  values=(False, True))
    checkpoint: Union[str, Dict[str, int]] = setting(
        factory=dict, doc="activation checkpointing: stage -> segments (r2060: {layer2: 20, layer3: 100}), 'all' "
                          "for every block of every stage; empty: off", values=({}, "all"))
    init_from: Optional[str] = setting(None, doc="start from these weights: an arcface_torch .pth / "
                                                 "checkpoint_gpu_*.pt or ArcScale's model.pt")
    init_strict: bool = setting(True, doc="init_from must match every key and shape; false: another embedding "
                                          "head is kept initialised")
    freeze: List[str] = setting(factory=list, doc="fine-tuning: parameter-name patterns (fnmatch, e.g. "
                                "[\"conv1.*\", \"bn1.*\", \"layer1.*\"]) whose parameters get no gradient and no "
                                "update (engine/config/finetune.py)", values=([], ["feature*"]))
    freeze_bn_stats: bool = setting(False, doc="fine-tuning from init_from: every BatchNorm normalises with its "
                                               "running statistics and keeps them as loaded (eval-mode BatchNorm)",
                                    values=(False, True))


@dataclass
class HeadConfig:
    num_classes: Optional[int] = setting(None, doc="class count; null: the dataset's (property file / identity "
                                                   "folders)")
    allow_unused_classes: bool = setting(False, doc="allow a head larger than the dataset's class count (scale "
                                                    "tests: the extra classes are negatives only)")
    sample_rate: float = setting(1.0, doc="Partial FC: share of each rank's class centres sampled per step, in "
                                          "(0, 1] (all positives always)", values=(1.0, 0.25))
    margin: List[float] = setting(factory=lambda: list(ARCFACE), doc="[m1, m2, m3]: m2 ArcFace (angular), m3 "
                                  "CosFace (cosine); m1 must be 1", values=(ARCFACE, COSFACE))
    scale: float = setting(64.0, doc="logit scale s")
    interclass_filtering_threshold: float = setting(0.0, doc="drop negatives closer than this cosine to the "
                                                             "sample, in [0, 1); 0: off", values=(0.0, 0.3))
    margin_grad: str = setting("straight_through", doc="gradient of the margin: arcface_torch's straight-through, "
                                                       "or exact", choices=_margin_grads)
    lr_scale: float = setting(1.0, doc="the head's LR = engine.optim.lr x this")
    chunk_size: int = setting(0, doc="softmax columns per chunk (online softmax, recomputed in backward); 0: "
                                     "auto (chunked above 2**23 logits)", values=(0, 4))
    offload: str = setting("none", doc="'cpu': class centres and their optimizer state in (pinned) host memory",
                           choices=_offloads)
    storage_dtype: str = setting("fp32", doc="dtype the class centres are stored in; loss, gradients and update "
                                             "math stay fp32", choices=_storage_dtypes)
    init_from: Optional[str] = setting(None, doc="class centres (same class count) to start from: an ArcScale "
                                                 "checkpoint, or arcface_torch's checkpoint_gpu_*.pt set (its "
                                                 "folder or one of the files; any number of shards)")


@dataclass
class DataConfig:
    source: str = setting("synthetic", doc="recordio (insightface rec), folder (one folder per identity), demo "
                                           "(the embedded demo set) or synthetic (random tensors)",
                          choices=_sources)
    path: Optional[str] = setting(None, doc="the rec's folder or .rec, the image folder, or the demo directory")
    num_workers: int = setting(2, doc="DALI threads or DataLoader workers (0: load in the training process)",
                               values=(0, 1))
    dali: str = setting("auto", doc="use DALI: auto (when installed), on (required) or off (torch DataLoader)",
                        choices=_dali_modes)
    augment: List[str] = setting(factory=lambda: ["flip"], doc="training augmentations: flip, resize, blur, "
                                 "hsv, gray, or arcface for all", values=(["flip"], ["arcface"]))
    synthetic: str = setting("prototypes", doc="synthetic source: prototypes (a learnable pattern per class) or "
                                               "noise", choices=_synthetic_modes)
    on_corrupt: str = setting("error", doc="a corrupt record: error (stop, naming it) or skip (and count it)",
                              choices=_on_corrupt)
    resize: str = setting("none", doc="images that are not 112x112: none (an error naming the file), pad, "
                                      "center_crop or stretch; also for .bin files", choices=_resize_modes)


@dataclass
class OptimConfig:
    name: str = setting("sgd", doc="optimizer of backbone and head (row-sparse for the head)",
                        choices=_head_optimizers)
    lr: float = setting(0.1, doc="base learning rate")
    momentum: float = setting(0.9, doc="SGD momentum, in [0, 1)")
    weight_decay: float = setting(5e-4, doc="weight decay (every parameter, as arcface_torch)")
    betas: List[float] = setting(factory=lambda: [0.9, 0.999], doc="AdamW's [beta1, beta2]")
    eps: float = setting(1e-8, doc="AdamW's epsilon")
    warmup_steps: int = setting(0, doc="linear warm-up from 0 over this many optimizer steps")
    warmup_epochs: float = setting(0.0, doc="linear warm-up over this many epochs (arcface_torch's warmup_epoch; "
                                            "instead of warmup_steps; engine/config/length.py)")
    schedule: str = setting("poly", doc="LR schedule after warm-up", choices=SCHEDULES)
    poly_power: float = setting(2.0, doc="poly schedule's power (arcface_torch's recipes: 1.0)")
    step_milestones: List[int] = setting(factory=list, doc="step schedule: optimizer steps where the LR is "
                                                           "multiplied by step_gamma")
    step_gamma: float = setting(0.1, doc="step schedule's factor")
    param_groups: List[Dict[str, Any]] = setting(
        factory=list, doc="backbone parameter groups: [{match: [patterns], lr_scale: x, weight_decay: y}]; a "
                          "parameter trains in the first group matching it (LR = the schedule's x lr_scale), the "
                          "rest in the base group", values=([], [{"match": ["*.bias"], "lr_scale": 2.0,
                                                                   "weight_decay": 0.0}]))


@dataclass
class TrainConfig:
    max_steps: Optional[int] = setting(None, doc="optimizer steps to train; wins over epochs when set (neither: "
                                                 "100 steps)")
    epochs: Optional[int] = setting(None, doc="epochs to train: epochs x (dataset images // global batch) optimizer "
                                              "steps, as arcface_torch's num_epoch (engine/config/length.py)")
    output_dir: str = setting("outputs/run", doc="config.json, metrics.jsonl, summary.json, checkpoints, "
                                                 "model.pt")
    log_every: int = setting(10, doc="log a metrics line every N optimizer steps")
    seed: int = setting(0, doc="initialisation, sampling and data order seed")
    backend: str = setting("deepspeed", doc="who shards the backbone: deepspeed (ZeRO as zero_optimization says) "
                                            "or fsdp (FSDP2, engine.fsdp)", choices=BACKENDS)
    tensorboard: bool = setting(False, doc="also write the metrics to <output_dir>/tensorboard",
                                values=(False, True))
    wandb: WandbConfig = setting(factory=WandbConfig, doc="Weights & Biases (engine/config/tracking.py)")
    mlflow: MLflowConfig = setting(factory=MLflowConfig, doc="MLflow (engine/config/tracking.py)")
    dist_timeout_s: float = setting(1800.0, doc="every process group's collective timeout, DeepSpeed's groups "
                                                "included")
    max_nonfinite_steps: int = setting(5, doc="consecutive steps skipped for a non-finite loss or gradient before "
                                              "the run stops")
    watchdog_factor: float = setting(10.0, doc="a step longer than this x the median dumps every thread's stack, "
                                               "and twice as long ends the rank (exit 4); 0: off")
    watchdog_min_s: float = setting(120.0, doc="... and longer than this (capped at dist_timeout_s / 2)")


@dataclass
class EvalConfig:
    bins: List[str] = setting(factory=list, doc="insightface verification .bin files; '{demo}/val.bin' is the "
                                                "demo set's held-out pairs")
    every: int = setting(0, doc="evaluate every N optimizer steps; 0: only at the end (when bins are set)")
    batch_size: int = setting(64, doc="images per rank per forward call")
    at_start: bool = setting(False, doc="also evaluate before the first step (the untrained baseline)")
    targets: List[str] = setting(factory=list, doc="verification sets beside the training data, by name "
                                 "(arcface_torch's val_targets: 'lfw' is <engine.data.path>/lfw.bin); a missing one "
                                 "is named in one line and skipped")


@dataclass
class CheckpointConfig:
    every: int = setting(0, doc="save every N optimizer steps (and at the end); 0: no step interval",
                         values=(0, 1))
    every_minutes: float = setting(30.0, doc="also save when this many minutes have passed since the last save "
                                             "(and at the end once one was written); 0: no time interval")
    keep: int = setting(2, doc="newest complete checkpoints kept; 0: all")
    resume: Optional[str] = setting("auto", doc="'auto' (newest under output_dir, else fresh), a checkpoint path, "
                                                "or null (always fresh)")
    export: bool = setting(True, doc="write <output_dir>/model.pt (arcface_torch keys) at every epoch's end and at "
                                     "the end, and model_best.pt at the best mean verification accuracy")
    overwrite: bool = setting(False, doc="start over: delete the checkpoints and outputs a previous run left in "
                                         "output_dir (resume 'auto' then finds none)")


@dataclass
class ProfileConfig:
    """A window of optimizer steps profiled by engine.profile (phases, FLOPs/MFU, memory, communication)."""

    enabled: bool = setting(False, doc="profile a window of this run (engine.profile turns it on)")
    start_step: int = setting(2, doc="optimizer steps before the window (allocator, buffers, loader warm up)")
    num_steps: int = setting(5, doc="steps in the window; the report goes to <output_dir>/profile/")
    trace: bool = setting(False, doc="also a Chrome trace of the window (perturbs the timings)")
    peak_tflops: float = setting(0.0, doc="device peak at the run's precision; 0: GPU table, or measured on a CPU")


@dataclass
class EngineConfig:
    model: ModelConfig = setting(factory=ModelConfig, doc="the backbone")
    head: HeadConfig = setting(factory=HeadConfig, doc="the Partial FC head")
    data: DataConfig = setting(factory=DataConfig, doc="the training data")
    optim: OptimConfig = setting(factory=OptimConfig, doc="optimizer and LR schedule (backbone and head)")
    train: TrainConfig = setting(factory=TrainConfig, doc="the run")
    eval: EvalConfig = setting(factory=EvalConfig, doc="verification during training")
    checkpoint: CheckpointConfig = setting(factory=CheckpointConfig, doc="checkpoints and resume")
    profile: ProfileConfig = setting(factory=ProfileConfig, doc="a profiled window")
    fsdp: FSDPConfig = setting(factory=FSDPConfig, doc="engine.train.backend fsdp only (engine/config/fsdp.py)")
    auto: bool = setting(False, doc="at start-up, apply engine.plan --fit's choice: the fastest backend/sharding, "
                                    "activation checkpointing, micro-batch x accumulation (same global batch) and "
                                    "head storage that fit this device (engine/train/auto.py)")
    auto_mem_gb: float = setting(0.0, doc="engine.auto's memory budget per rank in GiB; 0: the GPU's memory, or on "
                                          "a CPU the host's memory over the ranks of the node")
