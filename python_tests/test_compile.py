"""torch.compile of the packed training step (issue 19, item 4).

``slimkern.train.packed_loss`` (one ``forward_switches`` pass over the ParaDiS switches
[1.2], [1.0], [0.5,0.5], [4x0.25] + their losses) must trace as ONE graph: Dynamo runs the
plan building and table validation at trace time, the C++ ops enter the graph through their
``register_fake`` kernels, and AOTAutograd traces their backward through the registered
autograd formulas. The references are the same step run eagerly on a copy of the net
(losses, every parameter gradient and every BN buffer), and ``torch._dynamo.explain``'s
graph-break count, which a planted ``.item()`` shows is able to fail.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import slimkern as sk
from slimkern import _library
from slimkern.train import packed_loss
from small_slim_nets import TinyResNet

pytestmark = pytest.mark.skipif(not (_library.has_op("block_conv2d") and _library.has_op("switchable_batch_norm")),
                                reason="the C++ extension is not loaded")

SWITCHES = ["[1.2]x", "[1.0]x", "[0.5, 0.5]x", "[4x0.25]x"]


def _paradis_loss(y):
    """ParaDiS Algorithm 1's losses: CE for the wide [1.2]; KD from it for the rest; feature MSE
    against [1.0]'s for the two multi-branch switches."""
    def loss(i, z, f, prev):
        if i == 0:
            return F.cross_entropy(z, y)
        kd = -(F.softmax(prev[0][0], 1) * F.log_softmax(z, 1)).sum(1).mean()
        return kd if i == 1 else kd + F.mse_loss(f, prev[1][1])
    return loss


def _case(seed=0, n=4, c=8):
    torch.manual_seed(seed)
    net = TinyResNet(c=c, max_width=1.2).train()
    sws = [sk.Switch.parse(s) for s in SWITCHES]
    sk.nn.register_switches(net, sws)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(n, 3, 8, 8, generator=g)
    y = torch.randint(0, 10, (n,), generator=g)
    return net, x, sws, _paradis_loss(y)


def _step(fn, net, x, sws, loss_fn):
    for p in net.parameters():
        p.grad = None
    total, losses = fn(net, x, sws, loss_fn)
    total.backward()
    return torch.stack(losses), {n: p.grad.clone() for n, p in net.named_parameters()}


def _assert_same_state(net_a, net_b, grads_a, grads_b, rtol, atol):
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")
    for (name, a), (_, b) in zip(net_a.named_buffers(), net_b.named_buffers()):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=lambda m: f"buffer {name}: {m}")


def _explain(net, x, sws, loss_fn):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(packed_loss)(net, x, sws, loss_fn)
    finally:
        torch._dynamo.reset()


def test_packed_step_is_one_graph_with_the_cpp_ops():
    net, x, sws, loss_fn = _case()
    ex = _explain(net, x, sws, loss_fn)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    assert ex.graph_count == 1
    targets = [str(n.target) for gm in ex.graphs for n in gm.graph.nodes if n.op == "call_function"]
    # the packed ops themselves, not the pure-torch fallback: 3 convs, 3 BNs, the fused classifier
    assert sum("slimkern.block_conv2d" in t for t in targets) == 3, targets
    assert sum("slimkern.switchable_batch_norm" in t and "update" not in t for t in targets) == 3, targets
    assert sum("slimkern.block_linear" in t for t in targets) == 1, targets


def test_a_planted_graph_break_is_counted():
    """The check above can fail: a loss that reads a value to Python (``.item()``) breaks the graph."""
    net, x, sws, loss_fn = _case()

    def leaky(i, z, f, prev):
        loss = loss_fn(i, z, f, prev)
        return loss * (1.0 if loss.item() < 1e9 else 0.0)

    ex = _explain(net, x, sws, leaky)
    assert ex.graph_break_count >= 1
    assert any("item" in b.reason for b in ex.break_reasons)
    torch._dynamo.reset()
    with pytest.raises(Exception, match="item"):
        torch.compile(packed_loss, fullgraph=True, backend="eager")(net, x, sws, leaky)
    torch._dynamo.reset()


def test_compiled_step_equals_eager_aot():
    """fullgraph compile through AOTAutograd (fake kernels + autograd formulas, no codegen):
    losses, gradients and BN running statistics equal the eager step's, over 3 steps, and the
    later calls reuse the first call's graph."""
    from torch._dynamo.testing import CompileCounterWithBackend

    net, x, sws, loss_fn = _case()
    net_c = copy.deepcopy(net)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(packed_loss, fullgraph=True, backend=counter)
    for _ in range(3):
        le, ge = _step(packed_loss, net, x, sws, loss_fn)
        lc, gc = _step(compiled, net_c, x, sws, loss_fn)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        _assert_same_state(net_c, net, gc, ge, rtol=1e-5, atol=1e-5)
    # one graph for all calls: forward_switches leaves the layers as it found them (no guard fails)
    assert counter.frame_count == 1
    torch._dynamo.reset()


def test_compiled_step_is_graded_against_the_eager_one():
    """Guard for the comparison itself: a compiled step on a perturbed weight differs."""
    net, x, sws, loss_fn = _case()
    net_c = copy.deepcopy(net)
    with torch.no_grad():
        net_c.conv.weight[0, 0, 0, 0] += 0.5
    torch._dynamo.reset()
    compiled = torch.compile(packed_loss, fullgraph=True, backend="aot_eager")
    _, ge = _step(packed_loss, net, x, sws, loss_fn)
    _, gc = _step(compiled, net_c, x, sws, loss_fn)
    with pytest.raises(AssertionError):
        _assert_same_state(net_c, net, gc, ge, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.slow
def test_compiled_step_equals_eager_inductor():
    """The default backend (Inductor generates and compiles C++ around the slimkern ops): the
    same step to 1e-5 (it reorders float32 sums, so not bit for bit)."""
    net, x, sws, loss_fn = _case()
    net_c = copy.deepcopy(net)
    torch._dynamo.reset()
    compiled = torch.compile(packed_loss, fullgraph=True)
    for _ in range(2):
        le, ge = _step(packed_loss, net, x, sws, loss_fn)
        lc, gc = _step(compiled, net_c, x, sws, loss_fn)
        torch.testing.assert_close(lc, le, rtol=1e-5, atol=1e-5)
        _assert_same_state(net_c, net, gc, ge, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.usefixtures("exact_fp32")
def test_compiled_step_on_cuda_is_one_graph_and_equals_eager():
    """The same fullgraph compile on CUDA tensors, where the ops pick Triton (else the C++ CUDA
    kernels): never run on a GPU before `make gpu-check`, so this is its first check."""
    net, x, sws, loss_fn = _case()
    net = net.cuda()
    x = x.cuda()
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(3)).cuda()
    loss_fn = _paradis_loss(y)
    net_c = copy.deepcopy(net)
    ex = _explain(net, x, sws, loss_fn)
    assert ex.graph_break_count == 0, [b.reason for b in ex.break_reasons]
    compiled = torch.compile(packed_loss, fullgraph=True)
    for _ in range(2):
        le, ge = _step(packed_loss, net, x, sws, loss_fn)
        lc, gc = _step(compiled, net_c, x, sws, loss_fn)
        torch.testing.assert_close(lc, le, rtol=1e-4, atol=1e-5)
        _assert_same_state(net_c, net, gc, ge, rtol=1e-4, atol=1e-5)
    torch._dynamo.reset()


@pytest.mark.triton
def test_triton_ops_compile_as_one_graph():
    """The Triton backends are ops of their own with fake kernels and autograd formulas, so a
    fullgraph compile keeps them opaque (runs on CUDA, or on the CPU with TRITON_INTERPRET=1):
    outputs and gradients equal the uncompiled calls'."""
    import os

    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("Triton needs TRITON_INTERPRET=1 (CPU) or a CUDA device")
    pytest.importorskip("triton")
    dev = "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 8, 6, 6, generator=g).to(dev)
    w = torch.randn(8, 8, 3, 3, generator=g).to(dev).requires_grad_(True)
    wl = torch.randn(5, 8, generator=g).to(dev).requires_grad_(True)
    b = torch.randn(8, generator=g).to(dev).requires_grad_(True)
    rm, rv = torch.zeros(2, 8, device=dev), torch.ones(2, 8, device=dev)

    def f(x):
        y = sk.ops.block_conv2d(x, w, b, [(0, 4, 0, 4), (4, 8, 4, 8)], None, 1, 1, 1, False, backend="triton")
        y = sk.ops.switchable_batch_norm(y, b, b, rm.clone(), rv.clone(), [(0, 4), (4, 8)], [0, 1], True,
                                         activation="relu", backend="triton")
        z = sk.ops.block_linear(y.mean((2, 3)), wl, None, [(0, 4, 0, 5), (4, 8, 0, 5)], backend="triton")
        return (z * torch.arange(10, device=dev)).sum()

    def grads(fn):
        for t in (w, wl, b):
            t.grad = None
        out = fn(x)
        out.backward()
        return out.detach(), [t.grad.clone() for t in (w, wl, b)]

    ex = _explain_fn(f, x)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    eager = grads(f)
    compiled = grads(torch.compile(f, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()


def _explain_fn(fn, *args):
    torch._dynamo.reset()
    try:
        return torch._dynamo.explain(fn)(*args)
    finally:
        torch._dynamo.reset()


def test_eval_forward_is_one_graph_and_equals_eager():
    """Inference too: the eval-mode packed forward (BN from the statistics rows) is one graph."""
    net, x, sws, loss_fn = _case()
    with torch.no_grad():
        packed_loss(net, x, sws, loss_fn)  # one training pass: the rows hold statistics
    net.eval()

    def fwd(x):
        return torch.cat(sk.forward_switches(net, x, sws))

    ex = _explain_fn(fwd, x)
    assert ex.graph_break_count == 0, [r.reason for r in ex.break_reasons]
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(fwd, fullgraph=True, backend="aot_eager")(x), fwd(x))
    torch._dynamo.reset()
