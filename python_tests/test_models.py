"""slimkern.models: every model runs every kind of switch; [1.0] of a wide net is a real sub-net."""
import warnings

import pytest
import torch

import slimkern as sk
from slimkern import models
from slimkern.evaluate import closed_form_cost

SWITCHES = ["[1.0]x", "[0.5]x", "[0.5, 0.5]x", "[0.5, 0.25, 0.25]x"]


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "resnet20", "resnet18"])
def test_models_run_all_switches_packed_equals_alone(name):
    torch.manual_seed(0)
    net = models.build(name, num_classes=7, in_channels=2, max_width=1.25, width_mult=0.25)
    net.eval()
    sws = [sk.Switch.parse(s) for s in SWITCHES + ["[1.25]x"]]
    x = torch.randn(2, 2, 8, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fresh BN rows (mean 0, var 1) warn in eval mode
        packed = sk.forward_switches(net, x, sws)
        for sw, out in zip(sws, packed):
            assert out.shape == (2, 7)
            with sk.use_switch(net, sw):
                alone = net(x)
            torch.testing.assert_close(out, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["mobilenet_v1", "mobilenet_v2", "resnet20"])
def test_full_switch_uses_every_parameter_of_a_1x_net(name):
    net = models.build(name, num_classes=10, in_channels=3, max_width=1.0, width_mult=0.25)
    _, params = closed_form_cost(net, sk.Switch([1.0]), (1, 3, 8, 8))
    assert sum(params) == sum(p.numel() for p in net.parameters())


def test_resnet20_and_mobilenet_v1_channel_counts():
    r = models.resnet20(num_classes=10)
    assert [b.conv2.out_channels for b in r.layers] == [16] * 3 + [32] * 3 + [64] * 3
    assert r.classifier.in_features == 64
    m = models.mobilenet_v1(num_classes=10, width_mult=0.5, max_width=1.2)
    assert m.features[0].stride == (1, 1)  # the CIFAR variant
    assert m.num_features == 512 and m.classifier.in_full == round(1.2 * 512)
    # resnet20 at 1.0x: 16-32-64 with 1x1-conv shortcuts (option B)
    assert sum(p.numel() for p in r.parameters()) == 269722 + 16 * 32 + 32 * 64 + 2 * (32 + 64)


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model"):
        models.build("vgg", 10)
    with pytest.raises(ValueError, match="max_width"):
        models.mobilenet_v1(10, max_width=0.5)
    with pytest.raises(ValueError, match="width_mult"):
        models.resnet20(10, width_mult=0)
