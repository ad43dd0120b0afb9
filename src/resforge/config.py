"""Run configuration: declared once as typed dataclasses, resolved once, saved everywhere.

Resolution order: dataclass defaults <- recipe YAML (``configs/<name>.yaml`` or a path)
<- ``key=value`` overrides.  Keys are ``section.field`` (``optim.lr=0.05``) or a bare
field name when it is unique across sections (``lr=0.05``).  Unknown keys are errors
with a suggestion; values are parsed as YAML scalars and checked against the field type.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

RECIPE_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration key or value that cannot be used as given."""


@dataclass
class DataConfig:
    source: str = "digits"            # digits | cifar10 | cifar100 | path to folder / .npz / archive
    image_size: int | None = None     # square side the images are stored at; None = the source's own
    channels: int | None = None       # 1 or 3; None = the source's own
    val_fraction: float = 0.1         # carved (stratified) from train when the source has no val split
    split_seed: int = 0               # seed of the train/val carve and of train_fraction subsets
    manifest: str | None = None       # reuse a split manifest (splits.json) from an earlier run
    class_names: str | None = None    # text file, one class name per line in label order (.npz without names)
    train_fraction: float | None = None  # stratified subset of train (few-shot / 1% / 10% studies)
    data_root: str | None = None      # where named sources (cifar10) are looked for
    cache_dir: str | None = None      # decoded uint8 tensors, keyed by content hash
    download: bool = False            # fetch a named source (cifar10) when it is not under data_root
    stream: bool = False              # decode per batch in DataLoader workers (sets larger than RAM)
    workers: int = 2                  # DataLoader workers on the streaming path


@dataclass
class ModelConfig:
    name: str = "resnet20"            # architecture: see `resforge models`
    pretrained: str | None = None     # weights file to start from
    drop_rate: float = 0.0            # dropout before the classifier
    shortcut: str | None = None       # CIFAR nets: "A" (paper default) or "B"
    small_input: bool | None = None   # ImageNet nets: 3x3 stem, no max-pool (for 32x32 inputs)


@dataclass
class AugConfig:
    flip: str = "random"              # none | random | alternate (airbench's alternating flip)
    translate: int = 0                # max shift in pixels (pad + random crop); 0 = off
    cutout: int = 0                   # side of the zeroed square; 0 = off
    random_resized_crop: bool = False  # for larger images; scale range below
    rrc_scale: tuple[float, float] = (0.35, 1.0)  # random_resized_crop: [min, max] area fraction kept
    mixup: float = 0.0                # Beta(a, a) parameter; 0 = off
    cutmix: float = 0.0               # Beta(a, a) parameter; 0 = off
    resize_start: int | None = None   # progressive resizing: the first epoch trains on images resized (bilinear,
                                      # on the device, after the other augmentations) to this side; None = off.
                                      # Evaluation is always at full size. Needs a network that pools globally
    resize_ramp: float = 0.5          # progressive resizing: the side grows linearly from resize_start to full over
                                      # this fraction of train.epochs (one size per epoch), the rest is full size


@dataclass
class OptimConfig:
    name: str = "sgd"                 # sgd (Nesterov) | adam | adamw | muon (Muon for the hidden filters, muon_companion
                                      # for the stem, head, BN and biases; training/muon.py)
    lr: float = 0.1                   # peak learning rate (after warm-up)
    momentum: float = 0.9             # sgd momentum (adam/adamw use their own betas)
    nesterov: bool = True             # sgd and muon: Nesterov momentum
    weight_decay: float = 5e-4        # L2 penalty (decoupled for adamw)
    no_decay_norm_bias: bool = True   # exclude BN parameters and biases from weight decay
    schedule: str = "onecycle"        # onecycle | cosine | step | linear | constant
    warmup_epochs: float = 0.0        # cosine/linear/step: linear warm-up length
    pct_start: float = 0.25           # onecycle: fraction of steps spent rising
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    milestone_unit: str = "auto"      # step: auto (<= 1 fraction, > 1 epoch) | fraction | epoch | step
    gamma: float = 0.1                # step: factor at each milestone
    label_smoothing: float = 0.0      # target mass spread over the other classes, in [0, 1)
    clip_grad: float | None = None    # max global grad norm
    muon_lr: float = 0.02             # muon: the filters' peak rate (the same schedule as optim.lr). Muon's step is
                                      # orthogonalised (every singular value ~1), so this is the step's size, not
                                      # a multiple of the gradient's: it does not change with the loss reduction
    muon_momentum: float = 0.95       # muon: the filters' momentum (optim.momentum is the companion's)
    muon_weight_decay: float = 0.0    # muon: decoupled decay of the filters, w <- w (1 - lr * this) per step
    muon_normalize: bool = False      # muon: rescale each filter to Frobenius norm sqrt(out_channels) before its
                                      # step, so the rate stays relative to the filter (true only for filters that
                                      # feed BatchNorm, whose output ignores their scale: resforge's CNNs)
    muon_ns_steps: int = 5            # muon: Newton-Schulz iterations of the orthogonalisation
    muon_companion: str = "sgd"       # muon: the optimiser of everything Muon leaves out: sgd | adam | adamw
    lr_scaling: str = "none"          # none | linear | sqrt: peak rate = lr * f(train.batch_size / lr_base_batch),
                                      # e.g. to keep a recipe's rate when the global batch grows with the GPUs
    lr_base_batch: int = 256          # the batch that optim.lr was tuned for (used by lr_scaling)
    full_lr_steps: int = 0            # a fit with fewer optimiser steps T scales its peak rate to lr * T / this
                                      # (0 = off). Why: a short run has no steps left to recover from the
                                      # early excursion a high rate causes. 1,200 CIFAR images at 64 px, 4
                                      # epochs = 36 steps, val_loss per epoch -> val top-1:
                                      #   resnet18 lr 0.1   5697, 338, 4.06, 2.41 -> 0.13
                                      #   resnet18 lr 0.05  12.9, 97.5, 3.50, 1.79 -> 0.35
                                      #   resnet18 lr 0.036 5.27, 4.60, 2.43, 1.77 -> 0.38 (this rule at 100)
                                      #   resnet18 lr 0.018 2.37, 2.43, 2.12, 1.92 -> 0.31 (this rule at 200)
                                      #   resnet20 lr 0.1 -> 0.28, lr 0.036 -> 0.26, lr 0.018 -> 0.23
                                      # and 320 synthetic 32-px images, resnet18, 30 steps at 100 (0.03):
                                      # val_loss 27.9 in epoch 1; at 200 (20 steps, 0.01): 2.6, 1.5, no
                                      # blow-up. The default recipe sets 200: safe first, a few points of
                                      # top-1 below the best rate; with onecycle the warm-up stays pct_start
                                      # of the steps, so it too scales with the run's length


@dataclass
class TrainConfig:
    epochs: int = 10                  # passes over the training split
    batch_size: int = 128             # training images per step: the global batch, over all processes of a
                                      # distributed run (each of N takes batch_size / N)
    accumulate: int = 1               # micro-batches per step: gradients of batch_size / (N * accumulate) images
                                      # add up to one step (less memory, the same update)
    sync_bn: bool = False             # distributed: BatchNorm over the global batch (SyncBatchNorm, GPUs only);
                                      # false: each process normalises its own share
    eval_batch_size: int = 512        # images per step when evaluating
    device: str = "auto"              # auto | cpu | mps | cuda | cuda:N | N (GPU index, as Ultralytics/timm)
    precision: str = "auto"           # auto | fp32 | bf16 | fp16
    threads: int | None = None        # CPU threads; None = auto: usable cores not already busy (load), >= 1
    channels_last: bool = True        # NHWC memory layout (faster convolutions with oneDNN/cuDNN)
    compile: bool = False             # torch.compile the model (slow start, faster steps)
    deterministic: bool = False       # deterministic kernels: bit-identical reruns, a little slower
    seed: int = 0                     # seed of initialisation, data order and augmentation
    ema: float | None = None          # EMA decay per update, e.g. 0.999; None = off
    ema_every: int = 1                # update the EMA every k steps
    lookahead_every: int | None = None  # lookahead: pull the weights to a slow copy every k steps; None = off
    lookahead_alpha: float = 0.7738   # its final decay, ramped as alpha * (step/total)^3 (airbench: 0.95**5)
    max_seconds: float | None = None  # time budget: stop after the epoch nearest to it; None = off
    fit_budget: bool = False          # with max_seconds: set epochs to what fits it (timed before training),
                                      # so the lr schedule runs to its end inside the budget
    val_every: int = 1                # validate every k epochs (and at the last)
    patience: int | None = None       # early stopping on `monitor`; None = off
    monitor: str = "val_acc"          # val_acc | val_loss
    restore_best: bool = True         # load the best weights before the final test evaluation
    project: str = "runs"             # folder that run folders are created in
    name: str | None = None           # run folder name; default <model>-<data>, never overwritten
    progress: bool = True             # progress bars on a terminal
    eval_train: int = 0               # each epoch, error of a fixed un-augmented train subset this big
                                      # (eval mode: He et al.'s training error); 0 = off
    grad_norms: bool = False          # log per-stage gradient L2 norms (epoch means) to metrics.csv
    bn_recalibrate: str = "auto"      # after training, re-estimate BatchNorm running statistics on un-augmented
                                      # training images: auto (when a fit took < 1000 optimiser steps, where the
                                      # running averages lag the weights) | always | never


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["val", "test"])  # splits scored after training
    tta: bool = False                 # average logits over the image and its mirror (+ shifts)
    ood_score: str = "msp"            # out-of-distribution score whose threshold is fitted on val after training
                                      # (predict --ood, serve): msp (-log max softmax probability) | energy | none
    ood_accept_rate: float = 0.95     # fraction of val images that threshold accepts (~1 - false-alarm rate)


@dataclass
class FinetuneConfig:
    """Starting from pretrained weights (resforge finetune); ignored by plain training."""
    policy: str = "gradual"           # linear-probe | last-stages:K | stages:A,B | full | gradual | bitfit | lora
    bn: str = "auto"                  # auto (train; freeze-stats for lora) | train | freeze-stats (running
                                      # stats fixed) | freeze (stats and affine)
    head_init: str = "probe"          # probe: start the head from the linear probe (LP-FT) | fresh
    keep_class_rows: bool = False     # copy pretrained fc rows of classes whose names match the data's
    class_map: str | None = None      # explicit "new:old,new2:old2" (or a .json/.yaml file) for keep_class_rows
    source_classes: str | None = None  # text file of the pretrained classes' names (torchvision/timm files)
    input_size: int | None = None     # side the network sees (batches resized on the fly); None = stored size
    head_lr_mult: float = 10.0        # head rate = optim.lr * this
    layer_decay: float = 0.5          # gradual: rate factor per stage (or block) below the head
    decay_unit: str = "stage"         # gradual: stage | block (layer-wise decay per residual block)
    unfreeze_epochs: int = 1          # gradual: epochs of each partial-unfreeze phase (last phase: train.epochs)
    probe_epochs: int = 30            # linear probe on cached features
    probe_lr: float = 0.01            # AdamW rate of the probe
    probe_weight_decay: float = 1e-4  # AdamW weight decay of the probe
    class_weights: str = "none"       # none | balanced (inverse class frequency in the loss)
    balanced_sampling: bool = False   # draw training batches with equal class probability
    lora_rank: int = 8                # lora: rank of the adapters
    lora_alpha: float = 16.0          # lora: adapter scale alpha / rank
    lora_dropout: float = 0.0         # lora: dropout on the adapter input
    lora_lr_mult: float = 1.0         # adapter rate = optim.lr * this (10 diverged with SGD: NaN on BreastMNIST)
    compare: bool = True              # also score the prototype head and the linear probe (report rows a, b)


@dataclass
class ContinualConfig:
    """Updating a trained model on new data (resforge update); ignored by plain training."""
    method: str = "derpp"             # naive | replay (ER) | lwf | derpp (DER++): how old knowledge is kept
    align: bool = False               # weight aligning after training (Zhao et al. 2020): new classes' head rows
                                      # rescaled to the old rows' mean norm (class-incremental updates)
    buffer_size: int = 500            # replay buffer capacity in images, class-balanced (kept with every version)
    selection: str = "reservoir"      # reservoir (uniform per class) | herding (iCaRL: nearest the class mean)
    replay_batch: int | None = None   # replayed images added to each step's batch; None = train.batch_size
    alpha: float = 0.2                # derpp: weight of the MSE on replayed logits (paper: 0.1-0.2 on Split CIFAR-10)
    beta: float = 0.5                 # derpp: weight of the cross-entropy on replayed labels (paper: 0.5)
    lwf_weight: float = 1.0           # lwf: weight of the distillation term
    temperature: float = 2.0          # lwf: softmax temperature of the distillation (Li & Hoiem: 2)
    min_per_class: int = 2            # fewer training images than this in a class of the new data is an error


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    continual: ContinualConfig = field(default_factory=ContinualConfig)
    recipe: str | None = None

    def to_dict(self) -> dict:
        return _plain(dataclasses.asdict(self))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


SECTIONS = [f.name for f in dataclasses.fields(RunConfig) if f.name != "recipe"]


def _plain(obj):
    """Tuples become lists so YAML/JSON dumps stay plain."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    return obj


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


_SENTENCE_END = re.compile(r"(?<!\bal)(?<!\be\.g)(?<!\bi\.e)(?<!\bvs)(?<!\bsec)(?<!\bcf)\.\s+(?=[A-Z(])")


def recipe_summary(text: str) -> str:
    """A recipe's one-line description: the first sentence of its leading comment paragraph
    (comment lines up to the first blank comment line or the first YAML line)."""
    para = []
    for line in text.splitlines():
        if not line.startswith("#"):
            break
        body = line.lstrip("#").strip()
        if not body:
            if para:
                break
            continue
        para.append(body)
    joined = " ".join(para)
    return _SENTENCE_END.split(joined, maxsplit=1)[0].rstrip(".") + "." if joined else ""


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = {f.name: f.type for f in dataclasses.fields(RunConfig)}[section]
    cls = typing.get_type_hints(RunConfig)[section] if isinstance(cls, str) else cls
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


SECTION_KEYS = {"data": "source", "model": "name", "optim": "name", "finetune": "policy"}   # data=X -> data.source=X


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.lr' or 'lr' -> ('optim', 'lr'); unknown or ambiguous keys raise ConfigError."""
    full = _all_keys()
    if "." in key:
        section, name = key.split(".", 1)
        if f"{section}.{name}" in full:
            return section, name
        raise ConfigError(f"unknown config key '{key}'.{_suggest(key, full)}")
    if key in SECTION_KEYS:               # data=digits: the section's main field
        return key, SECTION_KEYS[key]
    if key in SECTIONS:
        some = ", ".join(list(_section_fields(key))[:3])
        raise ConfigError(f"'{key}' is a section, not a key: name one of its keys, e.g. {key}.{some.split(', ')[0]} "
                          f"({some}, ...; see `resforge config --section {key}`)")
    owners = [k for k in full if k.split(".", 1)[1] == key]
    if len(owners) == 1:
        return tuple(owners[0].split(".", 1))
    if owners:
        raise ConfigError(f"config key '{key}' is ambiguous: use one of {', '.join(owners)}")
    names = {k.split(".", 1)[1] for k in full} | set(full)
    raise ConfigError(f"unknown config key '{key}'.{_suggest(key, names)}")


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _coerce(value: Any, hint, key: str):
    """Check/convert a parsed value against a dataclass field's type hint."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if origin in (list, tuple):
        if isinstance(value, str):
            try:
                value = [yaml.safe_load(v) for v in value.split(",")]
            except yaml.YAMLError:
                raise ConfigError(f"config key '{key}' expects a list, e.g. [0.5, 0.75], got {value!r}") from None
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (inner, *rest) = typing.get_args(hint) or (Any,)
        if origin is tuple and Ellipsis not in rest and len(value) != 1 + len(rest):
            raise ConfigError(f"config key '{key}' expects {1 + len(rest)} values, e.g. [0.35, 1.0], got {value!r}")
        items = [_coerce(v, inner, key) if inner is not Any else v for v in value]
        return tuple(items) if origin is tuple else items
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects true/false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' expects an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > 1e308:
                raise ConfigError(f"config key '{key}' expects a number, got one too large: {str(value)[:20]}...")
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)           # YAML 1.1 reads "1e-3" (no dot) as a string
        raise ConfigError(f"config key '{key}' expects a number, got {value!r}")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"config key '{key}' expects a string, got {value!r}")
    return value


def _hint(section: str, name: str):
    cls = type(getattr(RunConfig(), section))
    return typing.get_type_hints(cls)[name]


def set_value(cfg: RunConfig, key: str, value: Any) -> None:
    section, name = resolve_key(key)
    value = _coerce(value, _hint(section, name), f"{section}.{name}")
    setattr(getattr(cfg, section), name, value)


def apply_dict(cfg: RunConfig, data: dict, origin: str) -> None:
    """Apply a nested {section: {field: value}} mapping (a recipe or a saved config)."""
    for section, values in data.items():
        if section == "recipe":
            cfg.recipe = values
            continue
        if section not in SECTIONS:
            raise ConfigError(f"{origin}: unknown section '{section}'.{_suggest(section, SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"{origin}: section '{section}' must be a mapping")
        for name, value in values.items():
            try:
                set_value(cfg, f"{section}.{name}", value)
            except ConfigError as e:
                raise ConfigError(f"{origin}: {e}") from None


def parse_override(text: str) -> tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value (e.g. optim.lr=0.05)")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override '{text}': the value is not valid YAML ({str(e).splitlines()[0]}); "
                          "quote it, e.g. key='a: b'") from None
    return key.strip().lstrip("-"), value


def recipe_path(recipe: str) -> Path:
    path = Path(recipe)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    named = RECIPE_DIR / f"{recipe}.yaml"
    if named.is_file():
        return named
    raise ConfigError(f"unknown recipe '{recipe}'.{_suggest(recipe, list_recipes())} "
                      f"Known recipes: {', '.join(list_recipes())}; or pass a path to a YAML file.")


def load_config(recipe: str | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> RunConfig:
    """Resolve defaults <- base (e.g. a saved config) <- recipe <- overrides into a RunConfig."""
    cfg = RunConfig()
    if base:
        apply_dict(cfg, base, "saved config")
    if recipe:
        path = recipe_path(recipe)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path} is not a readable YAML recipe ({str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of sections (data:, model:, train: ...), "
                              f"not a {type(data).__name__}")
        apply_dict(cfg, data, str(path))
        cfg.recipe = cfg.recipe or path.stem
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


CHOICES = {
    ("aug", "flip"): ("none", "random", "alternate"),
    ("optim", "name"): ("sgd", "adam", "adamw", "muon"),
    ("optim", "muon_companion"): ("sgd", "adam", "adamw"),
    ("optim", "schedule"): ("onecycle", "cosine", "step", "linear", "constant"),
    ("optim", "milestone_unit"): ("auto", "fraction", "epoch", "step"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "monitor"): ("val_acc", "val_loss"),
    ("train", "bn_recalibrate"): ("auto", "always", "never"),
    ("optim", "lr_scaling"): ("none", "linear", "sqrt"),
    ("finetune", "bn"): ("auto", "train", "freeze-stats", "freeze"),
    ("finetune", "head_init"): ("probe", "fresh"),
    ("eval", "ood_score"): ("msp", "energy", "none"),
    ("finetune", "decay_unit"): ("stage", "block"),
    ("finetune", "class_weights"): ("none", "balanced"),
    ("continual", "method"): ("naive", "replay", "lwf", "derpp"),
    ("continual", "selection"): ("reservoir", "herding"),
    ("model", "shortcut"): (None, "A", "B"),
    ("data", "channels"): (None, 1, 3),
}

MAX_IMAGE_SIZE = 4096      # pixels per side (= the data and artifact limit RESFORGE_MAX_IMAGE_SIDE default)
MAX_SEED = 2**32 - 1       # numpy's seed range
MAX_THREADS = 1024
_INF = math.inf

# Every numeric field, (low, high, bounds): "[]" closed, "(]" low excluded, "[)" high excluded,
# "()" both.  None is allowed wherever the field's type allows it.  tests/test_config.py checks
# that each field of each section is covered by RANGES, CHOICES, bool type or _STRING_CHECKS.
RANGES = {
    "data.image_size": (1, MAX_IMAGE_SIZE, "[]"),
    "data.val_fraction": (0, 1, "[)"),
    "eval.ood_accept_rate": (0, 1, "()"),
    "data.split_seed": (0, MAX_SEED, "[]"),
    "data.train_fraction": (0, 1, "(]"),
    "data.workers": (0, 256, "[]"),
    "model.drop_rate": (0, 1, "[)"),
    "aug.translate": (0, MAX_IMAGE_SIZE, "[]"),
    "aug.cutout": (0, MAX_IMAGE_SIZE, "[]"),
    "aug.mixup": (0, _INF, "[)"),
    "aug.cutmix": (0, _INF, "[)"),
    "aug.rrc_scale": (0, 1, "(]"),
    "aug.resize_start": (1, MAX_IMAGE_SIZE, "[]"),
    "aug.resize_ramp": (0, 1, "(]"),
    "optim.lr": (0, _INF, "()"),
    "optim.momentum": (0, 1, "[)"),
    "optim.weight_decay": (0, _INF, "[)"),
    "optim.warmup_epochs": (0, _INF, "[)"),
    "optim.pct_start": (0, 1, "()"),
    "optim.full_lr_steps": (0, _INF, "[)"),
    "optim.milestones": (0, _INF, "()"),
    "optim.gamma": (0, _INF, "()"),
    "optim.label_smoothing": (0, 1, "[)"),
    "optim.clip_grad": (0, _INF, "()"),
    "optim.muon_lr": (0, _INF, "()"),
    "optim.muon_momentum": (0, 1, "[)"),
    "optim.muon_weight_decay": (0, _INF, "[)"),
    "optim.muon_ns_steps": (1, 99, "[]"),
    "train.epochs": (1, 1_000_000, "[]"),
    "train.batch_size": (1, 1_000_000, "[]"),
    "train.accumulate": (1, 1_000_000, "[]"),
    "optim.lr_base_batch": (1, 1_000_000, "[]"),
    "train.eval_batch_size": (1, 1_000_000, "[]"),
    "train.threads": (1, MAX_THREADS, "[]"),
    "train.seed": (0, MAX_SEED, "[]"),
    "train.ema": (0, 1, "()"),
    "train.ema_every": (1, 1_000_000, "[]"),
    "train.lookahead_every": (1, 1_000_000, "[]"),
    "train.lookahead_alpha": (0, 1, "[]"),
    "train.max_seconds": (0, _INF, "()"),
    "train.val_every": (1, 1_000_000, "[]"),
    "train.patience": (1, 1_000_000, "[]"),
    "train.eval_train": (0, 10**9, "[]"),
    "finetune.input_size": (1, MAX_IMAGE_SIZE, "[]"),
    "finetune.head_lr_mult": (0, _INF, "()"),
    "finetune.layer_decay": (0, 1, "(]"),
    "finetune.unfreeze_epochs": (1, 1_000_000, "[]"),
    "finetune.probe_epochs": (1, 1_000_000, "[]"),
    "finetune.probe_lr": (0, _INF, "()"),
    "finetune.probe_weight_decay": (0, _INF, "[)"),
    "finetune.lora_rank": (1, 4096, "[]"),
    "finetune.lora_alpha": (0, _INF, "()"),
    "finetune.lora_dropout": (0, 1, "[)"),
    "finetune.lora_lr_mult": (0, _INF, "()"),
    "continual.buffer_size": (0, 10_000_000, "[]"),
    "continual.replay_batch": (1, 1_000_000, "[]"),
    "continual.alpha": (0, _INF, "[)"),
    "continual.beta": (0, _INF, "[)"),
    "continual.lwf_weight": (0, _INF, "[)"),
    "continual.temperature": (0, _INF, "()"),
    "continual.min_per_class": (1, 1_000_000, "[]"),
}

SPLITS = ("train", "val", "test")
_PLAIN_POLICIES = ("linear-probe", "full", "gradual", "bitfit", "lora")
POLICY_FORMS = "linear-probe, last-stages:K, stages:A,B, full, gradual, bitfit or lora"


def _range_text(low, high, bounds: str) -> str:
    if high == _INF:
        return f"at least {low}" if bounds[0] == "[" else f"greater than {low}"
    if bounds == "[]":
        return f"at least {low} and at most {high}"
    return f"in {bounds[0]}{low}, {high}{bounds[1]}"


def _in_range(v, low, high, bounds: str) -> bool:
    if isinstance(v, float) and not math.isfinite(v):
        return False
    return (low <= v if bounds[0] == "[" else low < v) and (v <= high if bounds[1] == "]" else v < high)


def _check_ranges(cfg: RunConfig) -> None:
    for key, (low, high, bounds) in RANGES.items():
        s, n = key.split(".")
        value = getattr(getattr(cfg, s), n)
        for v in (value if isinstance(value, (list, tuple)) else [value]):
            if v is not None and not _in_range(v, low, high, bounds):
                raise ConfigError(f"{key}={_show(value)} is out of range: it must be {_range_text(low, high, bounds)}"
                                  + (f" (MAX_IMAGE_SIZE={MAX_IMAGE_SIZE})" if high == MAX_IMAGE_SIZE else ""))


def _show(value) -> str:
    return str(list(value)) if isinstance(value, tuple) else str(value)


def _check_strings(cfg: RunConfig) -> None:
    """Text fields: not empty where a value is needed, and each one's own grammar."""
    for key in ("data.source", "data.manifest", "data.class_names", "data.data_root", "data.cache_dir", "model.name",
                "model.pretrained", "train.project", "train.name", "finetune.class_map", "finetune.source_classes"):
        s, n = key.split(".")
        value = getattr(getattr(cfg, s), n)
        if value is not None and (not value.strip() or "\0" in value):
            raise ConfigError(f"{key}={value!r}: give a non-empty value" + (" (or null)" if key not in
                              ("data.source", "model.name", "train.project") else ""))
    name = cfg.train.name
    if name is not None and (name in (".", "..") or "/" in name or "\\" in name):
        raise ConfigError(f"train.name={name!r} must be a single folder name (it is created under train.project)")
    try:
        from resforge.training.device_names import one_device
        one_device(cfg.train.device)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from None
    if cfg.model.pretrained is not None:
        check_weights_path(cfg.model.pretrained, "model.pretrained")
    bad = [s for s in cfg.eval.splits if s not in SPLITS]
    if bad:
        raise ConfigError(f"eval.splits: {bad[0]!r} is not a split: use any of {', '.join(SPLITS)}")
    policy = cfg.finetune.policy
    kind, _, arg = policy.partition(":")
    ok = ((kind in _PLAIN_POLICIES and not _) or (kind == "last-stages" and arg.isdigit() and int(arg) >= 1)
          or (kind == "stages" and any(a.strip() for a in arg.split(","))))
    if not ok:
        raise ConfigError(f"finetune.policy={policy!r} is not one of {POLICY_FORMS}.{_suggest(kind, _PLAIN_POLICIES)}")


TORCHVISION_FILES = {"resnet18": "resnet18-f37072fd.pth", "resnet34": "resnet34-b627a593.pth",
                     "resnet50": "resnet50-0676ba61.pth", "resnet101": "resnet101-63fe2227.pth",
                     "resnet152": "resnet152-394f9c45.pth"}
_MODEL_NAME = re.compile(r"(resnet|resnext|wide_resnet|plain|airbench)[0-9][a-z0-9_]*")
_WEIGHT_SUFFIXES = (".pth", ".pt", ".th", ".bin", ".safetensors", ".ckpt", ".tar", ".npz")


def check_weights_path(value: str, key: str,
                       use: str = "model.pretrained=PATH, or resforge finetune --from PATH") -> None:
    """A bare model name where a weights file belongs (model.pretrained=resnet18): resforge never
    downloads, so say where the file comes from and how to pass it.  Paths are checked later."""
    p = Path(value)
    if (p.exists() or "/" in value or "\\" in value or p.suffix.lower() in _WEIGHT_SUFFIXES
            or not _MODEL_NAME.fullmatch(value.lower())):
        return
    file = TORCHVISION_FILES.get(value.lower())
    where = (f"fetch https://download.pytorch.org/models/{file} (torchvision's ImageNet weights) on a connected "
             "machine, then pass" if file else "pass")
    raise ConfigError(f"{key}={value!r} is a model name, not a file: resforge needs a local weights file and never "
                      f"downloads; {where} its path ({use})")


def _check_combinations(cfg: RunConfig) -> None:
    t, o, a = cfg.train, cfg.optim, cfg.aug
    if t.fit_budget and not t.max_seconds:
        raise ConfigError("train.fit_budget=true sizes the schedule to train.max_seconds: set it too "
                          "(e.g. train.max_seconds=2400 for 40 minutes)")
    if a.resize_start is not None and t.fit_budget:
        raise ConfigError("train.fit_budget times full-size steps, so it cannot size a schedule whose first epochs "
                          "train on smaller images (aug.resize_start): set train.epochs instead")
    if a.rrc_scale[0] > a.rrc_scale[1]:
        raise ConfigError(f"aug.rrc_scale={_show(a.rrc_scale)}: the minimum comes first ([min, max], e.g. [0.35, 1.0])")
    if list(o.milestones) != sorted(o.milestones):
        raise ConfigError(f"optim.milestones={_show(o.milestones)} must be in increasing order")
    if o.milestone_unit == "fraction" and any(m > 1 for m in o.milestones):
        raise ConfigError(f"optim.milestones={_show(o.milestones)} with milestone_unit=fraction must be in (0, 1]")
    if o.milestone_unit == "step" and any(m != int(m) for m in o.milestones):
        raise ConfigError(f"optim.milestones={_show(o.milestones)} with milestone_unit=step must be whole steps")
    if o.schedule != "onecycle" and o.warmup_epochs > t.epochs:
        raise ConfigError(f"optim.warmup_epochs={o.warmup_epochs} is longer than train.epochs={t.epochs}")
    size = cfg.data.image_size
    for key, v in (("aug.translate", a.translate), ("aug.cutout", a.cutout)):
        if size is not None and v > size:
            raise ConfigError(f"{key}={v} is larger than the images (data.image_size={size})")
    if size is not None and a.resize_start is not None and a.resize_start >= size:
        raise ConfigError(f"aug.resize_start={a.resize_start} must be smaller than the images (data.image_size={size}) "
                          "to save work; null turns progressive resizing off")
    if t.precision == "fp16":
        from resforge.training.device_names import parse_device
        if parse_device(t.device)[0] in ("cpu", "mps"):
            raise ConfigError(f"train.precision=fp16 needs a CUDA device (train.device={t.device}): use bf16 or fp32")


def validate_update(cfg: RunConfig) -> None:
    """What only an update (resforge update) needs of the continual section, beyond validate()."""
    c, a = cfg.continual, cfg.aug
    if c.method in ("replay", "derpp") and c.buffer_size == 0:
        raise ConfigError(f"continual.method={c.method} replays a buffer, but continual.buffer_size=0: give it a "
                          "size in images (e.g. 500), or use continual.method=lwf or naive")
    if c.method == "derpp" and (a.mixup or a.cutmix):
        raise ConfigError("continual.method=derpp replays the logits stored with each buffer image, which mixup/"
                          "cutmix would pair with mixed images: set aug.mixup=0 and aug.cutmix=0, or use "
                          "continual.method=replay")
    if cfg.train.fit_budget:
        raise ConfigError("train.fit_budget is not used by updates: set train.epochs (train.max_seconds still "
                          "stops the update at the budget)")


def validate(cfg: RunConfig) -> None:
    """Every field of every section against its type's range, choices and the combinations that
    cannot work, so a bad value stops the command before any folder or file is made."""
    for (section, name), options in CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            shown = ", ".join("null" if o is None else str(o) for o in options)
            raise ConfigError(f"{section}.{name}={value!r} is not one of {shown}."
                              f"{_suggest(str(value), [str(o) for o in options])}")
    _check_ranges(cfg)
    _check_strings(cfg)
    _check_combinations(cfg)


# ---------------------------------------------------------------- help: `resforge config`

def field_help() -> dict[str, str]:
    """'section.field' -> its one-line help: the comment after the field in this file's source
    (continued on comment-only lines below it), so the dataclasses stay the one source of truth."""
    import ast
    import io
    import tokenize

    source = Path(__file__).read_text(encoding="utf-8")
    comments: dict[int, str] = {}
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
    lines = source.splitlines()
    section_of = {f.type if isinstance(f.type, str) else f.type.__name__: f.name
                  for f in dataclasses.fields(RunConfig) if f.name in SECTIONS}
    out = {}
    for node in ast.parse(source).body:
        if not (isinstance(node, ast.ClassDef) and node.name in section_of):
            continue
        for item in node.body:
            if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                end = item.end_lineno
                text = [comments[end]] if end in comments else []
                while end < len(lines) and lines[end].strip().startswith("#"):    # continuation lines
                    end += 1
                    text.append(comments[end])
                out[f"{section_of[node.name]}.{item.target.id}"] = " ".join(text)
    return out


def _type_name(hint) -> str:
    text = str(hint).replace("typing.", "").replace("NoneType", "None")
    return text if "[" in text or "|" in text else getattr(hint, "__name__", text)


def describe_keys(section: str | None = None) -> str:
    """The `resforge config` listing: per section, each key with its type, default, help and the
    range validate() holds it to."""
    if section is not None and section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}'.{_suggest(section, SECTIONS)} Sections: {', '.join(SECTIONS)}")
    helps, defaults, rows = field_help(), RunConfig().to_dict(), []
    for s in [section] if section else SECTIONS:
        cls = type(getattr(RunConfig(), s))
        own_doc = cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "(")    # not dataclass's generated one
        rows.append((f"{s}:" + (f"  {cls.__doc__.strip()}" if own_doc else ""),))
        hints = typing.get_type_hints(cls)
        for name in _section_fields(s):
            key = f"{s}.{name}"
            default = yaml.safe_dump(defaults[s][name], default_flow_style=True).strip().removesuffix("\n...").strip()
            limit = f" (allowed: {_range_text(*RANGES[key])})" if key in RANGES else ""
            rows.append((f"  {key}", _type_name(hints[name]), default, helps.get(key, "") + limit))
    widths = [max(len(r[i]) for r in rows if len(r) > 1) for i in range(3)]
    return "\n".join(r[0] if len(r) == 1 else "  ".join([*(c.ljust(w) for c, w in zip(r, widths)), r[3]])
                     for r in rows)
