import pytest
import torch
import torch.nn as nn

import slimkern as sk
from small_slim_nets import TinyResNet, train_stats

N, H = 2, 8
F32 = 4


def hand_branch(c, classes=10):
    """Closed forms written out for TinyResNet on a c-channel branch, input [2, 3, 8, 8]."""
    stem = N * c * H * H * 3 * 9
    conv = N * c * H * H * c * 9
    dw = N * c * 4 * 4 * 9
    fc = N * classes * c
    macs = stem + conv + dw + fc
    params = c * 27 + 2 * c + c * c * 9 + 2 * c + c * 9 + 2 * c + classes * c
    return macs, params


@pytest.mark.parametrize("sw, widths", [("[1.0]x", [8]), ("[0.5, 0.25, 0.25]x", [4, 2, 2]),
                                        ("[0.25:0.75]x", [4]), ("[0.5]x", [4])])
def test_profile_matches_hand_counts(sw, widths):
    net = TinyResNet()
    prof = sk.profile(net, sw, (N, 3, H, H))
    assert [b.macs for b in prof.branches] == [hand_branch(c)[0] for c in widths]
    assert [b.params for b in prof.branches] == [hand_branch(c)[1] for c in widths]
    assert prof.fusion_params == 10
    assert prof.params == sum(hand_branch(c)[1] for c in widths) + 10
    assert prof.macs == sum(hand_branch(c)[0] for c in widths)
    assert prof.max_device_macs == hand_branch(max(widths))[0]
    assert prof.branches[0].output_shape == (N, 10)


def test_paradis_total_macs_below_full_width():
    net = TinyResNet()
    full = sk.profile(net, "[1.0]x", (N, 3, H, H))
    par = sk.profile(net, "[4x0.25]x", (N, 3, H, H))
    # the dense conv costs c^2: four quarter branches do 1/4 of its work in total
    assert par.macs < full.macs
    assert par.max_device_macs == hand_branch(2)[0]
    assert par.params < full.params


def test_peak_activation_by_hand():
    net = TinyResNet()
    prof = sk.profile(net, "[0.5, 0.5]x", (N, 3, H, H))
    t = N * 4 * H * H * F32  # one [2, 4, 8, 8] float tensor
    # the peak is during bn1: relu output (kept for the add) + conv output + bn1 output
    assert prof.branches[0].peak_activation_bytes == 3 * t
    assert prof.branches[0].peak_activation_elements == 3 * t // F32
    assert prof.peak_activation_bytes == 6 * t
    assert prof.max_device_peak_activation_bytes == 3 * t


def test_inplace_relu_shares_storage():
    m = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.ReLU(inplace=True), nn.Conv2d(8, 1, 1, bias=False))
    a = sk.profile(m, None, (1, 3, 4, 4)).branches[0].peak_activation_bytes
    m[1].inplace = False
    b = sk.profile(m, None, (1, 3, 4, 4)).branches[0].peak_activation_bytes
    img, hid = 3 * 16 * F32, 8 * 16 * F32
    assert a == img + hid  # peak while the first conv runs; ReLU writes into its output
    assert b == 2 * hid  # ReLU needs a second buffer while the conv output is alive


def test_profile_params_match_export():
    net = train_stats(TinyResNet(), ["[0.5, 0.25, 0.25]x", "[1.0]x"])
    for sw in ["[0.5, 0.25, 0.25]x", "[1.0]x"]:
        prof = sk.profile(net, sw, (1, 3, H, H))
        dep = sk.export(net, sw)
        assert [b.params for b in prof.branches] == [sum(p.numel() for p in b.parameters()) for b in dep.branches]
        assert prof.params == sum(p.numel() for p in dep.parameters())


def test_profile_does_not_touch_net():
    net = TinyResNet()
    sd = {k: v.clone() for k, v in net.state_dict().items() if isinstance(v, torch.Tensor)}
    sk.profile(net, "[0.5, 0.5]x", (1, 3, H, H))
    assert net.bn0.switches == []  # no statistics row registered
    for k, v in net.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, sd[k])


def test_profile_bad_input():
    net = TinyResNet()
    with pytest.raises(ValueError, match="above the net's max_width"):
        sk.profile(net, "[1.5]x", (1, 3, 8, 8))
    with pytest.raises(ValueError):
        sk.profile(net, "[0.5, 0.5", (1, 3, 8, 8))
    with pytest.raises(ValueError, match="input_size must be positive"):
        sk.profile(net, "[1.0]x", (0, 3, 8, 8))
    with pytest.raises(ValueError, match="has no slimkern layers"):
        sk.profile(nn.Conv2d(3, 4, 1), "[0.5]x", (1, 3, 8, 8))
    with pytest.raises(ValueError, match="no closed form for LayerNorm"):
        sk.profile(nn.Sequential(nn.Flatten(), nn.LayerNorm(12)), None, (1, 3, 2, 2))


@pytest.mark.parametrize("batch", [1, 2])
def test_profile_in_train_mode_and_at_batch_one(batch):
    """A train-mode net profiles like the eval one (the figures are the inference graph's) and
    keeps its mode; batch 1 at 1x1 maps used to hit BN's 'more than 1 value per channel'."""
    import torchvision

    net = sk.slimmify(torchvision.models.resnet18(weights=None, num_classes=10), max_width=1.5)
    want = sk.profile(net.eval(), "[0.5, 0.5]x", (batch, 3, 32, 32))
    got = sk.profile(net.train(), "[0.5, 0.5]x", (batch, 3, 32, 32))
    assert net.training
    assert (got.macs, got.params, got.peak_activation_bytes) == (want.macs, want.params, want.peak_activation_bytes)


def test_profile_of_a_list_of_switches_is_one_table():
    net = TinyResNet()
    sws = ["[1.0]x", sk.Switch([0.5, 0.25, 0.25]), "[0.5]x"]
    table = sk.profile(net, sws, (N, 3, H, H))
    assert [p.switch for p in table] == [sk.Switch.parse("[1.0]x"), sk.Switch([0.5, 0.25, 0.25]),
                                         sk.Switch.parse("[0.5]x")]
    assert [p.macs for p in table] == [sk.profile(net, s, (N, 3, H, H)).macs for s in sws]
    text = str(table)
    assert text.count("\n") == 2 + len(sws) - 1 and all(str(p.switch) in text for p in table)
    assert f"{hand_branch(4)[0] / 1e6:.3f}" in text  # the [0.5]x row's MACs
    assert table.as_dict()["switches"][0]["macs"] == hand_branch(8)[0]
    # a list of numbers is still one switch's branches
    assert sk.profile(net, [0.5, 0.5], (N, 3, H, H)).switch == sk.Switch([0.5, 0.5])
