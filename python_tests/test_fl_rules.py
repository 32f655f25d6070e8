"""Federated rules as their reference code trains them (issue 13, points 3 and 4).

Every expected value is computed in the test from the reference definitions
(``fl_reference``): index sets, boolean element masks, element-wise count or sample means.
"""
import random

import pytest
import torch
import torch.nn.functional as F

from fl_reference import decode, element_mean, index_sets, mask_of, small_cnn_roles
from slimkern import Switch
from slimkern.fl import Aggregator, ClientUpdate, fedrolex, fjord, heterofl
from slimkern.fl.models import small_cnn

CH = (4, 8, 8)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _net():
    return small_cnn(channels=CH, seed=0)


def _params(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


# (key arguments, width, round, step, labels) of the clients of the mixed round
CLIENTS = [
    (1.0, None, None, None),          # the full model
    (0.5, 1, None, None),             # FedRolex round 1: every window wraps (C=4: {3, 0}; C=8: {7, 0, 1, 2})
    (0.5, 5, None, None),             # C=4: roll 1 {3, 0}; C=8: roll 5 {3, 4, 5, 6}
    (0.5, None, None, None),          # HeteroFL prefix
    (0.25, None, None, (0, 3, 7)),    # prefix with label split
    (0.5, 3, None, (1, 2)),           # rolled and label split
    (0.5, 2, 0.25, None),             # fractional step: roll = round(2 * 0.25 * C) % C
]


def _key(width, rnd, step, labels):
    from slimkern.fl.rolex import SubModel
    sw = Switch.width(width)
    if rnd is None and labels is None:
        return sw
    return SubModel(sw, rnd, step, 1.0, labels)


@pytest.mark.parametrize("weighting", ["clients", "samples"])
def test_index_set_average_matches_independent_masks(weighting):
    """Random dense sub-tensors of every kind of key vs the element-wise mean of the
    clients' scattered values written out with masks (the reference's meshgrid indexing)."""
    from slimkern.fl.rolex import windows_fn
    net = _net()
    p = _params(net)
    shapes = {n: t.shape for n, t in p.items()}
    roles = small_cnn_roles(CH)
    agg = Aggregator.for_params(p, windows_fn(net))
    g = torch.Generator().manual_seed(3)
    ups, ref = [], []
    for k, (w, rnd, step, labels) in enumerate(CLIENTS):
        sets = index_sets(roles, shapes, w, rnd, step, labels)
        dense = {n: torch.randn([len(i) for i in idx], generator=g) for n, idx in sets.items()}
        ups.append(ClientUpdate(k, _key(w, rnd, step, labels), {n: [v] for n, v in dense.items()}, float(k + 2)))
        full = {n: torch.zeros(shapes[n]) for n in sets}
        for n, idx in sets.items():
            full[n][torch.meshgrid(*idx, indexing="ij")] = dense[n]
        ref.append((full, mask_of(sets, shapes), float(k + 2)))
    new, rep = fedrolex(p, ups, agg, weighting=weighting)
    assert rep.accepted == list(range(len(CLIENTS))) and not rep.rejected
    want = element_mean(p, ref, weighting)
    for n in p:
        torch.testing.assert_close(new[n], want[n], rtol=1e-5, atol=1e-6, msg=n)
    # the wrapped window of client 1 is one dense sub-matrix: its cross blocks are trained
    W = "features.2.weight"  # [8 out, 4 in]
    only1 = [(k, u) for k, u in enumerate(ups) if k == 1]
    new1, _ = fedrolex(p, [u for _, u in only1], agg)
    changed = (new1[W] != p[W]).any(-1).any(-1)
    rows, cols = torch.tensor([7, 0, 1, 2]), torch.tensor([3, 0])
    expect = torch.zeros(8, 4, dtype=torch.bool)
    expect[rows[:, None], cols[None, :]] = True
    assert torch.equal(changed, expect)  # includes (7, 0), (0, 3): the blocks across the wrap


def test_fedrolex_keys_roll_one_channel_per_round():
    from slimkern.fl.rolex import SubModel
    from slimkern.fl.strategy import FedRolex
    net = _net()
    p = _params(net)
    shapes = {n: t.shape for n, t in p.items()}
    agg = Aggregator.for_params(p, __import__("slimkern.fl.rolex", fromlist=["x"]).windows_fn(net))
    assigned = {0: Switch([0.5]), 1: Switch([1.0])}
    for r in range(10):
        key = FedRolex(label_split=False).task(0, assigned, r, seed=0)
        assert key == SubModel(Switch([0.5]), r, None, 1.0)
        got = agg.extract(p, key)
        sets = index_sets(small_cnn_roles(CH), shapes, 0.5, r)
        want = torch.cat([p[n][torch.meshgrid(*idx, indexing="ij")].reshape(-1) for n, idx in sets.items()])
        assert torch.equal(got, want), r
    # the full-width client holds everything, whatever the roll
    key = FedRolex().task(1, assigned, 3, seed=0)
    assert agg.num_elements(key) == sum(t.numel() for t in p.values())
    with pytest.raises(ValueError, match="step"):
        FedRolex(step=0)


def test_heterofl_weighting_default_is_the_client_count_mean():
    """HeteroFL's combine(): count += 1 per element (Flower's baseline the same); FjORD's
    fjord_average weights by examples."""
    net = _net()
    p = _params(net)
    agg = Aggregator.for_params(p, lambda sw: __import__("slimkern.nn", fromlist=["x"]).parameter_ranges(net, sw))
    full = ClientUpdate(0, Switch([1.0]), agg.extract(p, Switch([1.0])) * 0 + 1.0, 1)
    half = ClientUpdate(1, Switch([0.5]), agg.extract(p, Switch([0.5])) * 0 + 5.0, 3)
    W = "features.2.weight"
    by_count, _ = heterofl(p, [full, half], agg)
    by_samples, _ = heterofl(p, [full, half], agg, weighting="samples")
    by_fjord, _ = fjord(p, [full, half], agg)
    assert torch.allclose(by_count[W][:4, :2], torch.full((4, 2, 3, 3), 3.0))      # (1 + 5) / 2
    assert torch.allclose(by_samples[W][:4, :2], torch.full((4, 2, 3, 3), 4.0))    # (1 + 3 * 5) / 4
    assert torch.allclose(by_fjord[W][:4, :2], torch.full((4, 2, 3, 3), 4.0))
    for new in (by_count, by_samples):
        assert torch.allclose(new[W][4:], torch.ones(4, 4, 3, 3)) and torch.allclose(new[W][:, 2:], torch.ones(8, 2, 3, 3))
    from slimkern.fl.strategy import FedRolex, FjORD, HeteroFL
    assert HeteroFL().weighting == "clients" and FedRolex().weighting == "clients"
    assert FjORD().weighting == "samples"
    with pytest.raises(ValueError, match="weighting"):
        HeteroFL(weighting="examples")


# -- local training ---------------------------------------------------------------------------

def _digits(n=64, labels=None):
    from sklearn.datasets import load_digits
    d = load_digits()
    X = (torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 - 0.3) / 0.4
    Y = torch.tensor(d.target)
    if labels is not None:
        keep = torch.isin(Y, torch.tensor(labels))
        X, Y = X[keep], Y[keep]
    return X[:n], Y[:n]


def _train(net, X, Y, key, strategy, lr=0.1, epochs=1, batch_size=1000, momentum=0.0, weight_decay=0.0, seed=0):
    from slimkern.fl.simulate import _local_train
    gen = torch.Generator().manual_seed(seed)
    _local_train(net, X, Y, torch.arange(len(Y)), key, strategy, epochs, lr, batch_size, momentum, weight_decay,
                 gen, random.Random(seed))


def test_label_split_masks_absent_logits_in_the_local_loss():
    """A client holding labels {0, 1}: the absent classes' logits are masked (filled with 0,
    as the reference does), so their classifier rows get no gradient."""
    from slimkern.fl.rolex import SubModel
    from slimkern.fl.strategy import HeteroFL
    X, Y = _digits(48, labels=[0, 1])
    net = _net()
    before = _params(net)
    key = HeteroFL().task(0, {0: Switch([0.5])}, 0, 0, labels=(0, 1))
    assert key == SubModel(Switch([0.5]), labels=(0, 1))
    _train(net, X, Y, key, HeteroFL(scaler=False, clip_norm=None), epochs=2, batch_size=16)
    W, b = net.classifier.weight.detach(), net.classifier.bias.detach()
    assert torch.equal(W[2:], before["classifier.weight"][2:]) and torch.equal(b[2:], before["classifier.bias"][2:])
    assert (W[:2, :4] != before["classifier.weight"][:2, :4]).all() and (b[:2] != before["classifier.bias"][:2]).all()
    # without label split every row learns (the absent classes are pushed down)
    net2 = _net()
    _train(net2, X, Y, Switch([0.5]), HeteroFL(label_split=False, scaler=False, clip_norm=None), epochs=2, batch_size=16)
    assert (net2.classifier.bias.detach()[2:] != before["classifier.bias"][2:]).all()


def test_local_step_clips_gradient_norm_to_one():
    """HeteroFL's clip_grad_norm_(params, 1) before every step: one SGD step equals the step
    computed here with the gradient rescaled to norm min(1, ||g||)."""
    from slimkern.fl.strategy import HeteroFL
    from slimkern.nn import use_switch
    X, Y = _digits(32)
    ref = _net()
    ref.train()
    with use_switch(ref, Switch([0.5])):
        loss = F.cross_entropy(ref(X), Y)
    grads = torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(ref.parameters(), grads)]
    norm = torch.sqrt(sum((g * g).sum() for g in grads))
    assert HeteroFL().clip_norm == 1.0
    c = 0.1  # below this batch's gradient norm (~0.4), so the clipping acts
    assert norm > 2 * c
    lr = 0.5
    want = {n: p.detach() - lr * c * g / norm for (n, p), g in zip(ref.named_parameters(), grads)}
    net = _net()
    _train(net, X, Y, Switch([0.5]), HeteroFL(scaler=False, clip_norm=c), lr=lr)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-4, atol=1e-6, msg=n)
    # clip_norm=None: the plain step, longer than lr * c
    net = _net()
    _train(net, X, Y, Switch([0.5]), HeteroFL(scaler=False, clip_norm=None), lr=lr)
    step = torch.sqrt(sum(((p.detach() - q) ** 2).sum() for p, q in zip(net.parameters(), _params(_net()).values())))
    assert step > 1.5 * lr * c
    torch.testing.assert_close(step, lr * norm, rtol=1e-4, atol=1e-6)


def test_scaler_divides_hidden_outputs_by_the_rate_in_training():
    from slimkern.fl.strategy import FedRolex, HeteroFL
    from slimkern.nn import use_switch
    net = _net()
    seen = []
    # the first BN input: the first conv output (of the unchanged image) after the Scaler
    h = net.features[1].register_forward_pre_hook(lambda m, i: seen.append(i[0].detach().clone()))
    x = _digits(8)[0]
    try:
        with use_switch(net, Switch([0.5])):
            net.train()
            net(x)
            with HeteroFL().local_context(net, Switch([0.5])):
                net(x)
                net.eval()
                net(x)
                net.train()
            net(x)
            with HeteroFL(scaler=False).local_context(net, Switch([0.5])):
                net(x)
            with FedRolex().local_context(net, Switch([0.25])):
                net(x)
    finally:
        h.remove()
    plain, scaled, evaluated, after, off, quarter = seen
    torch.testing.assert_close(scaled, plain / 0.5)
    torch.testing.assert_close(quarter, plain / 0.25)
    for t in (evaluated, after, off):
        torch.testing.assert_close(t, plain)


def test_dynamic_mode_redraws_each_clients_width_every_round():
    """HeteroFL's model_split_mode='dynamic': per round a width drawn for every client from
    the population of client widths (seeded by seed, round, client)."""
    from slimkern.fl.strategy import HeteroFL
    assigned = {c: Switch([1.0]) if c < 3 else Switch([0.5]) for c in range(12)}  # 1/4 full, 3/4 half
    fixed = HeteroFL(label_split=False)
    dyn = HeteroFL(dynamic=True, label_split=False)
    assert all(fixed.task(0, assigned, r, 7) == Switch([1.0]) for r in range(50))
    draws = [dyn.task(5, assigned, r, 7) for r in range(400)]
    assert draws == [dyn.task(5, assigned, r, 7) for r in range(400)]  # reproducible
    share = sum(d == Switch([1.0]) for d in draws) / len(draws)
    assert 0.17 < share < 0.33, share
    assert [dyn.task(5, assigned, r, 8) for r in range(40)] != draws[:40]


def test_fjord_self_distillation_step_matches_flowers_loss():
    """fjord_kd (Flower baselines/fjord models.train): per batch CE(y_pmax, y), then the
    sampled width learns CE(y_p, softmax(y_pmax)); one SGD step vs that loss written here."""
    from slimkern.fl.strategy import FjORD
    from slimkern.nn import use_switch
    X, Y = _digits(32)
    s = FjORD(kd=True)
    rng = random.Random(0)
    picks = [s.step_switches(Switch([1.0]), rng) for _ in range(30)]
    assert all(p[0] == Switch([1.0]) for p in picks)
    assert {p[1] for p in picks if len(p) == 2} == {Switch([0.25]), Switch([0.5]), Switch([0.75])}
    assert all(len(p) == 1 for p in picks if p[-1] == Switch([1.0]))
    assert FjORD().step_switches(Switch([1.0]), random.Random(0)) == [picks[0][-1]]
    # one step with the first draw of the client's rng: a seed whose first width is not p_max
    seed = next(k for k in range(50) if s.step_switches(Switch([1.0]), random.Random(k))[-1] != Switch([1.0]))
    student = s.step_switches(Switch([1.0]), random.Random(seed))[-1]
    ref = _net()
    ref.train()
    with use_switch(ref, Switch([1.0])):
        top = ref(X)
    with use_switch(ref, student):
        low = ref(X)
    loss = F.cross_entropy(top, Y) + F.cross_entropy(low, F.softmax(top.detach(), 1))
    grads = torch.autograd.grad(loss, list(ref.parameters()), allow_unused=True)
    lr = 0.2
    want = {n: p.detach() - (0 if g is None else lr * g) for (n, p), g in zip(ref.named_parameters(), grads)}
    net = _net()
    _train(net, X, Y, Switch([1.0]), s, lr=lr, seed=seed)
    for n, p in net.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_rolled_layouts_of_past_rounds_are_dropped():
    """A rolled key is used in its round only: simulate drops its cached layout afterwards
    (one index vector per round and width would pile up over a long run)."""
    from slimkern.fl.rolex import SubModel, forget_rounds, windows_fn
    net = _net()
    agg = Aggregator.for_params(_params(net), windows_fn(net))
    for r in range(5):
        agg.layout(SubModel(Switch([0.5]), r))
    agg.layout(Switch([0.5]))
    assert forget_rounds(agg, 3) == 3
    assert set(agg._layouts) == {SubModel(Switch([0.5]), 3), SubModel(Switch([0.5]), 4), Switch([0.5])}
