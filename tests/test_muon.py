"""Issue 18.3, fewer FLOPs: the Muon optimiser for the hidden filters (optim.name=muon): which
parameters it takes, the orthogonalised step, its FLOPs, and exact resume through fit."""
import copy

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import resforge
from resforge.config import AugConfig, ConfigError, OptimConfig, TrainConfig, load_config
from resforge.data.augment import Augmenter
from resforge.data.loader import TensorBatches
from resforge.training.device import make_runtime
from resforge.training.loop import fit
from resforge.training.muon import MuonWithCompanion, matrix_view
from resforge.training.optim import build_optimizer, optimizer_flops_per_step, param_groups

MUON = dict(name="muon", lr=0.05, muon_lr=0.1, muon_momentum=0.6, schedule="constant", warmup_epochs=0)


@pytest.fixture(autouse=True, scope="module")
def _one_thread(one_thread):
    yield


def names_by_group(model, groups) -> dict[bool, list[str]]:
    """{True: names on Muon, False: names on the companion}."""
    names = {id(p): n for n, p in model.named_parameters()}
    return {m: sorted(names[id(p)] for g in groups if bool(g.get("muon")) == m for p in g["params"])
            for m in (True, False)}


def mlp() -> nn.Module:
    """No stage_names: stem and head are its first and last matrices."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))


# ---------------------------------------------------------------- which parameter goes where


def test_airbench_muon_takes_the_hidden_convs_and_nothing_frozen():
    model = resforge.create_model("airbench94")
    by = names_by_group(model, param_groups(model, 1e-3, False, muon=True))
    assert by[True] == sorted(f"layer{i}.conv{j}.weight" for i in (1, 2, 3) for j in (1, 2))
    assert "fc.weight" in by[False] and "conv1.bias" in by[False] and "layer2.bn1.bias" in by[False]
    everything = by[True] + by[False]
    assert "conv1.weight" not in everything and "layer1.bn1.weight" not in everything   # frozen stay out


def test_resnet_stem_and_head_stay_on_the_companion_and_without_muon_nothing_changes():
    model = resforge.create_model("resnet20")
    by = names_by_group(model, param_groups(model, 5e-4, True, muon=True))
    assert "conv1.weight" in by[False] and "fc.weight" in by[False]
    assert all(n.startswith("layer") and n.endswith(".weight") for n in by[True]) and len(by[True]) == 18  # 9 x 2
    assert not any(g.get("muon") for g in param_groups(model, 5e-4, True))
    net = mlp()
    by_mlp = names_by_group(net, param_groups(net, 0.0, True, muon=True))
    assert by_mlp[True] == ["2.weight"]                               # first and last matrices excluded


def test_one_step_moves_a_filter_by_an_orthogonalised_update():
    model = mlp()
    opt = build_optimizer(param_groups(model, 0.0, True, muon=True), OptimConfig(**{**MUON, "muon_momentum": 0.0}))
    x, y = torch.randn(256, 8, generator=torch.Generator().manual_seed(1)), torch.arange(256) % 4
    nn.functional.cross_entropy(model(x), y).backward()
    grad, before = model[2].weight.grad.clone(), model[2].weight.detach().clone()
    stem = model[0].weight.detach().clone()
    opt.step()
    assert not torch.equal(stem, model[0].weight)                     # the companion (SGD) stepped the stem
    update = (before - model[2].weight.detach()) / 0.1                 # = NS(gradient) (no momentum, no decay)
    s, s_grad = torch.linalg.svdvals(update), torch.linalg.svdvals(grad)
    assert s_grad.max() / s_grad.min() > 5                            # the gradient is far from orthogonal
    assert 0.5 < s.min() and s.max() < 1.5 and s.max() / s.min() < 2  # its update nearly is: all ~1


def test_conv_filters_are_views_in_channels_last_and_normalise_keeps_sqrt_out():
    conv = nn.Conv2d(8, 16, 3).to(memory_format=torch.channels_last)
    flat, order = matrix_view(conv.weight)
    assert flat.shape == (16, 72) and flat.data_ptr() == conv.weight.data_ptr() and order == (0, 2, 3, 1)
    with pytest.raises(ValueError, match="no 2-D view"):
        matrix_view(conv.weight.detach().transpose(0, 1))
    opt = MuonWithCompanion([{"params": [conv.weight], "lr": 0.0, "weight_decay": 0.0, "muon": True,
                              "momentum": 0.9, "nesterov": True}], lambda gs: None, normalize=True)
    conv.weight.grad = torch.randn_like(conv.weight)
    opt.step()                                                         # lr 0: only the rescaling acts
    assert torch.isclose(conv.weight.norm(), torch.tensor(16.0).sqrt(), rtol=1e-5)


def test_counted_newton_schulz_flops_match_flop_counter_mode():
    model = mlp()
    cfg = OptimConfig(**MUON)
    opt = build_optimizer(param_groups(model, 0.0, True, muon=True), cfg)
    nn.functional.cross_entropy(model(torch.randn(16, 8)), torch.arange(16) % 4).backward()
    with FlopCounterMode(display=False) as counter:
        opt.step()
    assert counter.get_total_flops() == opt.flops_per_step() == optimizer_flops_per_step(model, cfg) > 0
    assert optimizer_flops_per_step(model, OptimConfig()) == 0.0


# ---------------------------------------------------------------- one optimiser to the loop: resume


def tiny_fit(epochs, resume=None, keep=None, model=None, optim=None, augment=None, hw=16):
    images = torch.randint(0, 256, (64, 3, hw, hw), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    batches = TensorBatches(images.numpy(), np.arange(64) % 2, torch.device("cpu"), 16, shuffle=True, drop_last=True)
    augment = augment or Augmenter(AugConfig(flip="alternate", translate=1), (0.5,) * 3, (0.25,) * 3, 2, (hw, hw))
    torch.manual_seed(0)
    model = model or resforge.create_model("airbench94", num_classes=2, widths=(16, 32, 32))  # cheap bf16 NS
    train = TrainConfig(epochs=epochs, progress=False, lookahead_every=2, ema=0.9, restore_best=False,
                        bn_recalibrate="never", seed=3)
    return fit(model, batches, None, augment, make_runtime("cpu", "fp32", False),
               optim or OptimConfig(**{**MUON, "schedule": "onecycle", "clip_grad": 5.0, "muon_normalize": True}),
               train, checkpointer=keep, resume=resume)


def test_resume_of_a_muon_run_matches_the_uninterrupted_one_exactly():
    full = tiny_fit(3).model.state_dict()
    saved = {}
    tiny_fit(3, keep=lambda tag, m, s, r, resume=None: saved.update({s.epoch: copy.deepcopy(resume)})
             if tag == "last" else None)                              # the snapshot holds live tensors
    snap = saved[1]
    assert set(snap["optimizer"]) >= {"muon", "companion"} and snap["optimizer"]["muon"]["state"]
    resumed = tiny_fit(3, resume=snap).model.state_dict()
    for k, v in full.items():
        assert torch.equal(v, resumed[k]), k
    sgd = {}
    tiny_fit(1, optim=OptimConfig(lr=0.05), keep=lambda t, m, s, r, resume=None: sgd.update(r=resume))
    with pytest.raises(ValueError, match="not a Muon one"):
        tiny_fit(2, resume=sgd["r"])


# ---------------------------------------------------------------- configuration


@pytest.mark.parametrize("overrides, words", [
    (["optim.muon_lr=0"], "optim.muon_lr=0.0 is out of range"),
    (["optim.muon_momentum=1"], "optim.muon_momentum=1.0 is out of range"),
    (["optim.muon_ns_steps=100"], "optim.muon_ns_steps=100 is out of range"),
    (["optim.muon_companion=muon"], "optim.muon_companion='muon' is not one of sgd, adam, adamw"),
])
def test_bad_muon_values_are_one_clear_sentence(overrides, words):
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        load_config("digits", overrides)


def test_muon_without_any_hidden_filter_says_so():
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2))               # stem + head only
    with pytest.raises(ValueError, match="no hidden filter"):
        build_optimizer(param_groups(model, 0.0, True, muon=True), OptimConfig(**MUON))


def test_lr_find_refuses_muon_whose_filters_do_not_follow_optim_lr():
    from resforge.finetune.lrfind import lr_range_test
    with pytest.raises(ValueError, match="run it with optim.name=sgd"):
        lr_range_test(mlp(), None, None, None, OptimConfig(**MUON), None)
