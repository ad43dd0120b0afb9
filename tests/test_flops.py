"""The FLOP counter against counts done by hand."""
import torch
from torch import nn

from resforge.flops import count_flops, training_flops
from resforge.models import create_model


def test_one_conv_layer_counted_by_hand():
    # 3 -> 8 channels, 3x3, 16x16 output: 16*16*8 outputs, each 3*3*3 multiply-adds, 2 FLOPs each
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False))
    macs = 16 * 16 * 8 * 3 * 3 * 3
    f = count_flops(net, (3, 16, 16))
    assert f["forward"] == 2 * macs == f["inference"]
    assert f["backward"] == 2 * macs          # the weight's gradient only: the input needs none
    assert f["train"] == 4 * macs


def test_two_layers_backward_adds_the_input_gradient():
    # conv(3->8) then linear(8*4*4 -> 5): the linear layer's input gradient is counted, the first conv's is not
    net = nn.Sequential(nn.Conv2d(3, 8, 3, stride=4, padding=1, bias=False), nn.Flatten(), nn.Linear(128, 5))
    conv, lin = 4 * 4 * 8 * 27, 128 * 5
    f = count_flops(net, (3, 16, 16))
    assert f["forward"] == 2 * (conv + lin)
    assert f["backward"] == 2 * conv + 2 * 2 * lin       # d/dW of the conv; d/dW and d/dx of the linear layer
    assert training_flops(f, 10, 4) == 10 * f["train"] + 4 * f["inference"]


def test_resnet20_matches_the_published_count_and_leaves_the_model_untouched():
    net = create_model("resnet20", num_classes=10)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    f = count_flops(net, (3, 32, 32))
    assert abs(f["forward"] / 2 - 40.8e6) / 40.8e6 < 0.01      # He et al.'s ResNet-20: 0.041 GMACs
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(p.grad is None for p in net.parameters())
