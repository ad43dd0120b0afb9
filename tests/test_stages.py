"""Stage outputs (the model contract's part for dense heads): every registry network's
feature_info matches what forward_intermediates returns, and the classifier path is unchanged."""
import pytest
import torch

from resforge.models import create_model, list_models


def _input(name):
    return torch.randn(2, 3, 64 if name in ("resnet18", "resnet50") else 32, 64 if name in ("resnet18", "resnet50") else 32)


def test_every_registry_network_declares_its_stages():
    for name in list_models():
        net = create_model(name, num_classes=3)
        assert len(net.feature_info) >= 3 and net.feature_info[-1]["num_chs"] == net.num_features, name
        assert all(hasattr(net, f["module"]) for f in net.feature_info), name


# one network of every class that builds stages: CIFAR residual / plain, ImageNet basic / bottleneck, the fast nets
@pytest.mark.parametrize("name", ["resnet20", "plain20", "resnet18", "resnet50", "airbench94", "resnet9"])
def test_feature_info_describes_forward_intermediates(name):
    torch.manual_seed(0)
    net = create_model(name, num_classes=7).eval()
    x = _input(name)
    with torch.no_grad():
        outs = net.forward_intermediates(x)
        assert len(outs) == len(net.feature_info) >= 3
        for f, o in zip(net.feature_info, outs):
            assert o.shape[:2] == (2, f["num_chs"])
            assert x.shape[-1] // f["reduction"] - 1 <= o.shape[-1] <= x.shape[-1] // f["reduction"], (f, o.shape)
        assert torch.equal(outs[-1], net.forward_features(x))
        assert torch.equal(net(x), net.forward_head(outs[-1]))
        assert net.feature_info[-1]["num_chs"] == net.num_features
        # some stages only, and nothing past the deepest one asked for
        names = [f["module"] for f in net.feature_info]
        some = net.forward_intermediates(x, stages=names[:2])
        assert [o.shape for o in some] == [o.shape for o in outs[:2]]


def test_imagenet_layout_gives_c2_to_c5_and_unknown_stages_are_named():
    net = create_model("resnet50", num_classes=10)
    assert [(f["module"], f["num_chs"], f["reduction"]) for f in net.feature_info] == [
        ("layer1", 256, 4), ("layer2", 512, 8), ("layer3", 1024, 16), ("layer4", 2048, 32)]
    small = create_model("resnet18", num_classes=10, small_input=True)
    assert [f["reduction"] for f in small.feature_info] == [1, 2, 4, 8]
    with pytest.raises(ValueError, match=r"'layer5'.*are \['layer1', 'layer2', 'layer3', 'layer4'\]"):
        net.forward_intermediates(torch.zeros(1, 3, 32, 32), stages=["layer5"])
