"""Issue 18.3, fewer FLOPs: progressive resizing (aug.resize_start): the size per epoch, batches
resized on the device, evaluation at full size, FLOPs counted at each size, clear refusals."""
import json

import numpy as np
import pytest
import torch
from torch import nn

import resforge
from resforge.config import AugConfig, ConfigError, OptimConfig, TrainConfig, load_config
from resforge.data.augment import Augmenter, progressive_sizes
from resforge.data.loader import TensorBatches
from resforge.flops import count_flops, run_flops
from resforge.training.device import make_runtime
from resforge.training.loop import fit


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


# ---------------------------------------------------------------- progressive resizing


def test_progressive_sizes_ramp_then_stay_full():
    assert progressive_sizes((32, 32), 16, 0.5, 4) == [(16, 16), (24, 24), (32, 32), (32, 32)]
    assert progressive_sizes((32, 32), 16, 0.5, 10)[:6] == [(16, 16), (19, 19), (22, 22), (26, 26), (29, 29),
                                                            (32, 32)]
    assert progressive_sizes((32, 16), 8, 1.0, 2) == [(8, 4), (20, 10)]   # the shorter side in proportion
    with pytest.raises(ValueError, match="smaller than the images"):
        progressive_sizes((32, 32), 32, 0.5, 4)


def test_training_batches_shrink_per_epoch_while_evaluation_stays_full_size():
    cfg = AugConfig(flip="alternate", translate=1, resize_start=8, resize_ramp=0.5)
    augment = Augmenter(cfg, (0.5,) * 3, (0.25,) * 3, 2, (16, 16), epochs=4)
    model = resforge.create_model("resnet20", num_classes=2)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append((m.training, tuple(args[0].shape[-2:]))))
    images = torch.randint(0, 256, (32, 3, 16, 16), dtype=torch.uint8)
    batches = TensorBatches(images.numpy(), np.arange(32) % 2, torch.device("cpu"), 16, shuffle=True, drop_last=True)
    fit(model, batches, batches, augment, make_runtime("cpu", "fp32", False), OptimConfig(lr=0.01),
        TrainConfig(epochs=4, progress=False, bn_recalibrate="never"))
    train_sizes = [hw for training, hw in seen if training]
    assert train_sizes == [(8, 8)] * 2 + [(12, 12)] * 2 + [(16, 16)] * 4    # 2 steps per epoch
    assert {hw for training, hw in seen if not training} == {(16, 16)}       # validation: full size
    assert augment.eval_view(images[:2]).shape[-2:] == (16, 16)


def test_a_network_that_cannot_take_the_small_size_is_refused_in_one_sentence():
    augment = Augmenter(AugConfig(resize_start=4), (0.5,) * 3, (0.25,) * 3, 2, (32, 32), epochs=2)
    with pytest.raises(ValueError, match=r"cannot take 4x4 inputs .*raise aug.resize_start"):
        augment.check_model(resforge.create_model("airbench94", num_classes=2), 3, "cpu")
    flat = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, 2))          # no global pooling
    with pytest.raises(ValueError, match="cannot take 4x4"):
        augment.check_model(flat, 3, "cpu")
    with pytest.raises(ValueError, match="resforge train. only"):
        Augmenter(AugConfig(resize_start=4), (0.5,) * 3, (0.25,) * 3, 2, (32, 32))


def test_run_flops_count_each_epoch_at_its_size():
    model = resforge.create_model("resnet20", num_classes=2)
    r = run_flops(model, 3, [(8, 8), (16, 16), (16, 16)], 100, steps=30, optimizer_flops_per_step=1e6)
    f8, f16 = (count_flops(model, (3, s, s))["train"] for s in (8, 16))
    assert r["network"] == 100 * (f8 + 2 * f16) and r["train"] == r["network"] + 3e7
    assert r["epochs_at"] == {"8x8": 1, "16x16": 2} and 3.5 < f16 / f8 < 4.5   # FLOPs ~ pixels


def test_train_with_both_records_sizes_and_flops_in_the_report(tmp_path):
    run = resforge.train("digits", ["data.image_size=8", "aug.resize_start=4", "optim.name=muon", "train.epochs=2",
                                    "train.ema=0.9",   # an EMA copy is not what the optimiser steps
                                    "train.progress=false", f"train.project={tmp_path}", "eval.splits=[test]"])
    flops = json.loads((run.dir / "report.json").read_text())["training_flops"]
    assert flops["progressive_resize"]["sizes"] == ["4x4", "8x8"] and flops["optimizer"] > 0
    assert flops["train"] == flops["network"] + flops["optimizer"]
    assert run.config.optim.name == "muon" and run.results["test"]["top1"] > 0.2


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, words", [
    (["aug.resize_start=0"], "aug.resize_start=0 is out of range"),
    (["aug.resize_ramp=0"], "aug.resize_ramp=0.0 is out of range"),
    (["data.image_size=16", "aug.resize_start=16"], "must be smaller than the images"),
    (["aug.resize_start=8", "train.fit_budget=true", "train.max_seconds=60"], "cannot size a schedule"),
])
def test_bad_resize_values_are_one_clear_sentence(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config("digits", overrides)



def test_bench_counts_the_full_recipes_flops_without_training():
    import importlib.util
    from pathlib import Path
    path = Path(__file__).parents[1] / "bench" / "fewer_flops.py"
    spec = importlib.util.spec_from_file_location("fewer_flops", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    recipe = bench.planned_flops("cifar10-fast", [])
    per_image = count_flops(resforge.create_model("airbench94"), (3, 32, 32))["train"]
    assert recipe["train"] == 10 * 48 * 1024 * per_image                  # 48 full batches of 1024 per epoch
    both = bench.planned_flops("cifar10-fast", ["optim.name=muon", "aug.resize_start=16"])
    assert 0 < both["optimizer"] < 0.03 * both["train"] and both["train"] < 0.80 * recipe["train"]
