"""slimkern.train: losses and gradients equal hand-written reference steps; exact resume."""
import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import Subset, TensorDataset

import slimkern as sk
from slimkern import train as T


class Tiny(sk.nn.SlimNet):
    def __init__(self, max_width=1.5):
        super().__init__()
        kw = dict(max_width=max_width)
        self.c1 = sk.nn.SlimConv2d(3, 8, 3, 1, 1, bias=False, slice_in=False, **kw)
        self.b1 = sk.nn.SwitchableBatchNorm2d(8, activation="relu", **kw)
        self.c2 = sk.nn.SlimConv2d(8, 8, 3, 2, 1, bias=False, **kw)
        self.b2 = sk.nn.SwitchableBatchNorm2d(8, **kw)
        self.fc = sk.nn.SlimLinear(8, 4, slice_out=False, **kw)

    def forward(self, x):
        return self.fc(F.relu(self.b2(self.c2(self.b1(self.c1(x))))).mean((2, 3)))


def _data(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 6, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


def _run_alone(net, x, sw):
    """One switch on its own (no packing): logits and the classifier's input, zero-padded."""
    got = {}
    h = net.fc.register_forward_hook(lambda m, i, o: got.__setitem__("f", i[0]))
    with sk.use_switch(net, sw):
        z = net(x)
    h.remove()
    f = got["f"]
    return z, F.pad(f, (0, net.fc.in_full - f.shape[1]))


def _soft_ce(student, teacher):
    return F.cross_entropy(student, F.softmax(teacher.detach(), 1))


def _grads(net):
    return {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}


def _assert_same_grads(a, b):
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6, msg=k)


@pytest.mark.parametrize("kd,beta", [("wide", 0.7), ("wide", 0.0), ("full", 0.7), ("none", 0.7)])
def test_paradis_step_equals_reference(kd, beta):
    torch.manual_seed(0)
    net = Tiny()
    ref = copy.deepcopy(net)
    x, y = _data()
    sws = ["[1.5]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
    tr = T.ParaDiSTrainer(net, sws, beta=beta, kd=kd, progress=False)
    total, terms = tr.loss(x, y)
    total.backward()

    W, Fu, P2, P4 = [sk.Switch.parse(s) for s in sws]
    zw, fw = _run_alone(ref, x, W)
    zf, ff = _run_alone(ref, x, Fu)
    z2, f2 = _run_alone(ref, x, P2)
    z4, f4 = _run_alone(ref, x, P4)
    if kd == "wide":
        expect = F.cross_entropy(zw, y) + _soft_ce(zf, zw) + _soft_ce(z2, zw) + _soft_ce(z4, zw)
    elif kd == "full":
        expect = F.cross_entropy(zw, y) + F.cross_entropy(zf, y) + _soft_ce(z2, zf) + _soft_ce(z4, zf)
    else:
        expect = sum(F.cross_entropy(z, y) for z in (zw, zf, z2, z4))
    expect = expect + beta * (((f2 - ff.detach()) ** 2).mean() + ((f4 - ff.detach()) ** 2).mean())
    expect.backward()
    torch.testing.assert_close(total, expect, rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(net), _grads(ref))
    assert any(k.startswith("mse") for k in terms) == (beta > 0)
    assert len([k for k in terms if not k.startswith("mse")]) == 4


def test_sandwich_step_equals_reference():
    torch.manual_seed(0)
    net = Tiny(max_width=1.0)
    ref = copy.deepcopy(net)
    x, y = _data()
    tr = T.SandwichTrainer(net, max_width=1.0, min_width=0.25, n_random=2, width_step=0.125, progress=False)
    state = tr.generator.get_state()
    sws = tr.step_switches()
    tr.generator.set_state(state)
    assert sws[0] == sk.Switch([1.0]) and sws[1] == sk.Switch([0.25]) and len(sws) == 4
    for s in sws[2:]:
        w = s.branches[0][1]
        assert 0.25 <= w <= 1.0 and math.isclose(w / 0.125, round(w / 0.125))
    total, _ = tr.loss(x, y)
    total.backward()
    zs = [_run_alone(ref, x, s)[0] for s in sws]
    expect = F.cross_entropy(zs[0], y) + sum(_soft_ce(z, zs[0]) for z in zs[1:])
    expect.backward()
    torch.testing.assert_close(total, expect, rtol=1e-5, atol=1e-6)
    _assert_same_grads(_grads(net), _grads(ref))


def test_individual_sgd_step_equals_hand_update():
    torch.manual_seed(0)
    net = Tiny(max_width=1.0)
    ref = copy.deepcopy(net)
    x, y = _data()
    lr, mom, wd = 0.05, 0.9, 1e-3
    tr = T.IndividualTrainer(net, "[0.5, 0.5]x", lr=lr, momentum=mom, weight_decay=wd, progress=False)
    tr.scheduler = T.make_scheduler(tr.optimizer, "cosine", 10, 5)
    tr.train_step(x, y)
    z, _ = _run_alone(ref, x, sk.Switch([0.5, 0.5]))
    F.cross_entropy(z, y).backward()
    with torch.no_grad():
        for (name, p), (_, q) in zip(ref.named_parameters(), net.named_parameters()):
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            if p.dim() > 1:
                g = g + wd * p  # weight decay on weights only, not on BN affine / biases
            if p.grad is None:  # never used by the switch: SGD skips it entirely
                torch.testing.assert_close(q, p, msg=name)
                continue
            # Nesterov, first step: buf = g, update = g + mom * buf
            torch.testing.assert_close(q, p - lr * (1 + mom) * g, rtol=1e-5, atol=1e-7, msg=name)
    assert math.isclose(tr.optimizer.param_groups[0]["lr"], lr * 0.5 * (1 + math.cos(math.pi / 10)))


def test_schedules():
    assert T.lr_factor("cosine", 0, 100, 10) == 1.0 and abs(T.lr_factor("cosine", 100, 100, 10)) < 1e-12
    assert math.isclose(T.lr_factor("cosine", 50, 100, 10), 0.5)
    assert math.isclose(T.lr_factor("step", 35, 100, 10, milestones=(3, 6), gamma=0.1), 0.1)
    assert math.isclose(T.lr_factor("step", 60, 100, 10, milestones=(3, 6), gamma=0.1), 0.01)
    assert math.isclose(T.lr_factor("linear", 25, 100, 10), 0.75)
    assert math.isclose(T.lr_factor("constant", 25, 100, 10, warmup_epochs=5), 26 / 50)
    with pytest.raises(ValueError, match="unknown schedule"):
        T.lr_factor("poly", 0, 1, 1)


def _fit(tmp_path, name, epochs_before_stop=None, resume=False, recipe="paradis"):
    x, y = _data(40, seed=1)
    ds = TensorDataset(x, y)
    torch.manual_seed(123)  # a different init each time: resume must overwrite it
    net = Tiny()
    kw = dict(lr=0.05, checkpoint=tmp_path / name, progress=False, seed=7)
    if recipe == "paradis":
        tr = T.ParaDiSTrainer(net, ["[1.5]x", "[1.0]x", "[0.5, 0.5]x"], **kw)
    else:
        tr = T.SandwichTrainer(net, max_width=1.5, min_width=0.25, n_random=1, **kw)

    def stop(trainer, record):
        if epochs_before_stop is not None and trainer.epoch == epochs_before_stop:
            raise KeyboardInterrupt

    try:
        tr.fit(ds, epochs=3, batch_size=8, resume=resume, on_epoch_end=stop)
    except KeyboardInterrupt:
        pass
    return tr


@pytest.mark.parametrize("recipe", ["paradis", "sandwich"])
def test_resume_after_interruption_is_identical(tmp_path, recipe):
    straight = _fit(tmp_path, "a.pt", recipe=recipe)
    stopped = _fit(tmp_path, "b.pt", epochs_before_stop=1, recipe=recipe)
    assert stopped.epoch == 1
    resumed = _fit(tmp_path, "b.pt", resume=True, recipe=recipe)
    assert resumed.epoch == 3 and len(resumed.history) == 3
    sa, sb = straight.net.state_dict(), resumed.net.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        if isinstance(sa[k], torch.Tensor):
            assert torch.equal(sa[k], sb[k]), k
    assert [h["loss"] for h in straight.history] == [h["loss"] for h in resumed.history]
    assert not list(tmp_path.glob(".tmp-*"))


def test_trainer_errors(tmp_path):
    net = Tiny()
    with pytest.raises(ValueError, match="must be among"):
        T.ParaDiSTrainer(net, ["[1.5]x", "[0.5, 0.5]x"], progress=False)
    with pytest.raises(ValueError, match="wide teacher"):
        T.ParaDiSTrainer(net, ["[1.0]x", "[0.5, 0.5]x"], kd="wide", progress=False)
    with pytest.raises(ValueError, match="kd must be"):
        T.ParaDiSTrainer(net, ["[1.5]x", "[1.0]x"], kd="self", progress=False)
    with pytest.raises(ValueError, match="duplicate"):
        T.ParaDiSTrainer(net, ["[1.0]x", "[1.0]x"], kd="full", progress=False)
    with pytest.raises(ValueError, match="resume"):
        T.IndividualTrainer(net, "[1.0]x", progress=False).fit(TensorDataset(*_data()), 1, resume=True)
    with pytest.raises(FileNotFoundError, match="nope"):
        T.load_checkpoint(tmp_path / "nope.pt")
    tr = T.IndividualTrainer(net, "[1.0]x", progress=False)
    tr.save(tmp_path / "i.pt")
    with pytest.raises(ValueError, match="written by 'individual'"):
        T.ParaDiSTrainer(Tiny(), ["[1.5]x", "[1.0]x"], progress=False).load(tmp_path / "i.pt")


def test_sandwich_random_widths_never_repeat_a_switch():
    # With widths on a grid, a random width can land on max, min or another random width;
    # forward_switches refuses a repeated switch, so `slimkern train --recipe sandwich` crashed
    # within a few dozen steps. Every step's switches must be distinct.
    net = sk.models.build("mobilenet_v1", max_width=1.0, width_mult=0.25)
    tr = T.SandwichTrainer(net, max_width=1.0, min_width=0.25, n_random=2, width_step=0.25, progress=False)
    for _ in range(200):
        sws = tr.step_switches()
        assert len({str(s) for s in sws}) == len(sws), sws
    with pytest.raises(ValueError, match="distinct"):
        T.SandwichTrainer(net, max_width=1.0, min_width=0.25, n_random=3, width_step=0.25, progress=False)
