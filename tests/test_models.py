"""Model registry, architectures and the model contract (docs/DESIGN.md)."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resforge.models import create_model, list_models, model_info, register_model

FIXTURES = Path(__file__).parent / "fixtures"
IMAGENET = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152"]
CIFAR = ["resnet20", "resnet32", "resnet44", "resnet56", "resnet110"]
PLAIN = ["plain20", "plain32", "plain44", "plain56", "plain110"]
FASTNETS = ["airbench94", "resnet9"]  # models/fastnet.py, tested in test_fastnet.py
# He et al. 2016 / akamaster report 0.27M, 0.46M, 0.66M, 0.85M, 1.7M (option A, 10 classes)
CIFAR_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586,
                "resnet56": 853_018, "resnet110": 1_727_962}


pytestmark = pytest.mark.usefixtures("one_thread")   # tiny batches: see conftest


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def torchvision_fixture(name: str) -> dict:
    return json.loads((FIXTURES / f"torchvision_{name}_keys.json").read_text())


def test_registry_lists_every_architecture():
    assert set(list_models()) == set(IMAGENET + CIFAR + PLAIN + FASTNETS)
    assert list_models().index("resnet56") < list_models().index("resnet110")  # ordered by depth


def test_imagenet_param_counts_match_torchvision():
    counts = torchvision_fixture("resnet18")["param_counts"]  # measured on real torchvision
    assert counts == {"resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
                      "resnet101": 44_549_160, "resnet152": 60_192_808}
    for name in IMAGENET:
        assert model_info(name)["params"] == counts[name], name
    assert n_params(create_model("resnet18")) == counts["resnet18"]


def test_cifar_param_counts():
    for name, count in CIFAR_PARAMS.items():
        assert n_params(create_model(name)) == count, name
        assert model_info(name.replace("resnet", "plain"))["params"] == count


def test_model_info():
    info = model_info("resnet50")
    assert info["layout"] == "imagenet" and info["input_size"] == (3, 224, 224)
    assert info["num_classes"] == 1000 and info["num_features"] == 2048 and info["family"] == "resnet"
    info = model_info("plain56")
    assert info["layout"] == "cifar" and info["input_size"] == (3, 32, 32)
    assert info["num_classes"] == 10 and info["family"] == "plain"


def test_unknown_model_suggests_a_name():
    with pytest.raises(ValueError, match="Did you mean 'resnet18'"):
        create_model("resnt18")
    with pytest.raises(ValueError, match="unknown model"):
        model_info("vgg16")


def test_register_twice_is_an_error():
    from resforge.models.resnet import resnet18
    with pytest.raises(ValueError, match="already registered"):
        register_model(resnet18)


@pytest.mark.parametrize("name", IMAGENET + CIFAR + PLAIN)
def test_forward_nchw_and_channels_last(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=7).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(x)
        feats = model.forward_features(x)
        pooled = model.forward_head(feats, pre_logits=True)
        model_cl = model.to(memory_format=torch.channels_last)
        logits_cl = model_cl(x.to(memory_format=torch.channels_last))
    assert logits.shape == (2, 7) and torch.isfinite(logits).all()
    assert feats.shape[:2] == (2, model.num_features) and feats.dim() == 4
    assert pooled.shape == (2, model.num_features)
    # random-init deep nets have large logits (eval BN is ~identity): compare relative to scale
    scale = logits.abs().max().item()
    torch.testing.assert_close(logits_cl, logits, rtol=1e-3, atol=1e-4 * scale)


def test_1_channel_models():
    x = torch.randn(2, 1, 28, 28)  # e.g. MNIST-sized grey images
    for name in ["resnet18", "resnet20", "plain20"]:
        model = create_model(name, num_classes=2, in_chans=1).eval()
        assert model(x).shape == (2, 2)
        assert model.default_cfg["input_size"][0] == 1 and len(model.default_cfg["mean"]) == 1


def test_any_input_size():
    with torch.no_grad():
        assert create_model("resnet18").eval()(torch.randn(1, 3, 48, 40)).shape == (1, 1000)
        assert create_model("resnet20").eval()(torch.randn(1, 3, 40, 56)).shape == (1, 10)


def test_default_cfg_and_stage_names():
    m = create_model("resnet18")
    assert m.stage_names == ["stem", "layer1", "layer2", "layer3", "layer4", "fc"]
    cfg = m.default_cfg
    assert cfg["arch"] == "resnet18" and cfg["layout"] == "imagenet"
    assert cfg["input_size"] == (3, 224, 224)
    assert cfg["mean"] == (0.485, 0.456, 0.406) and cfg["std"] == (0.229, 0.224, 0.225)
    c = create_model("resnet20")
    assert c.stage_names == ["stem", "layer1", "layer2", "layer3", "fc"]
    assert c.default_cfg["input_size"] == (3, 32, 32) and c.default_cfg["layout"] == "cifar"
    assert c.num_features == 64 and m.num_features == 512
    assert create_model("resnet50").num_features == 2048


@pytest.mark.parametrize("name", ["resnet50", "resnet20"])
def test_stages_partition_the_parameters(name):
    model = create_model(name)
    stem = model.get_stage("stem")
    assert list(stem) == [model.conv1, model.bn1]
    assert model.get_stage("fc") is model.fc
    seen = [id(p) for s in model.stage_names for p in model.get_stage(s).parameters()]
    assert sorted(seen) == sorted(id(p) for p in model.parameters())  # each exactly once
    assert set(model.state_dict()) == set(create_model(name).state_dict())  # get_stage adds no keys
    with pytest.raises(KeyError, match="stages are"):
        model.get_stage("layer9")


def test_reset_classifier():
    model = create_model("resnet20")
    model.reset_classifier(3)
    assert model.fc.out_features == 3 and model.default_cfg["num_classes"] == 3
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 3)
    model.reset_classifier(0)  # no classifier: forward returns pooled features
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 64)


def test_plain_twins_differ_only_by_shortcut():
    torch.manual_seed(0)
    for res, plain in zip(CIFAR, PLAIN):
        r, p = create_model(res), create_model(plain)
        assert [(k, v.shape) for k, v in r.state_dict().items()] == \
               [(k, v.shape) for k, v in p.state_dict().items()]
    r, p = create_model("resnet20").eval(), create_model("plain20").eval()
    p.load_state_dict(r.state_dict(), strict=True)  # same weights ...
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert not torch.allclose(r(x), p(x))  # ... different function: the shortcuts
    assert all(not b.residual for b in p.modules() if hasattr(b, "residual"))


def test_option_b_adds_projection_keys():
    a = set(create_model("resnet20").state_dict())
    b = set(create_model("resnet20", shortcut="B").state_dict())
    assert a < b
    extra = {k.rsplit(".", 1)[0] for k in b - a}
    assert extra == {f"layer{i}.0.downsample.{j}" for i in (2, 3) for j in (0, 1)}
    with pytest.raises(ValueError, match="plain"):
        create_model("plain20", shortcut="B")
    with pytest.raises(ValueError, match="shortcut"):
        create_model("resnet20", shortcut="C")


def test_small_input_stem_keeps_keys():
    fixture = torchvision_fixture("resnet18")["keys"]
    small = create_model("resnet18", small_input=True, num_classes=10)
    shapes = {k: list(v.shape) for k, v in small.state_dict().items()}
    assert set(shapes) == set(fixture)
    assert shapes["conv1.weight"] == [64, 3, 3, 3]
    assert [k for k in shapes if shapes[k] != fixture[k]] == ["conv1.weight", "fc.weight", "fc.bias"]
    assert small.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)
    assert small.default_cfg["input_size"] == (3, 32, 32)


def test_zero_init_residual_and_drop_rate():
    m = create_model("resnet50", zero_init_residual=True)
    assert m.layer1[0].bn3.weight.abs().sum() == 0 and m.layer1[0].bn2.weight.abs().sum() > 0
    m = create_model("resnet20", zero_init_residual=True)
    assert m.layer3[2].bn2.weight.abs().sum() == 0
    assert create_model("plain20", zero_init_residual=True).layer1[0].bn2.weight.abs().sum() > 0
    d = create_model("resnet20", drop_rate=0.5)
    assert set(d.state_dict()) == set(create_model("resnet20").state_dict())  # dropout: no params
    x = torch.randn(2, 3, 32, 32)
    d.eval()
    with torch.no_grad():
        assert torch.equal(d(x), d(x))  # dropout off in eval


def test_kaiming_init_scale():
    conv = create_model("resnet20").layer2[0].conv1  # fan_out = 32 * 9
    assert abs(conv.weight.std().item() - (2 / (32 * 9)) ** 0.5) < 0.01


def test_headless_model_returns_features():
    model = create_model("resnet50", num_classes=0).eval()
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 2048)
    assert not any(k.startswith("fc.") for k in model.state_dict())
