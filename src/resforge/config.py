"""Run configuration: declared once as typed dataclasses, resolved once, saved everywhere.

Resolution order: dataclass defaults <- recipe YAML (``configs/<name>.yaml`` or a path)
<- ``key=value`` overrides.  Keys are ``section.field`` (``optim.lr=0.05``) or a bare
field name when it is unique across sections (``lr=0.05``).  Unknown keys are errors
with a suggestion; values are parsed as YAML scalars and checked against the field type.
"""
from __future__ import annotations

import dataclasses
import difflib
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
    split_seed: int = 0
    manifest: str | None = None       # reuse a split manifest (splits.json) from an earlier run
    train_fraction: float | None = None  # stratified subset of train (few-shot / 1% / 10% studies)
    data_root: str | None = None      # where named sources (cifar10) are looked for
    cache_dir: str | None = None      # decoded uint8 tensors, keyed by content hash
    download: bool = False
    stream: bool = False              # decode per batch in DataLoader workers (sets larger than RAM)
    workers: int = 2                  # DataLoader workers on the streaming path


@dataclass
class ModelConfig:
    name: str = "resnet20"
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
    rrc_scale: tuple[float, float] = (0.35, 1.0)
    mixup: float = 0.0                # Beta(a, a) parameter; 0 = off
    cutmix: float = 0.0               # Beta(a, a) parameter; 0 = off


@dataclass
class OptimConfig:
    name: str = "sgd"                 # sgd (Nesterov) | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4
    no_decay_norm_bias: bool = True   # exclude BN parameters and biases from weight decay
    schedule: str = "onecycle"        # onecycle | cosine | step | linear | constant
    warmup_epochs: float = 0.0        # cosine/linear/step: linear warm-up length
    pct_start: float = 0.25           # onecycle: fraction of steps spent rising
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # step: fractions of training
    milestone_unit: str = "auto"      # step: auto (<= 1 fraction, > 1 epoch) | fraction | epoch | step
    gamma: float = 0.1                # step: factor at each milestone
    label_smoothing: float = 0.0
    clip_grad: float | None = None    # max global grad norm


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 128
    eval_batch_size: int = 512
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    precision: str = "auto"           # auto | fp32 | bf16 | fp16
    channels_last: bool = True
    compile: bool = False
    deterministic: bool = False
    seed: int = 0
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
    project: str = "runs"
    name: str | None = None           # run folder name; default <model>-<data>, never overwritten
    progress: bool = True
    eval_train: int = 0               # each epoch, error of a fixed un-augmented train subset this big
                                      # (eval mode: He et al.'s training error); 0 = off
    grad_norms: bool = False          # log per-stage gradient L2 norms (epoch means) to metrics.csv
    bn_recalibrate: str = "auto"      # after training, re-estimate BatchNorm running statistics on un-augmented
                                      # training images: auto (when a fit took < 1000 optimiser steps, where the
                                      # running averages lag the weights) | always | never


@dataclass
class EvalConfig:
    splits: list[str] = field(default_factory=lambda: ["val", "test"])
    tta: bool = False                 # average logits over the image and its mirror (+ shifts)


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
    probe_weight_decay: float = 1e-4
    class_weights: str = "none"       # none | balanced (inverse class frequency in the loss)
    balanced_sampling: bool = False   # draw training batches with equal class probability
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_lr_mult: float = 1.0         # adapter rate = optim.lr * this (10 diverged with SGD: NaN on BreastMNIST)
    compare: bool = True              # also score the prototype head and the linear probe (report rows a, b)


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
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


def _suggest(key: str, options) -> str:
    close = difflib.get_close_matches(key, list(options), n=1, cutoff=0.5)
    return f" Did you mean '{close[0]}'?" if close else ""


def _section_fields(section: str) -> dict[str, dataclasses.Field]:
    cls = {f.name: f.type for f in dataclasses.fields(RunConfig)}[section]
    cls = typing.get_type_hints(RunConfig)[section] if isinstance(cls, str) else cls
    return {f.name: f for f in dataclasses.fields(cls)}


def _all_keys() -> list[str]:
    return [f"{s}.{k}" for s in SECTIONS for k in _section_fields(s)]


def resolve_key(key: str) -> tuple[str, str]:
    """'optim.lr' or 'lr' -> ('optim', 'lr'); unknown or ambiguous keys raise ConfigError."""
    full = _all_keys()
    if "." in key:
        section, name = key.split(".", 1)
        if f"{section}.{name}" in full:
            return section, name
        raise ConfigError(f"unknown config key '{key}'.{_suggest(key, full)}")
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
            value = [yaml.safe_load(v) for v in value.split(",")]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' expects a list, got {value!r}")
        (inner, *_) = typing.get_args(hint) or (Any,)
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
    return key.strip().lstrip("-"), yaml.safe_load(raw) if raw.strip() else None


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
        data = yaml.safe_load(path.read_text()) or {}
        apply_dict(cfg, data, str(path))
        cfg.recipe = cfg.recipe or path.stem
    items = overrides.items() if isinstance(overrides, dict) else map(parse_override, overrides or [])
    for key, value in items:
        set_value(cfg, key, value)
    validate(cfg)
    return cfg


CHOICES = {
    ("aug", "flip"): ("none", "random", "alternate"),
    ("optim", "name"): ("sgd", "adam", "adamw"),
    ("optim", "schedule"): ("onecycle", "cosine", "step", "linear", "constant"),
    ("optim", "milestone_unit"): ("auto", "fraction", "epoch", "step"),
    ("train", "precision"): ("auto", "fp32", "bf16", "fp16"),
    ("train", "monitor"): ("val_acc", "val_loss"),
    ("train", "bn_recalibrate"): ("auto", "always", "never"),
    ("finetune", "bn"): ("auto", "train", "freeze-stats", "freeze"),
    ("finetune", "head_init"): ("probe", "fresh"),
    ("finetune", "decay_unit"): ("stage", "block"),
    ("finetune", "class_weights"): ("none", "balanced"),
}


def validate(cfg: RunConfig) -> None:
    for (section, name), options in CHOICES.items():
        value = getattr(getattr(cfg, section), name)
        if value not in options:
            raise ConfigError(f"{section}.{name}={value!r} is not one of {', '.join(options)}."
                              f"{_suggest(str(value), options)}")
    if cfg.model.shortcut not in (None, "A", "B"):
        raise ConfigError(f"model.shortcut={cfg.model.shortcut!r}: use A or B")
    if cfg.data.channels not in (None, 1, 3):
        raise ConfigError(f"data.channels={cfg.data.channels}: use 1 or 3")
    if not 0 <= cfg.data.val_fraction < 1:
        raise ConfigError(f"data.val_fraction={cfg.data.val_fraction}: must be in [0, 1)")
    if cfg.train.eval_train < 0:
        raise ConfigError(f"train.eval_train={cfg.train.eval_train}: a count of images, 0 = off")
    if cfg.train.lookahead_every is not None and cfg.train.lookahead_every < 1:
        raise ConfigError("train.lookahead_every must be at least 1 (or null: off)")
    if not 0 <= cfg.train.lookahead_alpha <= 1:
        raise ConfigError(f"train.lookahead_alpha={cfg.train.lookahead_alpha}: must be in [0, 1]")
    if cfg.train.fit_budget and not cfg.train.max_seconds:
        raise ConfigError("train.fit_budget=true sizes the schedule to train.max_seconds: set it too "
                          "(e.g. train.max_seconds=2400 for 40 minutes)")
    if cfg.train.max_seconds is not None and cfg.train.max_seconds <= 0:
        raise ConfigError(f"train.max_seconds={cfg.train.max_seconds}: a positive number of seconds (or null: off)")
    for key in ("train.epochs", "train.batch_size", "train.eval_batch_size", "train.val_every"):
        s, n = key.split(".")
        if getattr(getattr(cfg, s), n) < 1:
            raise ConfigError(f"{key} must be at least 1")
