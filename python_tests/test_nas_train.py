"""slimkern.nas training: search-phase statistics equal the per-image losses computed directly;
BN rows of sampled configurations are dropped; retrain sampling follows the weights."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import slimkern as sk
from slimkern.nas import Platform, cost_model, search_space
from slimkern.nas.train import ConfigTrainer, WidthSearchTrainer, drop_bn_rows
from nas_nets import TinyChain


def _setup(adaptive=False, **kw):
    torch.manual_seed(0)
    net = TinyChain()
    sp = search_space(net, fractions=[0.25, 0.5, 0.75, 1.0], divisor=1)
    cm = cost_model(net, sp, (1, 3, 8, 8))
    full = cm.evaluate(sp.uniform_channels(1.0))
    plats = [Platform("a", 0.3 * full, 0.5), Platform("b", 0.7 * full, 0.5)]
    tr = WidthSearchTrainer(net, sp, plats, epochs=2, adaptive=adaptive, warmup=1, costs=cm, lr=0.05,
                            progress=False, **kw)
    return net, sp, cm, plats, tr


def test_search_step_records_aows_attribution_of_this_step():
    net, sp, cm, plats, tr = _setup()
    path = [1, 2, 0]
    tr.sampler.sample = lambda epoch: (0, list(path))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 3, 8, 8, generator=g), torch.randint(0, 10, (16,), generator=g)
    net.train()
    with torch.no_grad():  # the same packed pass the step runs (batch statistics: same outputs)
        outs = sk.forward_switches(net, x, [tr.max_switch, tr.min_switch, sp.switch(path)])
    want = (F.cross_entropy(outs[2], y, reduction="none") - F.cross_entropy(outs[0], y, reduction="none")) / 3
    tr.train_step(x, y)
    u, n = tr.stats.unary(), tr.stats.counts()
    for l, k in enumerate(path):
        assert n[l, k] == 16
        assert u[l, k] == pytest.approx(float(want.mean()), abs=1e-5)
    assert n.sum() == 3 * 16
    # the sampled configuration's BN rows are gone; the widest and narrowest keep theirs
    assert set(net.bn1.switches) == {tr.max_switch, tr.min_switch}


def test_search_fit_aows_checkpoint_round_trip(tmp_path):
    data = sk.data.digits(image_size=8, channels=3)
    sub = torch.utils.data.Subset(data.train, range(96))
    ck = tmp_path / "search.pt"
    net, sp, cm, plats, tr = _setup(adaptive=True, checkpoint=ck)
    hist = tr.fit(sub, 2, batch_size=32)
    assert "temperature" not in hist[0] and hist[1]["temperature"] < 1.0  # warm-up epoch, then AOWS
    assert tr.stats.counts().sum(1).tolist() == [2 * 3 * 32] * 3
    net2, sp2, cm2, plats2, tr2 = _setup(adaptive=True)
    tr2.load(ck)
    np.testing.assert_allclose(tr2.stats.unary(), tr.stats.unary(), rtol=1e-12, atol=1e-15)
    assert (tr2.stats.counts() == tr.stats.counts()).all()
    assert len(net.bn0.switches) == 2


def test_drop_bn_rows_keeps_the_other_rows():
    net = TinyChain()
    sws = [sk.Switch([1.0]), sk.Switch([0.5]), sk.Switch([0.25])]
    sk.nn.register_switches(net, sws)
    with torch.no_grad():
        net.bn1.running_mean.copy_(torch.arange(24.0).view(3, 8))
    assert drop_bn_rows(net, [sk.Switch([0.5])]) == 4  # four BN layers
    assert net.bn1.switches == [sws[0], sws[2]]
    np.testing.assert_array_equal(net.bn1.running_mean.numpy(), np.stack([np.arange(8.0), np.arange(16.0, 24.0)]))
    with sk.use_switch(net, sws[2]):
        net.train()(torch.randn(2, 3, 8, 8))  # the re-indexed rows run


def test_config_trainer_sampling_and_errors():
    net = TinyChain()
    sws = [sk.Switch([1.0]), sk.Switch([0.75]), sk.Switch([0.5]), sk.Switch([0.25])]
    tr = ConfigTrainer(net, sws, weights=[0.1, 0.7, 0.1, 0.1], order_key=lambda s: s.total_width, progress=False)
    draws = [tr.step_switches() for _ in range(1000)]
    assert all(d[0] == sws[0] and d[1] == sws[3] for d in draws)
    frac = np.mean([len(d) == 3 and d[2] == sws[1] for d in draws])
    assert abs(frac - 0.7) < 0.05
    with pytest.raises(ValueError, match="non-negative"):
        ConfigTrainer(net, sws, weights=[1, 2], order_key=len)
    with pytest.raises(ValueError, match="order_key"):
        ConfigTrainer(net, sws)


def test_gradient_clipping_bounds_the_step():
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    sws = [sk.Switch([1.0]), sk.Switch([0.5])]
    moved = {}
    for clip in (None, 1e-3):
        torch.manual_seed(0)
        net = TinyChain()
        before = torch.cat([p.detach().flatten().clone() for p in net.parameters()])
        tr = ConfigTrainer(net, sws, order_key=lambda s: s.total_width, clip_grad_norm=clip, lr=1.0,
                           weight_decay=0.0, progress=False)
        tr.train_step(x, y)
        moved[clip] = float((torch.cat([p.detach().flatten() for p in net.parameters()]) - before).norm())
    # first Nesterov SGD step moves by lr * (1 + momentum) * |g|, |g| <= clip
    assert 0 < moved[1e-3] <= 1.9e-3 * (1 + 1e-5) < moved[None]
    with pytest.raises(ValueError, match="clip_grad_norm"):
        ConfigTrainer(TinyChain(), sws, order_key=len, clip_grad_norm=0)


def test_nonuniform_sandwich_on_a_residual_net():
    net = sk.models.resnet20(num_classes=10, width_mult=0.25)
    with pytest.raises(ValueError, match="do not form a chain"):
        search_space(net)
    sp = search_space(net, fractions=[0.5, 1.0], divisor=1, require_chain=False)
    assert not sp.is_chain and "s1b1.mid" in sp.groups and sp.choices[0] == (2, 4)
    with pytest.raises(ValueError, match="chain search space"):
        cost_model(net, sp, (1, 3, 8, 8))
    tr = WidthSearchTrainer(net, sp, [Platform("a", 1.0, 1.0)], epochs=1, lr=0.05, progress=False)
    with pytest.raises(ValueError, match="AOWS"):
        WidthSearchTrainer(net, sp, [Platform("a", 1.0, 1.0)], epochs=2, adaptive=True, progress=False)
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 10, (8,), generator=g)
    tr.train_step(x, y)
    n = tr.stats.counts()
    assert (n.sum(1) == 8).all()  # every group recorded its sampled choice for the 8 images
    assert set(net.stem[1].switches) == {tr.max_switch, tr.min_switch}
