"""``slimkern.train.packing``: where packing switches into one pass pays, and ``packed_step``'s
``pack="auto"`` following it (issue 19: the memory mode never slower than one switch at a time)."""
import pytest
import torch
from torch import nn

import slimkern as sk
from slimkern.models import build
from slimkern.nn import SlimConv2d, SlimLinear, SwitchableBatchNorm2d
from slimkern.train import packed_step
from slimkern.train.packing import packing_pays, window_copy_share

PARADIS = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]


def test_share_by_hand():
    """Weights per layer kind, counted by hand: only the dense 3x3 on >= 8 input channels copies."""
    net = nn.Sequential(
        SlimConv2d(3, 16, 3, padding=1, slice_in=False),       # stem, 3 inputs: 16*3*9 = 432, in place
        SlimConv2d(16, 32, 3, padding=1),                      # dense 3x3: 32*16*9 = 4608, copies
        SwitchableBatchNorm2d(32),                             # no multiply-adds
        SlimConv2d(32, 32, 3, padding=1, groups=32),           # depthwise: 32*9 = 288
        SlimConv2d(32, 64, 1),                                 # 1x1: 64*32 = 2048
        SlimConv2d(64, 8, 3, padding=1),                       # dense 3x3, 64 inputs: 8*64*9 = 4608, copies
        SlimConv2d(8, 8, 3, padding=1),                        # dense 3x3, 8 inputs (the limit): 576, copies
        SlimConv2d(7, 8, 3, padding=1),                        # 7 inputs: the unfold engine's: 504
        SlimLinear(64, 10, slice_out=False),                   # 640
    )
    copied = 4608 + 4608 + 576
    total = 432 + 4608 + 288 + 2048 + 4608 + 576 + 504 + 640
    assert window_copy_share(net) == pytest.approx(copied / total, rel=1e-12)
    assert packing_pays(net) is (copied / total <= 0.5)


def test_share_of_the_models():
    assert window_copy_share(build("resnet20", max_width=1.2)) == pytest.approx(0.987, abs=1e-3)
    assert window_copy_share(build("mobilenet_v1", max_width=1.2)) == 0.0
    assert window_copy_share(nn.Sequential(nn.Conv2d(3, 8, 3))) == 0.0  # no slim layers
    assert not packing_pays(build("resnet20", max_width=1.2, width_mult=0.25))
    assert packing_pays(build("mobilenet_v1", max_width=1.2, width_mult=0.25))
    with pytest.raises(TypeError, match="nn.Module"):
        window_copy_share("resnet20")


def _calls(monkeypatch):
    """Records the number of switches of every packed pass."""
    seen = []
    inner = sk.forward_switches

    def counting(net, x, switches, *a, **k):
        seen.append(len(switches))
        return inner(net, x, switches, *a, **k)

    monkeypatch.setattr(sk, "forward_switches", counting)
    return seen


def _step(name, pack, group_size, dtype=torch.float64):
    torch.manual_seed(0)
    net = build(name, max_width=1.2, width_mult=0.25).to(dtype).train()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 16, 16, generator=g).to(dtype)
    y = torch.randint(0, 10, (4,), generator=g)

    def loss_fn(i, z, f, prev):
        return torch.nn.functional.cross_entropy(z, y) + (0.5 * (f - prev[0][1]).pow(2).mean() if prev else 0.0)

    losses = packed_step(net, x, PARADIS, loss_fn, group_size=group_size, pack=pack)
    return torch.stack(losses), {k: p.grad.clone() for k, p in net.named_parameters()}


@pytest.mark.parametrize("name,pack,group_size,passes", [
    ("resnet20", "auto", 2, [1, 1, 1, 1]),     # dense 3x3 net: one switch at a time
    ("resnet20", "auto", None, [1, 1, 1, 1]),
    ("resnet20", True, 2, [2, 2]),
    ("mobilenet_v1", "auto", 2, [2, 2]),       # 1x1 + depthwise: packed as asked
    ("mobilenet_v1", "auto", None, [4]),
    ("mobilenet_v1", False, None, [1, 1, 1, 1]),
])
def test_auto_packs_where_it_pays(monkeypatch, name, pack, group_size, passes):
    seen = _calls(monkeypatch)
    _step(name, pack, group_size, dtype=torch.float32)
    assert seen == passes


def test_auto_gives_the_packed_gradients():
    """The schedule changes the order of sums only: float64 losses and gradients agree to 1e-10."""
    la, ga = _step("resnet20", "auto", None)
    lp, gp = _step("resnet20", True, None)
    torch.testing.assert_close(la, lp, rtol=1e-12, atol=1e-12)
    for k in ga:
        torch.testing.assert_close(ga[k], gp[k], rtol=1e-10, atol=1e-10, msg=lambda m: f"{k}: {m}")


@pytest.mark.parametrize("bad", ["yes", 1, None, "Auto"])
def test_bad_pack(bad):
    net = build("resnet20", width_mult=0.25)
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="pack must be 'auto', True or False"):
        packed_step(net, x, ["[1.0]x"], lambda i, z, f, p: z.sum(), pack=bad)


@pytest.mark.parametrize("name,passes", [("resnet20", [1, 1, 1, 1]), ("mobilenet_v1", [4])])
def test_trainer_forward_follows_the_rule(monkeypatch, name, passes):
    """``run_switches`` (every recipe's forward): one pass per switch on a dense-3x3 net, packed on
    MobileNet; float64 logits and features equal the packed pass's to 1e-12."""
    from slimkern.train import run_switches

    torch.manual_seed(0)
    net = build(name, max_width=1.2, width_mult=0.25).double().train()
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    seen = _calls(monkeypatch)
    lg, ft = run_switches(net, x, PARADIS, return_features=True)
    assert seen == passes
    lp, fp = run_switches(net, x, PARADIS, return_features=True, pack=True)
    lo, no_feats = run_switches(net, x, PARADIS, pack=False)
    assert no_feats is None and seen[-4:] == [1, 1, 1, 1]
    for a, b, c in zip(lg, lp, lo):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(c, b, rtol=1e-12, atol=1e-12)
    for a, b in zip(ft, fp):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="pack must be 'auto', True or False"):
        run_switches(net, x, PARADIS, pack="never")


def test_trainer_pack_option():
    """``ParaDiSTrainer(pack=...)``: one SGD step packed and one pass per switch land on the same
    float64 weights (1e-10); a bad value is refused at construction."""
    import copy

    from slimkern.train import ParaDiSTrainer

    torch.manual_seed(0)
    net = build("resnet20", max_width=1.2, width_mult=0.25).double()
    x = torch.randn(8, 3, 16, 16, dtype=torch.float64)
    y = torch.randint(0, 10, (8,))
    nets = {pack: copy.deepcopy(net) for pack in (True, False, "auto")}
    for pack, n in nets.items():
        ParaDiSTrainer(n, PARADIS, pack=pack, progress=False, lr=0.1).train_step(x, y)
    ref = dict(nets[True].named_parameters())
    assert any(not torch.equal(p, ref[k]) for k, p in net.named_parameters())  # the step moved the weights
    for pack in (False, "auto"):
        for k, p in nets[pack].named_parameters():
            torch.testing.assert_close(p, ref[k], rtol=1e-10, atol=1e-10, msg=lambda m: f"{pack} {k}: {m}")
    with pytest.raises(ValueError, match="pack must be 'auto', True or False"):
        ParaDiSTrainer(net, PARADIS, pack="packed")
