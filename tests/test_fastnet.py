"""The CIFAR speed recipe's pieces (issue #3): whitening init, the fast nets and their contract,
optimiser hints, lookahead, time budget, and the recipe run end to end through resforge.train."""
import json
import math

import numpy as np
import pytest
import torch
from torch import nn

import resforge
from resforge.config import load_config
from resforge.models import create_model, model_info
from resforge.models.fastnet import extract_patches, normalise_u8, whitening_filters
from resforge.training.lookahead import Lookahead
from resforge.training.optim import param_groups

FAST = ["airbench94", "resnet9"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()      # tiny inputs: one thread is fastest and shares the cores well
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def correlated_images(n=64, c=3, hw=12, seed=0) -> torch.Tensor:
    """Smooth, channel-correlated images: neighbouring pixels and channels covary strongly,
    so the patch covariance is far from the identity."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, 1, hw + 2, hw + 2, generator=g)
    smooth = nn.functional.avg_pool2d(base, 3, stride=1)                   # (n, 1, hw, hw)
    return smooth * torch.tensor([1.0, 0.8, 0.5]).view(1, 3, 1, 1)[:, :c] + 0.1 * torch.randn(n, c, hw, hw, generator=g)


# ---------------------------------------------------------------- whitening


def test_extract_patches_shapes_and_values():
    x = torch.arange(2 * 3 * 4 * 5, dtype=torch.float32).view(2, 3, 4, 5)
    p = extract_patches(x, 2, 2)
    assert p.shape == (2 * 3 * 4, 3, 2, 2)
    # patch order: image, row, column
    assert torch.equal(p[0], x[0, :, 0:2, 0:2]) and torch.equal(p[5], x[0, :, 1:3, 1:3])
    assert torch.equal(p[12], x[1, :, 0:2, 0:2])


def test_whitening_filters_shapes_and_sign_pairs():
    f = whitening_filters(extract_patches(correlated_images(), 2, 2))
    assert f.shape == (24, 3, 2, 2) and f.dtype == torch.float32
    torch.testing.assert_close(f[12:], -f[:12])


def test_whitened_patch_covariance_is_identity():
    patches = extract_patches(correlated_images(), 2, 2)                   # (N, 3, 2, 2)
    flat = patches.reshape(len(patches), -1).double()
    cov = flat.T @ flat / len(flat)
    assert (cov - torch.eye(12, dtype=torch.float64)).abs().max() > 0.5    # far from white before
    w = whitening_filters(patches, eps=1e-9)[:12].reshape(12, -1).double()
    white = flat @ w.T                                                      # conv output per patch
    torch.testing.assert_close(white.T @ white / len(white), torch.eye(12, dtype=torch.float64),
                               atol=1e-4, rtol=0)
    evals = torch.linalg.eigvalsh(cov).flip(0)                              # largest first
    torch.testing.assert_close((w @ cov @ w.T).diagonal(), torch.ones(12, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.all(w.norm(dim=1)[:-1] <= w.norm(dim=1)[1:] + 1e-9)        # 1/sqrt(l) grows as l falls
    assert evals[0] > evals[-1] > 0


def test_eps_damps_small_eigenvalues():
    patches = extract_patches(correlated_images(), 2, 2)
    sharp, damped = whitening_filters(patches, 1e-9), whitening_filters(patches, 1.0)
    assert damped.abs().max() < sharp.abs().max()


def test_init_from_data_sets_the_frozen_whitening_conv():
    torch.manual_seed(0)
    model = create_model("airbench94")
    assert not model.conv1.weight.requires_grad
    imgs = (torch.rand(40, 3, 32, 32) * 255).to(torch.uint8)
    mean, std = [0.5] * 3, [0.29] * 3
    model.init_from_data(imgs, mean, std)
    x = normalise_u8(imgs, mean, std)
    expected = whitening_filters(extract_patches(x, 2, 2), model.whiten_eps)
    torch.testing.assert_close(model.conv1.weight, expected)
    assert model.conv1.bias.abs().sum() == 0
    out = nn.functional.conv2d(x, model.conv1.weight[:12]).permute(1, 0, 2, 3).reshape(12, -1)
    cov = out @ out.T / out.shape[1]                                         # ~diag(l / (l + eps))
    assert (cov.diagonal() - 1).abs().max() < 0.05 and (cov - torch.diag(cov.diagonal())).abs().max() < 0.02


# ---------------------------------------------------------------- networks and contract


@pytest.mark.parametrize("name", FAST)
def test_forward_shapes_any_classes_and_channels(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits, feats = model(x), model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        cl = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert logits.shape == (2, 7) and feats.shape[:2] == (2, model.num_features)
    assert pooled.shape == (2, model.num_features)
    torch.testing.assert_close(cl, logits, rtol=1e-3, atol=1e-4 * logits.abs().max().item())
    grey = create_model(name, num_classes=2, in_chans=1).eval()
    with torch.no_grad():
        assert grey(torch.randn(2, 1, 40, 36)).shape == (2, 2)              # other sizes too
    assert grey.default_cfg["input_size"] == (1, 32, 32) and len(grey.default_cfg["mean"]) == 1


@pytest.mark.parametrize("name", FAST)
def test_contract(name):
    model = create_model(name)
    cfg = model.default_cfg
    assert cfg["arch"] == name and cfg["layout"] == "cifar" and cfg["num_classes"] == 10
    assert set(cfg) >= {"arch", "family", "layout", "input_size", "mean", "std", "num_classes"}
    assert model.stage_names == ["stem", "layer1", "layer2", "layer3", "fc"]
    seen = [id(p) for s in model.stage_names for p in model.get_stage(s).parameters()]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())        # stages partition params
    assert set(model.state_dict()) == set(create_model(name).state_dict())
    with pytest.raises(KeyError, match="stages are"):
        model.get_stage("layer4")
    model.reset_classifier(3)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3) and model.default_cfg["num_classes"] == 3
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, model.num_features)
    info = model_info(name)
    assert info["params"] == sum(p.numel() for p in create_model(name).parameters())


def test_airbench94_shape_and_dirac_init():
    model = create_model("airbench94")
    assert model_info("airbench94")["params"] == 1_972_792
    assert model.conv1.weight.shape == (24, 3, 2, 2) and model.fc.bias is None
    assert model.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 256, 3, 3)
    x = torch.randn(2, 256, 5, 5)
    with torch.no_grad():                                                     # 256 -> 256: all identity
        torch.testing.assert_close(model.layer3.conv2(x), x)
        y = model.layer1.conv1(torch.randn(2, 24, 5, 5))
    first = model.layer1.conv1.weight[:24]
    assert torch.equal(first, nn.init.dirac_(torch.empty_like(first)))      # first 24 of 64 filters
    assert y.shape == (2, 64, 5, 5)
    assert all(not m.weight.requires_grad for m in model.modules() if isinstance(m, nn.BatchNorm2d))


def test_head_scale():
    torch.manual_seed(0)
    model = create_model("airbench94").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        pooled = model.forward_head(model.forward_features(x), pre_logits=True)
        torch.testing.assert_close(model(x), model.fc(pooled) / 9)


# ---------------------------------------------------------------- optimiser hints


def test_param_group_hints_freeze_bn_scales_and_speed_up_bn_biases():
    model = create_model("airbench94")
    groups = param_groups(model, 1e-3, no_decay_norm_bias=False)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {names[id(p)]: g for g in groups for p in g["params"]}
    assert "conv1.weight" not in by_name and "layer1.bn1.weight" not in by_name
    assert by_name["layer2.bn2.bias"]["lr_scale"] == 64 and by_name["layer2.bn2.bias"]["weight_decay"] == 1e-3 / 64
    assert by_name["layer2.conv1.weight"]["lr_scale"] == 1 and by_name["layer2.conv1.weight"]["weight_decay"] == 1e-3
    assert by_name["conv1.bias"]["lr_scale"] == 1                           # whitening bias trains
    model.layer1.bn1.weight.requires_grad_(True)                             # a hint freezes regardless
    assert "layer1.bn1.weight" not in {names[id(p)] for g in param_groups(model, 1e-3, False) for p in g["params"]}


def test_param_groups_without_hints_are_unchanged():
    model = create_model("resnet20")
    groups = param_groups(model, 5e-4, True)
    assert sorted((g["weight_decay"], g["lr_scale"]) for g in groups) == [(0.0, 1.0), (5e-4, 1.0)]
    explicit = param_groups(model, 5e-4, True, lr_scale={"fc": 10.0}, hints={"layer3": {"lr_scale": 0.5},
                                                                              "fc.bias": {"frozen": True}})
    table = {(g["weight_decay"], g["lr_scale"]): len(g["params"]) for g in explicit}
    assert table[(5e-4, 10.0)] == 1 and (0.0, 10.0) not in table             # fc.weight only
    assert (5e-4, 0.5) in table and (0.0, 0.5) in table


# ---------------------------------------------------------------- lookahead


def test_lookahead_math():
    net = nn.Linear(2, 1, bias=False)
    nn.init.zeros_(net.weight)
    la = Lookahead(net, every=2, alpha=0.5, total_steps=4)
    for step in range(1, 5):
        with torch.no_grad():
            net.weight += 1.0                                                 # a fake optimiser step
        la.update(net, step)
    # replay by hand: steps 2 and 4 sync, with decays 0.5 * (2/4)^3 and 0.5 * (4/4)^3
    w, s = torch.zeros(1, 2), torch.zeros(1, 2)
    for step in range(1, 5):
        w = w + 1
        if step % 2 == 0:
            d = 0.5 * (step / 4) ** 3
            s = d * s + (1 - d) * w
            w = s.clone()
    torch.testing.assert_close(net.weight.detach(), w)
    torch.testing.assert_close(la.slow["weight"], s)
    assert math.isclose(la.decay(4), 0.5) and la.decay(0) == 0


def test_lookahead_hook_state_and_finish():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    la = Lookahead(net, every=3, alpha=1.0, total_steps=6)
    handle = la.attach(opt, net)
    for _ in range(7):
        opt.zero_grad()
        net(torch.randn(8, 3)).pow(2).mean().backward()
        opt.step()
    assert la.steps == 7
    assert "1.running_mean" in la.slow and "1.num_batches_tracked" not in la.slow   # float buffers only
    state = la.state_dict()
    other = Lookahead(net, every=3, alpha=1.0, total_steps=6)
    other.load_state_dict(state)
    assert other.steps == 7 and torch.equal(other.slow["0.weight"], la.slow["0.weight"])
    la.finish(net)
    assert torch.equal(net[0].weight, la.slow["0.weight"])
    handle.remove()


# ---------------------------------------------------------------- end to end


def _npz(tmp_path, n=128, c=3, classes=4, seed=0):
    """A user's own 32x32 data set: per-class colour blobs, train + test."""
    rng = np.random.default_rng(seed)
    def part(m):
        y = rng.integers(0, classes, m)
        x = rng.integers(0, 60, (m, 32, 32, c), dtype=np.uint8)
        x[..., 0] += (y * 50).astype(np.uint8)[:, None, None]
        return x, y
    (xtr, ytr), (xte, yte) = part(n), part(32)
    path = tmp_path / "mine.npz"
    np.savez(path, train_images=xtr, train_labels=ytr, test_images=xte, test_labels=yte)
    return path


def test_fast_recipe_trains_through_resforge_train(tmp_path):
    data = _npz(tmp_path)
    run = resforge.train("cifar10-fast", [f"data.source={data}", "train.epochs=1", "train.batch_size=32",
                                          "optim.lr=0.1", "train.progress=false", f"train.project={tmp_path}",
                                          f"data.cache_dir={tmp_path / 'cache'}", "train.lookahead_every=2"])
    assert run.results["test"]["tta"] is True and run.results["test"]["n"] == 32
    assert run.config.model.name == "airbench94" and run.config.data.val_fraction == 0
    w = run.model.conv1.weight
    assert not w.requires_grad and torch.allclose(w[12:], -w[:12])            # whitening was set from data
    report = json.loads((run.dir / "report.json").read_text())
    assert report["data"]["splits"]["val"] == 0 and report["epochs_run"] == 1
    snap = torch.load(run.dir / "weights" / "last.state.pt", weights_only=True)
    assert snap["lookahead"]["steps"] == 4                                    # 128 // 32 steps
    model, meta = resforge.checkpoint.load_for_inference(run.dir)
    assert torch.equal(model.conv1.weight, w.cpu())                          # whitening is in the checkpoint


def test_time_budget_stops_at_an_epoch_boundary(tmp_path):
    run = resforge.train("digits", ["data.image_size=8", "train.epochs=50", "train.batch_size=256",
                                    "train.max_seconds=0.001", "train.progress=false",
                                    f"train.project={tmp_path}", f"data.cache_dir={tmp_path / 'cache'}"])
    report = json.loads((run.dir / "report.json").read_text())
    assert report["epochs_run"] == 1


def test_recipes_resolve():
    for name in ("cifar10-fast", "cifar10-fast-short", "cifar10-resnet20", "cifar10-resnet56", "cifar10-resnet18"):
        cfg = load_config(name)
        assert cfg.data.source == "cifar10" and cfg.eval.tta
    fast = load_config("cifar10-fast")
    assert fast.train.lookahead_every == 5 and fast.aug.flip == "alternate" and fast.optim.label_smoothing == 0.2
    assert load_config("cifar10-resnet18").model.small_input is True
