"""Packed execution end to end (issue 4 item 2) and the grouped memory mode.

* ``forward_switches`` runs every slim layer of the project's models ONCE per call, through
  the slimkern ops (block_conv2d / switchable_batch_norm / block_linear), for all blocks of
  all switches -- forward and backward;
* one backward through it gives exactly the gradients of the sum of the per-switch losses:
  checked against slimkern one switch at a time and against an independent plain-PyTorch
  slimmable implementation (``benchmarks/_plain_slimmable.py``, the slimmable_networks way);
* ``slimkern.train.packed_step(..., group_size=k)`` gives the same losses, gradients and BN
  statistics for every k.
"""
import copy
import os
import sys
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import slimkern as sk
from slimkern import _library
from slimkern.models import build
from slimkern.nn import slim_modules
from slimkern.train import packed_step

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import _plain_slimmable as P  # noqa: E402

HAS_OPS = all(_library.has_op(n) for n in ("block_conv2d", "block_linear", "switchable_batch_norm"))
needs_ops = pytest.mark.skipif(not HAS_OPS, reason=f"C++ ops not built ({_library.LOAD_ERROR})")

PARADIS = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]
SANDWICH = ["[1.0]x", "[0.25]x", "[0.625]x", "[0.4375]x"]
# small nets: a few ms per pass, every layer kind (depthwise, 1x1, 3x3, strided, shortcut)
MODELS = {"mobilenet_v1": 0.125, "resnet20": 0.5}


def _net(name, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    net = build(name, max_width=1.2, width_mult=MODELS[name])
    with torch.no_grad():  # non-trivial affine, so a wrong BN gradient cannot hide
        for m in net.modules():
            if isinstance(m, sk.nn.SwitchableBatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    return net.to(dtype)  # cast last: the same values in every dtype


def _data(dtype, n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g).to(dtype), torch.randint(0, 10, (n,), generator=g)


def _grads(net):
    return {k: p.grad.clone() for k, p in net.named_parameters()}


def _zero(net):
    for p in net.parameters():
        p.grad = None


class _OpCounter(TorchDispatchMode):
    """Counts the ops that reach the dispatcher from Python (not the kernels' internals)."""

    def __init__(self):
        super().__init__()
        self.ops = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.name())] += 1
        return func(*args, **(kwargs or {}))


# ---------------------------------------------------------------------------------------
# one op call per layer
# ---------------------------------------------------------------------------------------

@needs_ops
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_switches_runs_each_layer_once(name, monkeypatch):
    net = _net(name)
    x, y = _data(torch.float32)
    layers = {id(m.weight): n for n, m in slim_modules(net)}
    calls = Counter()

    def counting(op_name, fn):
        def wrapper(*args, **kwargs):
            calls[(op_name, layers[id(args[1])])] += 1
            return fn(*args, **kwargs)
        return wrapper

    for op_name in ("block_conv2d", "block_linear", "switchable_batch_norm"):
        monkeypatch.setattr(sk.ops, op_name, counting(op_name, getattr(sk.ops, op_name)))
    counter = _OpCounter()
    with counter:
        logits = sk.forward_switches(net, x, PARADIS)
        sum(torch.nn.functional.cross_entropy(z, y) for z in logits).backward()
    kinds = {sk.nn.SlimConv2d: "block_conv2d", sk.nn.SlimLinear: "block_linear",
             sk.nn.SwitchableBatchNorm2d: "switchable_batch_norm"}
    expected = Counter({(kinds[type(m)], n): 1 for n, m in slim_modules(net) if type(m) in kinds})
    assert len(expected) == len(layers) > 20
    assert calls == expected  # every layer exactly once, for all 8 blocks of the 4 switches
    ops = counter.ops
    n_conv = sum(isinstance(m, sk.nn.SlimConv2d) for _, m in slim_modules(net))
    n_bn = sum(isinstance(m, sk.nn.SwitchableBatchNorm2d) for _, m in slim_modules(net))
    assert ops["slimkern::block_conv2d"] == ops["slimkern::block_conv2d_backward"] == n_conv
    assert ops["slimkern::switchable_batch_norm"] == n_bn
    assert ops["slimkern::switchable_batch_norm_backward"] == n_bn
    assert ops["slimkern::block_linear"] == ops["slimkern::block_linear_backward"] == 1
    # no layer fell back to the dense aten ops
    dense = [k for k in ops if k.startswith("aten::") and any(s in k for s in ("convolution", "batch_norm",
                                                                                "addmm", "aten::mm", "linear"))]
    assert dense == [], dense


# ---------------------------------------------------------------------------------------
# packed == one switch at a time == plain PyTorch
# ---------------------------------------------------------------------------------------

def _run_plain(name, net, x, switches, loss_fn, dtype, ulp_noise=None):
    plain = P.build_plain(name, max_width=1.2, width_mult=MODELS[name], num_switches=len(switches)).to(dtype)
    P.load_from_slim(plain, net)
    plain.train()
    if ulp_noise is not None:
        for m in plain.modules():
            if isinstance(m, torch.nn.Conv2d):
                m.register_forward_hook(_one_ulp_hook(ulp_noise))
    losses = P.train_step(plain, x, [sk.Switch.parse(s).branches for s in switches], loss_fn)
    return plain, losses


def _one_ulp_hook(gen):
    """A forward hook that moves half of a convolution's outputs by one ulp, up or down at
    random: the output of another convolution kernel, as accurate as oneDNN's, that sums in
    another order."""
    def hook(_module, _inputs, out):
        with torch.no_grad():
            moved = torch.rand(out.shape, generator=gen) < 0.5
            up = torch.rand(out.shape, generator=gen) < 0.5
            toward = torch.where(up, torch.full_like(out, float("inf")), torch.full_like(out, float("-inf")))
            q = torch.where(moved, torch.nextafter(out, toward), out)
        return out + (q - out).detach()
    return hook


def _assert_close_all(a, b, tol):
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=tol, atol=tol, msg=lambda m: f"{k}: {m}")


def _three_ways(name, step, dtype):
    """(losses, grads, net) of slimkern packed, slimkern one switch at a time, plain PyTorch."""
    switches = PARADIS if step == "paradis" else SANDWICH
    x, y = _data(dtype)
    loss_fn = P.paradis_loss(y, beta=1.0) if step == "paradis" else P.sandwich_loss(y)
    packed = _net(name, dtype).train()
    lp = packed_step(packed, x, switches, loss_fn, pack=True)
    single = _net(name, dtype).train()
    l1 = packed_step(single, x, switches, loss_fn, group_size=1)  # one switch per pass, backward each
    plain, lr = _run_plain(name, _net(name, dtype), x, switches, loss_fn, dtype)
    return ((torch.stack(lp), _grads(packed), packed), (torch.stack(l1), _grads(single), single),
            (torch.stack(lr), {k: p.grad for k, p in plain.named_parameters()}, plain))


@pytest.mark.parametrize("step", ["paradis", "sandwich"])
@pytest.mark.parametrize("name", list(MODELS))
def test_packed_equals_one_at_a_time_and_plain(name, step):
    """float64: all three agree to 1e-10 (losses, gradients, BN statistics rows).

    float32: losses agree to 1e-4. Gradients are judged by envelopes (_float32_envelopes): the
    tiny MobileNet-v1 at init is ill-conditioned in float32 (BN over near-constant channels at
    2x2 maps amplifies rounding), and on both nets another rounding of one layer flips ReLU
    masks downstream."""
    (lp, gp, packed), (l1, g1, _), (lr, gr, plain) = _three_ways(name, step, torch.float64)
    tol = 1e-10
    assert len(lp) == 4 and all(float(v) > 0.05 for v in lp)
    torch.testing.assert_close(lp, l1, rtol=tol, atol=tol)
    torch.testing.assert_close(lp, lr, rtol=tol, atol=tol)
    assert set(gp) == set(gr)
    _assert_close_all(gp, g1, tol)
    _assert_close_all(gp, gr, tol)
    assert max(float(g.abs().max()) for g in gp.values()) > 1e-3  # the gradients are not all ~0

    # BN statistics: row of switch s == the plain net's s-th per-width BN, on that switch's channels
    sws = [sk.Switch.parse(s) for s in (PARADIS if step == "paradis" else SANDWICH)]
    pm = dict(plain.named_modules())
    n_bn = 0
    for n, m in slim_modules(packed):
        if not isinstance(m, sk.nn.SwitchableBatchNorm2d):
            continue
        n_bn += 1
        for s, sw in enumerate(sws):
            row, c1 = m.switch_row(sw), m.out_ranges(sw)[-1][1]
            torch.testing.assert_close(m.running_mean[row, :c1], pm[n].bn[s].running_mean[:c1], rtol=tol, atol=tol)
            torch.testing.assert_close(m.running_var[row, :c1], pm[n].bn[s].running_var[:c1], rtol=tol, atol=tol)
    assert n_bn > 10

    (lp32, gp32, _), (l132, g132, _), (lr32, gr32, _) = _three_ways(name, step, torch.float32)
    torch.testing.assert_close(lp32, l132, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp32, lr32, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lp32.double(), lp, rtol=1e-4, atol=1e-4)
    # Gradients: envelopes on both nets. ResNet-20 used to be held to 1e-4 against plain
    # PyTorch directly, which holds only while both round the stem alike: with oneDNN's stem
    # output moved by one ulp at random, its packed stem-weight gradient landed 2.4e-3 from
    # float64 on 1 of 5 seeds (a ReLU mask flips downstream), 1.3e-6 on the others.
    packed_env, single_env, plain_env = _float32_envelopes(name, step, gp)
    for k in gp:
        bound = 3 * plain_env[k] + 1e-5
        assert packed_env[k] <= bound, (k, packed_env[k], plain_env[k])
        assert single_env[k] <= bound, (k, single_env[k], plain_env[k])


def _rel_errors(grads, truth):
    return {k: float((grads[k].double() - truth[k]).abs().max()) / float(truth[k].abs().max()) for k in truth}


def _perturbed(t, gen):
    # one float32 rounding's worth of relative noise (2^-24)
    return t * (1 + 2.0 ** -24 * torch.randn(t.shape, generator=gen, dtype=t.dtype))


def _float32_envelopes(name, step, truth, draws=6):
    """Per parameter: the worst relative float32 gradient error against the float64 truth over
    `draws` runs -- the first on the test's values, the others with inputs and weights
    perturbed at float32's rounding level -- for slimkern packed, slimkern one switch at a
    time, and plain PyTorch.

    Why not one run: at init this MobileNet-v1's float32 gradients are ill-conditioned, so a
    single run's error is one draw from a wide distribution. Measured (issue 13) on seeds
    0-7: plain PyTorch's worst relative error ranges from 1.5e-4 to 6.6e-2 by seed, and
    slimkern's single-run error was below plain's on some seeds and 200x above on others, on
    the AVX-512 and the forced AVX2 path alike (the AVX2-only CI failure, 0.0123 vs 0.0044,
    was such a draw). Over 6 perturbed draws each, every parameter's slimkern envelope is
    within 1.0-1.72x of plain PyTorch's on both paths; a kernel that is really less accurate
    (say 1e-4 relative noise on one gradient) lands far above 3x on the well-conditioned
    parameters, whose envelopes are ~1e-5.

    Plain PyTorch's envelope also takes, each draw, a run whose convolution outputs are moved
    by one ulp at random (_one_ulp_hook): the judge is "as accurate as some float32 kernel",
    not "rounds like oneDNN". A different rounding anywhere upstream flips ReLU masks where a
    value sits near 0, and each flip moves the gradients downstream by a discrete step.
    Measured (issue 19) when the stem moved off oneDNN to our own GEMM, op-level as accurate
    (max relative error 2.0-2.2e-7 on every draw's stem, oneDNN 1.6e-7): the stem weight's
    envelope went from 0.0041 to 0.0174, the last BN bias's from 2.9e-6 to 2.6e-3 on one draw;
    plain PyTorch with the stem's output rounded exactly and then moved by one ulp gave stem
    envelopes of 0.0015, 0.0177 and 0.0039 on three noise seeds. With the noisy runs the median
    plain envelope goes from 2.6e-3 to 4.9e-3."""
    switches = PARADIS if step == "paradis" else SANDWICH
    x, y = _data(torch.float32)
    loss_fn = P.paradis_loss(y, beta=1.0) if step == "paradis" else P.sandwich_loss(y)
    gen = torch.Generator().manual_seed(0)
    envs = [dict.fromkeys(truth, 0.0) for _ in range(3)]
    for draw in range(draws):
        net = _net(name, torch.float32)
        xd = x
        if draw:
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(_perturbed(p, gen))
            xd = _perturbed(x, gen)
        plain, _ = _run_plain(name, net, xd, switches, loss_fn, torch.float32)
        noisy, _ = _run_plain(name, net, xd, switches, loss_fn, torch.float32, ulp_noise=gen)
        packed = copy.deepcopy(net).train()
        packed_step(packed, xd, switches, loss_fn, pack=True)
        single = copy.deepcopy(net).train()
        packed_step(single, xd, switches, loss_fn, group_size=1)
        runs = (_grads(packed), _grads(single), {k: p.grad for k, p in plain.named_parameters()},
                {k: p.grad for k, p in noisy.named_parameters()})
        for env, grads in zip(envs + envs[2:], runs):
            for k, err in _rel_errors(grads, truth).items():
                env[k] = max(env[k], err)
    return envs


def test_packed_gradient_is_sum_of_per_switch_gradients():
    """Autograd view of the same fact: d(sum_i L_i) == sum_i dL_i, each dL_i from its own run."""
    name, dtype = "resnet20", torch.float64
    x, y = _data(dtype)
    sws = SANDWICH[:3]
    net = _net(name, dtype).train()
    logits = sk.forward_switches(net, x, sws)
    sum(torch.nn.functional.cross_entropy(z, y) for z in logits).backward()
    total = _grads(net)
    acc = {k: torch.zeros_like(v) for k, v in total.items()}
    for sw in sws:
        other = _net(name, dtype).train()  # the same initial weights
        torch.nn.functional.cross_entropy(sk.forward_switches(other, x, [sw])[0], y).backward()
        for k, p in other.named_parameters():
            acc[k] += p.grad
    _assert_close_all(total, acc, 1e-10)


# ---------------------------------------------------------------------------------------
# memory mode: groups
# ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("group_size", [1, 2, 3])
def test_packed_step_groups_equal_all_at_once(group_size):
    name, dtype = "mobilenet_v1", torch.float64
    x, y = _data(dtype)
    loss_fn = P.paradis_loss(y, beta=0.5)
    a = _net(name, dtype).train()
    b = _net(name, dtype).train()
    b.load_state_dict(a.state_dict())
    la = packed_step(a, x, PARADIS, loss_fn, pack=True)
    lb = packed_step(b, x, PARADIS, loss_fn, group_size=group_size, pack=True)
    torch.testing.assert_close(torch.stack(la), torch.stack(lb), rtol=1e-12, atol=1e-12)
    _assert_close_all(_grads(a), _grads(b), 1e-10)
    sa, sb = a.state_dict(), b.state_dict()
    for k in sa:
        if torch.is_tensor(sa[k]):
            torch.testing.assert_close(sa[k], sb[k], rtol=1e-12, atol=1e-12, msg=lambda m: f"{k}: {m}")


def test_packed_step_accumulates_and_features_off():
    name, dtype = "resnet20", torch.float64
    x, y = _data(dtype)
    net = _net(name, dtype).train()
    seen = []

    def loss_fn(i, z, f, prev):
        seen.append((i, f, len(prev)))
        return torch.nn.functional.cross_entropy(z, y)

    packed_step(net, x, SANDWICH[:2], loss_fn, features=False, pack=True)
    assert seen == [(0, None, 0), (1, None, 1)]
    g = _grads(net)
    net2 = _net(name, dtype).train()
    packed_step(net2, x, SANDWICH[:2], loss_fn, group_size=1, features=False)
    packed_step(net2, x, SANDWICH[:2], loss_fn, group_size=1, features=False)  # no zero_grad: adds up
    _assert_close_all({k: 2 * v for k, v in g.items()}, _grads(net2), 1e-9)


def test_packed_step_bad_inputs():
    net = _net("resnet20")
    x, y = _data(torch.float32, n=4)

    def ce(i, z, f, prev):
        return torch.nn.functional.cross_entropy(z, y)

    with pytest.raises(TypeError, match="list of switches"):
        packed_step(net, x, "[1.0]x", ce)
    with pytest.raises(ValueError, match="at least one switch"):
        packed_step(net, x, [], ce)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        packed_step(net, x, ["[1.0]x"], ce, group_size=0)
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        packed_step(net, x, ["[1.0]x"], ce, group_size=1.5)
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        packed_step(net, x, ["[1.0]x"], None)
    with pytest.raises(ValueError, match="scalar tensor"):
        packed_step(net, x, ["[1.0]x"], lambda i, z, f, p: z)
    with pytest.raises(ValueError, match="above the net's max_width"):
        packed_step(net, x, ["[1.5]x"], ce)
