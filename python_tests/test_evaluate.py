"""slimkern.evaluate and its Report: numbers equal a hand computation on a tiny set."""
import csv
import json
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import slimkern as sk
from slimkern.evaluate import closed_form_cost, evaluate, switch_cost
from slimkern.report import Report, SwitchResult


class Tiny(sk.nn.SlimNet):
    """conv3x3 (3->8, image not sliced) + BN + ReLU, depthwise 3x3 stride 2, pool, fc 8->5."""

    def __init__(self):
        super().__init__()
        self.conv = sk.nn.SlimConv2d(3, 8, 3, 1, 1, bias=False, slice_in=False)
        self.bn = sk.nn.SwitchableBatchNorm2d(8, activation="relu")
        self.dw = sk.nn.SlimConv2d(8, 8, 3, 2, 1, groups=8, bias=True)
        self.fc = sk.nn.SlimLinear(8, 5, slice_out=False)

    def forward(self, x):
        return self.fc(self.dw(self.bn(self.conv(x))).mean((2, 3)))


def _tiny_setup():
    torch.manual_seed(0)
    net = Tiny()
    x = torch.randn(10, 3, 6, 6)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2, 3, 4])
    sws = [sk.Switch([1.0]), sk.Switch([0.5, 0.5]), sk.Switch([0.25, 0.75])]
    sk.calibrate_bn(net, [(x, y)], sws)
    return net, x, y, sws


def _hand_top1(net, x, y, sw):
    """The switch's own forward, batch by batch like the loader."""
    net.eval()
    with torch.no_grad(), sk.use_switch(net, sw):
        pred = torch.cat([net(x[:4]), net(x[4:8]), net(x[8:])]).argmax(1)
    return int((pred == y).sum()) / len(y), int((pred == y).sum())


def test_evaluate_matches_hand_computation():
    net, x, y, sws = _tiny_setup()
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    rep = evaluate(net, loader, sws, trained=[sws[0]])
    for r, sw in zip(rep.results, sws):
        top1, correct = _hand_top1(net, x, y, sw)
        assert r.switch == str(sw) and r.correct == correct and r.total == 10
        assert math.isclose(r.top1, top1)
    # costs by hand for one image 3x6x6: conv 6*6*c*3*9, dw 3*3*c*9, fc c*5; params conv c*27,
    # bn 2c, dw 9c + c bias, fc 5c (+5 bias once)
    def macs(c):
        return 36 * c * 27 + 9 * c * 9 + 5 * c

    def params(c, bias):
        return 27 * c + 2 * c + 10 * c + 5 * c + (5 if bias else 0)

    full, half, paradis = rep.results
    assert full.macs == macs(8) and full.params == params(8, True) and full.max_device_macs == macs(8)
    assert paradis.macs == macs(2) + macs(6) and paradis.max_device_macs == macs(6)
    assert paradis.params == params(2, True) + params(6, False)
    assert paradis.max_device_params == params(6, False)
    assert half.macs == 2 * macs(4) and half.branches == 2
    assert [r.trained for r in rep.results] == [True, False, False]
    assert sum(p.numel() for p in net.parameters()) == full.params  # max_width 1.0: [1.0] uses everything


def test_evaluate_individual_and_outputs(tmp_path):
    net, x, y, sws = _tiny_setup()
    torch.manual_seed(1)
    other = Tiny()
    sk.calibrate_bn(other, [(x, y)], [sws[1]])
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    rep = evaluate(net, loader, sws[:2], individual={sws[1]: other})
    assert rep.results[-1].kind == "individual" and rep.results[-1].trained is True
    assert rep.results[0].trained is None  # not said: unknown
    assert math.isclose(rep[sws[1], "individual"].top1, _hand_top1(other, x, y, sws[1])[0])
    rep.to_json(tmp_path / "r.json")
    rep.to_csv(tmp_path / "r.csv")
    rep.plot(tmp_path / "r.png")
    d = json.loads((tmp_path / "r.json").read_text())
    assert d["switches"][1]["switch"] == "[0.5, 0.5]x" and set(d["switches"][1]) >= {"top1", "macs", "params", "trained"}
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert rows[0]["switch"] == "[1.0]x" and float(rows[0]["top1"]) == rep.results[0].top1
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert Report.from_json(tmp_path / "r.json").results == rep.results
    assert not list(tmp_path.glob(".tmp-*"))  # atomic writes leave no temporaries
    from rich.console import Console
    con = Console(record=True, width=120)
    con.print(rep.table())
    text = con.export_text()
    assert "[0.5, 0.5]x" in text and "indiv." in text


def test_evaluate_errors():
    net, x, y, sws = _tiny_setup()
    with pytest.raises(ValueError, match="at least one switch"):
        evaluate(net, [(x, y)], [])
    with pytest.raises(ValueError, match="duplicate"):
        evaluate(net, [(x, y)], [sws[0], "[1.0]x"])
    with pytest.raises(ValueError, match="no batch"):
        evaluate(net, [], sws[:1], input_size=(1, 3, 6, 6))
    with pytest.raises(KeyError):
        Report([SwitchResult("[1.0]x", 1.0, 1, 1, 1, 1, True)])["[0.5]x"]


def test_closed_form_agrees_with_slimkern_profile():
    from slimkern import models
    net = models.mobilenet_v1(10, 3, max_width=1.2, width_mult=0.25)
    for s in ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x", "[0.5, 0.25, 0.25]x"]:
        sw = sk.Switch.parse(s)
        macs, params = closed_form_cost(net, sw, (1, 3, 16, 16))
        macs_p, max_macs_p, params_p, _ = switch_cost(net, sw, (1, 3, 16, 16))
        assert net.training  # restored
        assert macs_p == sum(macs) and max_macs_p == max(macs)
        net.eval()
        prof = sk.profile(net, sw, input_size=(1, 3, 16, 16))
        net.train()
        assert [b.macs for b in prof.branches] == macs
        assert prof.params == sum(params)  # profile books the fused bias apart, we put it on branch 0
