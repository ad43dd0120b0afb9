"""Config: recipes, overrides, type checks and suggestions for unknown keys."""
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
