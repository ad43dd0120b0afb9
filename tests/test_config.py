"""Config: recipes, overrides, type checks and suggestions for unknown keys."""
import re

import pytest
import yaml

from resforge.config import ConfigError, RunConfig, list_recipes, load_config


def test_defaults_recipe_and_overrides_resolve_in_order():
    cfg = load_config("digits", ["optim.lr=0.05", "epochs=3", "aug.rrc_scale=[0.2, 1.0]"])
    assert cfg.optim.lr == 0.05 and cfg.train.epochs == 3
    assert cfg.aug.rrc_scale == (0.2, 1.0)
    assert cfg.data.source == "digits" and cfg.recipe == "digits"


def test_every_recipe_loads():
    assert "digits" in list_recipes()
    for name in list_recipes():
        load_config(name)


def test_numbers_in_exponent_form_without_a_dot_are_numbers():
    # YAML 1.1 (PyYAML) reads "1e-3" as a string; a user typing it means 0.001
    cfg = load_config(None, ["optim.lr=1e-3", "optim.weight_decay=5E-4", "finetune.probe_lr=+2e1"])
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.finetune.probe_lr) == (0.001, 0.0005, 20.0)


@pytest.mark.parametrize("override, words", [
    ("lrr=0.1", "Did you mean 'lr'"),
    ("optim.lrr=0.1", "Did you mean 'optim.lr'"),
    ("epochs=1.5", "expects an integer"),
    ("optim.lr=fast", "expects a number"),
    ("flip=alternat", "Did you mean 'alternate'"),
    ("noequals", "key=value"),
    ("train.epochs=0", "at least 1"),
])
def test_bad_overrides_are_clear_errors(override, words):
    with pytest.raises(ConfigError, match=words):
        load_config(None, [override])


def test_unknown_key_in_recipe_file_names_the_file(tmp_path):
    bad = tmp_path / "mine.yaml"
    bad.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match="mine.yaml.*optim.learning_rate"):
        load_config(str(bad))


def test_saved_config_round_trips():
    cfg = load_config("digits", ["train.seed=7", "model.shortcut=B"])
    again = load_config(None, base=yaml.safe_load(cfg.to_yaml()))
    assert again.to_dict() == cfg.to_dict()
    assert isinstance(RunConfig().to_dict()["aug"]["rrc_scale"], list)


# ---------------------------------------------------------------- every field validated at resolve time

import dataclasses  # noqa: E402
import math  # noqa: E402
import typing  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from resforge import config as C  # noqa: E402

BAD = [  # (override, key the message must name, words)
    ("data.image_size=0", "data.image_size", "at least 1"),
    ("data.image_size=100000", "data.image_size", "MAX_IMAGE_SIZE=4096"),
    ("data.channels=2", "data.channels", "one of"),
    ("data.val_fraction=1", "data.val_fraction", "[0, 1)"),
    ("data.split_seed=-1", "data.split_seed", "at least 0"),
    ("data.train_fraction=0", "data.train_fraction", "(0, 1]"),
    ("data.workers=-1", "data.workers", "at least 0"),
    ("data.source=''", "data.source", "non-empty"),
    ("model.drop_rate=1", "model.drop_rate", "[0, 1)"),
    ("model.shortcut=C", "model.shortcut", "one of"),
    ("model.pretrained=resnet18", "model.pretrained", "download.pytorch.org/models/resnet18-f37072fd.pth"),
    ("aug.flip=sideways", "aug.flip", "one of"),
    ("aug.translate=-4", "aug.translate", "at least 0"),
    ("aug.cutout=-1", "aug.cutout", "at least 0"),
    ("aug.mixup=-1", "aug.mixup", "at least 0"),
    ("aug.cutmix=-0.5", "aug.cutmix", "at least 0"),
    ("aug.rrc_scale=[1,0]", "aug.rrc_scale", "(0, 1]"),
    ("aug.rrc_scale=[0.9,0.2]", "aug.rrc_scale", "minimum comes first"),
    ("aug.rrc_scale=[0.2,0.5,0.9]", "aug.rrc_scale", "expects 2 values"),
    ("optim.name=rmsprop", "optim.name", "one of"),
    ("optim.lr=-1", "optim.lr", "greater than 0"),
    ("optim.lr=.nan", "optim.lr", "greater than 0"),
    ("optim.lr=.inf", "optim.lr", "greater than 0"),
    ("optim.momentum=1", "optim.momentum", "[0, 1)"),
    ("optim.weight_decay=-1e-4", "optim.weight_decay", "at least 0"),
    ("optim.schedule=poly", "optim.schedule", "one of"),
    ("optim.warmup_epochs=-1", "optim.warmup_epochs", "at least 0"),
    ("optim.pct_start=1", "optim.pct_start", "(0, 1)"),
    ("optim.milestones=[0.75,0.5]", "optim.milestones", "increasing"),
    ("optim.milestones=[0,0.5]", "optim.milestones", "greater than 0"),
    ("optim.gamma=0", "optim.gamma", "greater than 0"),
    ("optim.label_smoothing=2", "optim.label_smoothing", "[0, 1)"),
    ("optim.clip_grad=-1", "optim.clip_grad", "greater than 0"),
    ("optim.milestone_unit=weeks", "optim.milestone_unit", "one of"),
    ("train.epochs=0", "train.epochs", "at least 1"),
    ("train.batch_size=0", "train.batch_size", "at least 1"),
    ("train.eval_batch_size=0", "train.eval_batch_size", "at least 1"),
    ("train.device=banana", "train.device", "cuda:N"),
    ("train.device=0,1", "train.device", "torchrun"),
    ("train.precision=fp8", "train.precision", "one of"),
    ("train.threads=0", "train.threads", "at least 1"),
    ("train.seed=99999999999999999999", "train.seed", "4294967295"),
    ("train.seed=-1", "train.seed", "at least 0"),
    ("train.ema=2", "train.ema", "(0, 1)"),
    ("train.ema_every=0", "train.ema_every", "at least 1"),
    ("train.lookahead_every=0", "train.lookahead_every", "at least 1"),
    ("train.lookahead_alpha=1.5", "train.lookahead_alpha", "at most 1"),
    ("train.max_seconds=0", "train.max_seconds", "greater than 0"),
    ("train.fit_budget=true", "train.max_seconds", "set it too"),
    ("train.val_every=0", "train.val_every", "at least 1"),
    ("train.patience=-1", "train.patience", "at least 1"),
    ("train.monitor=loss", "train.monitor", "one of"),
    ("train.name=../escape", "train.name", "single folder name"),
    ("train.project=''", "train.project", "non-empty"),
    ("train.eval_train=-1", "train.eval_train", "at least 0"),
    ("eval.splits=[val,holdout]", "eval.splits", "holdout"),
    ("finetune.policy=some", "finetune.policy", "last-stages:K"),
    ("finetune.policy=last-stages:0", "finetune.policy", "last-stages:K"),
    ("finetune.bn=sometimes", "finetune.bn", "one of"),
    ("finetune.head_init=random", "finetune.head_init", "one of"),
    ("finetune.input_size=0", "finetune.input_size", "at least 1"),
    ("finetune.head_lr_mult=0", "finetune.head_lr_mult", "greater than 0"),
    ("finetune.layer_decay=0", "finetune.layer_decay", "(0, 1]"),
    ("finetune.decay_unit=layer", "finetune.decay_unit", "one of"),
    ("finetune.unfreeze_epochs=0", "finetune.unfreeze_epochs", "at least 1"),
    ("finetune.probe_epochs=0", "finetune.probe_epochs", "at least 1"),
    ("finetune.probe_lr=0", "finetune.probe_lr", "greater than 0"),
    ("finetune.probe_weight_decay=-1", "finetune.probe_weight_decay", "at least 0"),
    ("finetune.class_weights=inverse", "finetune.class_weights", "one of"),
    ("finetune.lora_rank=0", "finetune.lora_rank", "at least 1"),
    ("finetune.lora_alpha=0", "finetune.lora_alpha", "greater than 0"),
    ("finetune.lora_dropout=1", "finetune.lora_dropout", "[0, 1)"),
    ("finetune.lora_lr_mult=-1", "finetune.lora_lr_mult", "greater than 0"),
]


@pytest.mark.parametrize("override, key, words", BAD, ids=[b[0] for b in BAD])
def test_bad_values_are_config_errors_naming_the_key(override, key, words):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert key in str(e.value) and words in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("overrides, words", [
    (["data.image_size=16", "aug.cutout=40"], "larger than the images"),
    (["optim.schedule=cosine", "optim.warmup_epochs=20", "train.epochs=5"], "longer than train.epochs"),
    (["optim.schedule=step", "optim.milestone_unit=fraction", "optim.milestones=[0.5,2]"], "(0, 1]"),
    (["optim.milestone_unit=step", "optim.milestones=[10.5]"], "whole steps"),
    (["train.precision=fp16", "train.device=cpu"], "needs a CUDA device"),
])
def test_combinations_that_cannot_work(overrides, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        load_config(None, overrides)


def test_every_field_of_every_section_has_a_check_and_a_help_line():
    helps = C.field_help()
    checked_text = {"data.source", "data.manifest", "data.class_names", "data.data_root", "data.cache_dir", "model.name",
                    "model.pretrained", "train.project", "train.name", "train.device", "eval.splits",
                    "finetune.policy", "finetune.class_map", "finetune.source_classes"}
    choices = {f"{s}.{n}" for s, n in C.CHOICES}
    for key in C._all_keys():
        s, n = key.split(".")
        hint = typing.get_type_hints(type(getattr(RunConfig(), s)))[n]
        is_bool = hint in (bool, bool | None)
        assert is_bool or key in C.RANGES or key in choices or key in checked_text, f"{key} is not validated"
        assert helps.get(key), f"{key} has no help comment in config.py"
    assert "so the lr schedule runs to its end" in helps["train.fit_budget"]      # continuation line kept


def test_defaults_and_recipes_pass_their_own_validation():
    C.validate(RunConfig())
    for name in list_recipes():
        load_config(name)


def test_bare_section_name_sets_its_main_field():
    cfg = load_config(None, ["data=cifar10", "model=resnet56", "optim=adamw", "finetune=full"])
    assert (cfg.data.source, cfg.model.name, cfg.optim.name, cfg.finetune.policy) == ("cifar10", "resnet56",
                                                                                     "adamw", "full")
    with pytest.raises(ConfigError, match="'train' is a section.*train.epochs.*--section train"):
        load_config(None, ["train=5"])


_KEYS = C._all_keys() + [k.split(".")[1] for k in C._all_keys()] + list(C.SECTIONS) + ["", "x.y.z"]
_VALUES = st.one_of(
    st.text(max_size=12), st.integers(min_value=-2**70, max_value=2**70).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["null", "true", "[1, 0]", "[", "{a: 1}", "1e999", "0,1", "cuda:9", "-", "a: b", "!!python/none",
                     "2020-01-01", "'quoted'", "[[1]]", "~"]))


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(st.sampled_from(_KEYS), _VALUES), min_size=1, max_size=3))
def test_random_overrides_raise_nothing_but_config_error(pairs):
    try:
        cfg = load_config(None, [f"{k}={v}" for k, v in pairs])
    except ConfigError as e:
        assert str(e)
        return
    for key, (low, high, bounds) in C.RANGES.items():          # what passes is in range
        s, n = key.split(".")
        v = getattr(getattr(cfg, s), n)
        for x in (v if isinstance(v, (list, tuple)) else [v]):
            assert x is None or (low <= x <= high and math.isfinite(x)), (key, x)
    assert dataclasses.asdict(cfg)
